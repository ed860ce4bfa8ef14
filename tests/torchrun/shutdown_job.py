"""A torchrun job: the group init_from_env made is really gone after its exit handler ran.

Between init and shutdown it imports torch.distributed.fsdp, as transformers does while a model
loads, and runs a collective. Each rank writes what is left of the group: whether the group
object is still alive (a weak reference), and the names of this process's threads (Linux only).

Usage: python -m torch.distributed.run --nproc-per-node N tests/torchrun/shutdown_job.py OUT_DIR
"""

import json
import os
import sys
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

from tl_logitlens.distributed import _shutdown, init_from_env

assert init_from_env(timeout=180)
import torch.distributed.fsdp  # noqa: E402, F401  (after init, as a model load does)

t = torch.ones(4)
dist.all_reduce(t)
group = weakref.ref(dist.group.WORLD)  # a strong one would keep the group alive itself
_shutdown()  # what atexit runs
tasks = Path("/proc/self/task")
threads = sorted((p / "comm").read_text().strip() for p in tasks.iterdir()) if tasks.is_dir() else None
result = {"sum": t.tolist(), "group_alive": group() is not None, "threads": threads}
(Path(sys.argv[1]) / f"rank{os.environ['RANK']}.json").write_text(json.dumps(result))
