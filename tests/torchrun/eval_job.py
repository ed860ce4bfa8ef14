"""A torchrun job: every case of cases.py evaluated in the process group; each rank writes its results.

Usage: python -m torch.distributed.run --nproc-per-node N tests/torchrun/eval_job.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from cases import CASES  # noqa: E402

import tl_logitlens as tll  # noqa: E402
from tl_logitlens.distributed import init_from_env, rank_and_world  # noqa: E402

torch.set_num_threads(1)
assert init_from_env(timeout=180)
rank, world = rank_and_world()
out = Path(sys.argv[1])
model = tll.demo_model()
results = {}
for name, (make, kwargs) in CASES.items():
    ev = tll.evaluate_lens(model, make(model, True), progress=False, **kwargs)
    results[name] = ev.to_dict()
# compare_lenses shards and merges through the same driver: the logit lens and a seeded TunedLens.
from cases import compare_case  # noqa: E402

data, lenses = compare_case(model, True)
results["compare_lenses"] = tll.compare_lenses(model, data, lenses, progress=False).to_dict()
(out / f"rank{rank}.json").write_text(json.dumps(results))
