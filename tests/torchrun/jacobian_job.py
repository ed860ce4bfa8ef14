"""A torchrun Jacobian-lens fit; rank 0 writes the lens's matrices for the test to compare with one process.

Usage: python -m torch.distributed.run --nproc-per-node N tests/torchrun/jacobian_job.py OUT_FILE
"""

import sys

import torch

import tl_logitlens as tll
from tl_logitlens.distributed import init_from_env, rank_and_world

torch.set_num_threads(1)
assert init_from_env(timeout=180)
rank, world = rank_and_world()
model = tll.demo_model()
prompts = [tll.demo.induction_prompt(model, n=5, seed=s)[0] for s in range(5)] + [torch.tensor([1, 5, 6])]
lens = tll.fit_jacobian_lens(model, prompts, skip_first_positions=3, incl_mid=True, progress=False)
if rank == 0:
    torch.save({"matrices": lens.matrices, "n_prompts": lens.n_prompts, "world": world}, sys.argv[1])
