"""The tutorials execute from top to bottom, so they never rot (``make test-notebooks``)."""

from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).parent.parent / "tutorials").glob("*.ipynb"))
#: Tutorials that read a real pretrained model (tests/pretrained.py): skipped when its folder is absent.
NEEDS_MODEL = {"06_latent_language.ipynb": "gemma-3-270m"}


def test_the_tutorials_are_committed_with_outputs():
    names = [path.name for path in TUTORIALS]
    assert names == [
        "01_logit_lens.ipynb",
        "02_direct_logit_attribution.ipynb",
        "03_with_your_own_code.ipynb",
        "04_tuned_lens.ipynb",
        "06_latent_language.ipynb",
    ]
    import json

    for path in TUTORIALS:
        assert path.stat().st_size < 1_000_000, f"{path.name} is over 1 MB"
        cells = json.loads(path.read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert code and all(c.get("outputs") is not None for c in code)
        assert any(c["outputs"] for c in code), f"{path.name} was saved without outputs"


@pytest.mark.notebooks
@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_executes(path, tmp_path, monkeypatch):
    if path.name in NEEDS_MODEL:
        import pretrained

        pretrained.folder(NEEDS_MODEL[path.name])  # skips, naming how to fetch it, when the folder is absent
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell's traceback
