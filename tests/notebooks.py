"""Run the tutorials top to bottom, as ``make tutorials`` (which writes their outputs) and CI (which compares).

``python tests/notebooks.py`` executes every notebook in ``tutorials/`` in a fresh kernel and writes it back
with its outputs, after checking those outputs: no warning or other text on stderr, no file path of the
machine that ran them. ``tests/test_notebooks.py`` runs them again (``make test-notebooks``) and fails when
what a fresh run prints differs from what the committed notebook shows.

What is compared: every printed line (a cell's stdout, and the text of every result and figure it displays,
``<Figure size 552x466 with 7 Axes>`` included), cell by cell. One rule excepts what changes from run to run:
a time (a number followed by ``s``, ``ms``, ``µs``, ``sec``, ``seconds``, ``it/s`` or ``tok/s``) and a memory
address (``0x7f...``) are masked before comparing; nothing else is. Images are not compared pixel by pixel
(their size is, through the figure's text).

The kernel runs with ``HF_HUB_DISABLE_PROGRESS_BARS=1`` (no "Loading weights" bars, whose rates change from
run to run) and ``TL_LOGITLENS_MODELS`` (default ``../shared/models``, as CI sets it: tutorials 03 and 04 use
the real models there, and print that they skipped them otherwise).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))
#: The tutorials whose printed results depend on the real models of ``TL_LOGITLENS_MODELS``.
NEEDS_MODELS = ("03_with_your_own_code.ipynb", "04_tuned_lens.ipynb")
_DEFAULT_MODELS = ROOT.parent / "shared" / "models"
#: What changes from run to run, masked before comparing (see the module docstring).
RUN_TO_RUN = [
    (re.compile(r"\b\d+(\.\d+)?(?= ?(s|ms|µs|sec|seconds|it/s|tok/s)\b)"), "<time>"),
    (re.compile(r"\b0x[0-9a-fA-F]{6,}\b"), "<address>"),
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
    return (Path(kernel_env()["TL_LOGITLENS_MODELS"]) / "stories260k").is_dir()


def execute(path: Path, workdir: Path) -> object:
    """The notebook at ``path`` run top to bottom in a fresh kernel started in ``workdir`` (raises on a failing cell)."""
    import nbclient
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(kernel_env())  # the kernel inherits this process's environment
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
        return "".join(output.get("text", ""))
    data = output.get("data", {})
    text = data.get("text/plain", "")
    return "".join(text) if isinstance(text, list) else text


def printed(notebook: object) -> List[Tuple[int, List[str]]]:
    """Each code cell's printed lines (stdout and the text of what it displays), run-to-run parts masked."""
    cells = []
    for number, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        lines = []
        for output in cell.get("outputs", []):
            for line in _text(output).splitlines():
                for pattern, mask in RUN_TO_RUN:
                    line = pattern.sub(mask, line)
                lines.append(line.rstrip())
        cells.append((number, lines))
    return cells


def problems(notebook: object) -> List[str]:
    """What may not be saved: output on stderr, errors, the machine's paths, warnings."""
    found = []
    for number, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                found.append(f"cell {number} writes to stderr: {_text(output)[:200]!r}")
            if output.get("output_type") == "error":
                found.append(f"cell {number} raised {output.get('ename')}")
            text = _text(output)
            for pattern in _FORBIDDEN:
                hit = pattern.search(text)
                if hit:
                    found.append(
                        f"cell {number} prints {hit.group(0)!r}: {text[max(0, hit.start() - 60) : hit.end() + 60]!r}"
                    )
    return found


def main(argv: List[str]) -> int:
    """Execute the tutorials named in ``argv`` (default: all) and write each back with its outputs."""
    import tempfile

    import nbformat

    if not models_available():
        print(
            f"TL_LOGITLENS_MODELS ({kernel_env()['TL_LOGITLENS_MODELS']}) has no stories260k: tutorials 03 and 04 "
            "would be written without their real-model cells; point it at the shared models",
            file=sys.stderr,
        )
        return 1
    wanted = [p for p in TUTORIALS if not argv or p.stem in argv or p.name in argv]
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
