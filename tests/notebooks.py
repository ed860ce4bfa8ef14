"""Run the tutorials top to bottom, as ``make tutorials`` (which writes their outputs) and CI (which compares).

``python tests/notebooks.py [NAME ...]`` executes every notebook ``tutorials/*.ipynb`` (or those named) in a
fresh kernel and writes it back with its outputs, after checking them (:func:`problems`): nothing on stderr,
no error, no file path of the machine that ran them, no warning. ``tests/test_notebooks.py`` runs them again
(``make test-notebooks``) and fails when what a fresh run prints differs from what the committed notebook
shows (:func:`differences`). A new tutorial joins both by being saved in ``tutorials/``.

What is compared: every printed line of every code cell, in order (its stdout, and the text of each result
and figure it displays, ``<Figure size 552x466 with 7 Axes>`` included). Two things change from run to run
and are masked before comparing (:data:`RUN_TO_RUN`), nothing else:

- a time or a rate: a number followed by ``s``, ``ms``, ``µs``, ``sec``, ``seconds``, ``it/s`` or
  ``tok/s``, becomes ``<time>``; a memory address (``0x7f...``) becomes ``<address>``;
- a rounding residual: a number written with an exponent of -5 or below (``4.76837158203125e-07``; floating
  point's noise, which changes with the CPU's vector width and thread count) becomes ``<~0>``.

A statistic printed as a decimal (``0.0082``, ``3.952257``) must agree within float32's rounding, a relative
1e-5 (:data:`FLOAT32_NOISE`: its 7th significant digit changes with the processor's vector width and the
kernel's tiling; ``3.418`` against ``3.417`` is a changed result); integers and all other text exactly.

Images are not compared pixel by pixel (their size is, through the figure's text).

The kernel runs in this process's environment plus ``HF_HUB_DISABLE_PROGRESS_BARS=1`` (no "Loading weights"
bars) and ``TL_LOGITLENS_MODELS`` (default ``../shared/models``, as ``make`` and CI set it): the committed
outputs come from the real models there, and a tutorial whose real-model cells would take their fallback is
neither written nor compared without them.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))
_DEFAULT_MODELS = ROOT.parent / "shared" / "models"
#: What changes from run to run, masked before comparing (see the module docstring).
RUN_TO_RUN = [
    (re.compile(r"\b\d+(\.\d+)?(?= ?(s|ms|µs|sec|seconds|it/s|tok/s)\b)"), "<time>"),
    (re.compile(r"\b0x[0-9a-fA-F]{6,}\b"), "<address>"),
    (re.compile(r"[-+]?\b\d+(\.\d+)?[eE]-(0*[5-9]|0*[1-9]\d+)\b"), "<~0>"),
]
#: Text that must never be saved in a tutorial's outputs: the machine's paths, warnings.
_FORBIDDEN = [
    re.compile(r"(?<![\w.])/(tmp|work|home|root|Users|usr|opt|var)/"),
    re.compile(r"[A-Za-z]:\\\\"),
    re.compile(r"\w*Warning\b"),
]


def kernel_env() -> Dict[str, str]:
    """The environment the tutorials run in (a copy of this one, with the settings above)."""
    env = dict(os.environ)
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    env.setdefault("TL_LOGITLENS_MODELS", str(_DEFAULT_MODELS))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def models_available() -> bool:
    """Whether the kernel will find the real models (``stories260k``) the committed outputs were made with."""
    return (Path(kernel_env()["TL_LOGITLENS_MODELS"]) / "stories260k").is_dir()


def execute(path: Path, workdir: Path) -> Any:
    """The notebook at ``path`` run top to bottom in a fresh kernel started in ``workdir``.

    Raises nbclient's ``CellExecutionError`` (with the cell's traceback) on a failing cell."""
    import nbclient
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    env, saved = kernel_env(), dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        nbclient.NotebookClient(
            notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
        ).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    for cell in notebook.cells:  # run metadata (timestamps) would make every run a diff
        cell.metadata.pop("execution", None)
    return notebook


def _text(output: Dict) -> str:
    if output.get("output_type") == "stream":
        text = output.get("text", "")
    else:
        text = output.get("data", {}).get("text/plain", "")
    return "".join(text) if isinstance(text, list) else text


def printed(notebook: Any) -> List[Tuple[int, List[str]]]:
    """Each code cell's number and printed lines (its outputs' text in order, run-to-run parts masked).

    Consecutive pieces of one stream are joined first: the kernel splits a cell's stdout into pieces
    by timing, not by line."""
    cells = []
    for number, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        pieces: List[List[str]] = []  # [stream name or None, text]
        for output in cell.get("outputs", []):
            name = output.get("name") if output.get("output_type") == "stream" else None
            if name is not None and pieces and pieces[-1][0] == name:
                pieces[-1][1] += _text(output)
            else:
                pieces.append([name, _text(output)])
        lines = []
        for _, text in pieces:
            for line in text.splitlines():
                for pattern, mask in RUN_TO_RUN:
                    line = pattern.sub(mask, line)
                lines.append(line.rstrip())
        cells.append((number, lines))
    return cells


_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?\d+[eE][-+]?\d+")
#: How far two printed decimals may differ, relative to the larger: float32's rounding of a statistic, which
#: changes in the 7th significant digit with the processor's vector width and the kernel's tiling.
FLOAT32_NOISE = 1e-5


def _same_lines(old: List[str], new: List[str]) -> bool:
    """Lines equal, or differing only in decimals that agree within :data:`FLOAT32_NOISE` (integers exactly)."""
    if len(old) != len(new):
        return False
    for a, b in zip(old, new):
        if a == b:
            continue
        if _NUMBER.sub("#", a) != _NUMBER.sub("#", b):
            return False
        for x, y in zip(map(float, _NUMBER.findall(a)), map(float, _NUMBER.findall(b))):
            if abs(x - y) > FLOAT32_NOISE * max(abs(x), abs(y)):
                return False
    return True


def differences(committed: Any, fresh: Any) -> List[str]:
    """Where ``fresh`` prints other lines than ``committed`` (cell by cell, after masking), as readable lines."""
    import difflib

    found = []
    old, new = dict(printed(committed)), dict(printed(fresh))
    if sorted(old) != sorted(new):
        return [f"the code cells differ: committed {sorted(old)}, fresh {sorted(new)}"]
    for number in sorted(old):
        if not _same_lines(old[number], new[number]):
            diff = difflib.unified_diff(old[number], new[number], "committed", "fresh", lineterm="", n=0)
            found.append(f"cell {number}:\n    " + "\n    ".join(list(diff)[2:]))
    return found


def problems(notebook: Any) -> List[str]:
    """What may not be saved: output on stderr, errors, the machine's paths, warnings."""
    found = []
    for number, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            text = _text(output)
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                found.append(f"cell {number} writes to stderr: {text[:200]!r}")
            if output.get("output_type") == "error":
                found.append(f"cell {number} raised {output.get('ename')}")
            for pattern in _FORBIDDEN:
                hit = pattern.search(text)
                if hit:
                    where = text[max(0, hit.start() - 60) : hit.end() + 60]
                    found.append(f"cell {number} prints {hit.group(0)!r}: {where!r}")
    return found


def main(argv: List[str]) -> int:
    """Execute the tutorials named in ``argv`` (default: all) and write each back with its outputs."""
    import tempfile

    import nbformat

    if not models_available():
        models = kernel_env()["TL_LOGITLENS_MODELS"]
        print(
            f"TL_LOGITLENS_MODELS ({models}) has no stories260k: the tutorials would be written with their "
            "fallbacks instead of the real models; point it at the shared models",
            file=sys.stderr,
        )
        return 1
    wanted = [p for p in TUTORIALS if not argv or p.stem in argv or p.name in argv]
    if not wanted:
        print(f"no tutorial named {argv}; there are {[p.stem for p in TUTORIALS]}", file=sys.stderr)
        return 1
    for path in wanted:
        with tempfile.TemporaryDirectory() as workdir:
            notebook = execute(path, Path(workdir))
        found = problems(notebook)
        if found:
            print(f"{path.name}: not written:\n  " + "\n  ".join(found), file=sys.stderr)
            return 1
        nbformat.write(notebook, path)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
