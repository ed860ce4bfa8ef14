"""Start a real torchrun job from a test: ``run(nproc, *args) -> (CompletedProcess, seconds)``.

The job sees this checkout first on its path, one thread per process, and a collective
timeout (180 s) above the 60 s the fault tests allow, so the package's fault protocol, not
the timeout, is what ends a failing job.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(nproc, *args, timeout=240):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["TL_LOGITLENS_DIST_TIMEOUT"] = "180"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone", *args]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - started
