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


#: Text for the stories260k jobs: short lines, each a sequence of its own.
STORY_LINES = [
    "Once upon a time, there was a little girl named Lily.",
    "She loved to play outside in the park.",
    "One day, she saw a big red ball.",
    "Tom and his mom went to the store to buy some food.",
    "The sun was warm and the sky was blue.",
    "Lily and Tom played with the ball all day.",
]


def stories260k(models_dir, tmp_path, lines):
    """``(model folder, text file)`` for a job on stories260k with the first ``lines`` of
    :data:`STORY_LINES`; skips where transformer-lens cannot load a Hugging Face folder."""
    import pytest

    from tl_logitlens.model_access import TransformerBridge

    if TransformerBridge is None:
        pytest.skip("loading a Hugging Face folder needs TransformerBridge (transformer-lens 3.x/4.x)")
    text = tmp_path / "stories.txt"
    text.write_text("\n".join(STORY_LINES[:lines]) + "\n")
    return models_dir / "stories260k", text
