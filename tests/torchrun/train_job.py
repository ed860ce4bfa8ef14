"""A torchrun training job; each rank writes its lenses (state dicts) for the test to compare.

Usage: python -m torch.distributed.run --nproc-per-node N tests/torchrun/train_job.py MODE OUT_DIR CKPT_DIR

- ``fault``: the ``RESUME`` run with checkpoints in CKPT_DIR; rank 1 raises at step
  ``FAIL_AT_STEP`` (an injected error), so the job must end with that error.
- ``train``: every case of ``train_cases.CASES``, then the ``RESUME`` run resumed from CKPT_DIR.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from train_cases import CASES, FAIL_AT_STEP, RESUME  # noqa: E402

import tl_logitlens as tll  # noqa: E402
import tl_logitlens.lenses.training.tuned as train  # noqa: E402
from tl_logitlens.distributed import init_from_env, rank_and_world  # noqa: E402

torch.set_num_threads(1)
assert init_from_env(timeout=180)
rank, world = rank_and_world()
mode, out, ckpt = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
model = tll.demo_model()


def state(lens):
    return {k: v.detach().clone() for k, v in lens.state_dict().items()}


if mode == "fault":
    inner = train.LossStep.run

    def failing(self, tokens, step, seen):
        if rank == 1 and step == FAIL_AT_STEP:
            raise RuntimeError(f"injected failure at step {FAIL_AT_STEP}")
        return inner(self, tokens, step, seen)

    train.LossStep.run = failing
    make, kwargs = RESUME
    tll.train_tuned_lens(model, make(model), checkpoint_dir=ckpt, **kwargs)
    raise SystemExit("the injected failure did not end the job")

# Each step's gradient norm before clipping (clipping to norm 1 would hide a wrongly scaled gradient).
norms = []
clip = torch.nn.utils.clip_grad_norm_


def recording(params, max_norm, *args, **kwargs):
    norm = clip(params, max_norm, *args, **kwargs)
    norms.append(float(norm))
    return norm


torch.nn.utils.clip_grad_norm_ = recording
results = {}
for name, (make, kwargs) in CASES.items():
    norms.clear()
    results[name] = state(tll.train_tuned_lens(model, make(model), **kwargs))
    results[name + "_norms"] = list(norms)
make, kwargs = RESUME
norms.clear()
results["resumed"] = state(tll.train_tuned_lens(model, make(model), checkpoint_dir=ckpt, **kwargs))
results["resumed_norms"] = list(norms)
torch.save(results, out / f"rank{rank}.pt")
