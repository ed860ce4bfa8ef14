"""The tutorials: committed with clean outputs, and a fresh run prints what they show (``make test-notebooks``).

The rule for "prints what they show" is :mod:`tests.notebooks`'s (every printed line, cell by cell; times,
memory addresses and rounding residuals masked). Every ``tutorials/*.ipynb`` is checked, so a new tutorial
joins by being saved there with ``make tutorials``.
"""

import copy
import json

import notebooks
import pytest

TUTORIALS = notebooks.TUTORIALS
IDS = [p.stem for p in TUTORIALS]
#: Tutorials that read a real pretrained model (tests/pretrained.py): skipped when its folder is absent.
NEEDS_MODEL = {"05_three_lenses.ipynb": "smollm2-135m", "06_latent_language.ipynb": "gemma-3-270m"}


def test_the_tutorials_are_committed_with_outputs():
    names = [path.name for path in TUTORIALS]
    for name in [
        "01_logit_lens.ipynb",
        "02_direct_logit_attribution.ipynb",
        "03_with_your_own_code.ipynb",
        "04_tuned_lens.ipynb",
    ]:
        assert name in names
    for path in TUTORIALS:
        assert path.stat().st_size < 1_000_000, f"{path.name} is over 1 MB"
        cells = json.loads(path.read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert code and all(c.get("outputs") is not None for c in code)
        assert any(c["outputs"] for c in code), f"{path.name} was saved without outputs"
        assert all(c.get("execution_count") for c in code), f"{path.name}: a cell was not run (make tutorials)"


@pytest.mark.parametrize("path", TUTORIALS, ids=IDS)
def test_committed_outputs_are_clean(path):
    """No stderr, no error, no path of the machine that ran them, no warning, no run timestamps."""
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(path, as_version=4)
    assert notebooks.problems(notebook) == []
    assert not any("execution" in cell.metadata for cell in notebook.cells)


def _notebook(*cells):
    """A notebook of code cells, each given as its list of outputs."""
    nbformat = pytest.importorskip("nbformat")
    return nbformat.from_dict(
        {"cells": [{"cell_type": "code", "metadata": {}, "source": "pass", "outputs": list(o)} for o in cells]}
    )


def _stdout(text):
    return {"output_type": "stream", "name": "stdout", "text": text}


def _figure(size):
    return {"output_type": "display_data", "metadata": {}, "data": {"text/plain": f"<Figure size {size} with 1 Axes>"}}


def test_the_comparison_masks_only_what_changes_from_run_to_run():
    committed = _notebook(
        [_stdout("trained in 3.2 s (812 tok/s) at 0x7f3a2b1c9d00\nresidual error: 4.76837158203125e-07\n")],
        [_stdout("KL 3.418\n"), _figure("552x464.8")],
    )
    fresh = copy.deepcopy(committed)
    fresh.cells[0].outputs = [
        _stdout("trained in 41 s (90.5 tok/s) at 0x55d0c0ffee00\nresidual"),
        _stdout(" error: -2.9e-08\n"),
    ]
    assert notebooks.differences(committed, fresh) == []
    assert notebooks.printed(fresh)[0][1] == ["trained in <time> s (<time> tok/s) at <address>", "residual error: <~0>"]


_SHOWN = "KL 3.418\nloss 2.5e-01\n"


@pytest.mark.parametrize(
    "changed",
    [
        [_stdout("KL 3.417\nloss 2.5e-01\n"), _figure("552x464.8")],  # a statistic's last digit
        [_stdout("KL 3.418\nKL 3.418\nloss 2.5e-01\n"), _figure("552x464.8")],  # a line more
        [_stdout(_SHOWN), _figure("552x400")],  # a figure's size
        [_stdout("KL 3.418\nloss 2.6e-01\n"), _figure("552x464.8")],  # an exponent above -5 is a result
        [_stdout("KL 3.41806\nloss 2.5e-01\n"), _figure("552x464.8")],  # more than float32's noise (1e-5)
        [_stdout("KL 3.418\nloss 2.5e-01\n180 of 60\n"), _figure("552x464.8")],  # a line more, with numbers
    ],
)
def test_the_comparison_catches_a_changed_result(changed):
    committed = _notebook([_stdout(_SHOWN), _figure("552x464.8")])
    assert notebooks.differences(committed, _notebook([_stdout(_SHOWN), _figure("552x464.8")])) == []
    found = notebooks.differences(committed, _notebook(changed))
    assert len(found) == 1 and found[0].startswith("cell 0:")


def test_float32_noise_in_a_printed_statistic_is_not_a_changed_result():
    committed = _notebook([_stdout("180  1_pre  clock  0.069058  3.952257  6.020124\n")])
    fresh = _notebook([_stdout("180  1_pre  clock  0.069058  3.952258  6.020124\n")])  # 2.5e-7 relative
    assert notebooks.differences(committed, fresh) == []
    an_integer = "181  1_pre  clock  0.069058  3.952257  6.020124\n"
    a_token = "180  1_pre  chair  0.069058  3.95226  6.02012\n"
    for changed in [an_integer, a_token]:
        assert len(notebooks.differences(committed, _notebook([_stdout(changed)]))) == 1


def test_a_forbidden_output_is_named():
    notebook = _notebook(
        [{"output_type": "stream", "name": "stderr", "text": "loading\n"}],
        [_stdout("saved to /tmp/abc/lens.pt\n")],
        [_stdout("UserWarning: the cache is stale\n")],
    )
    found = notebooks.problems(notebook)
    assert len(found) == 3
    assert found[0].startswith("cell 0 writes to stderr")
    assert found[1].startswith("cell 1 prints '/tmp/'")
    assert found[2].startswith("cell 2 prints 'UserWarning'")


@pytest.mark.notebooks
@pytest.mark.parametrize("path", TUTORIALS, ids=IDS)
def test_a_fresh_run_prints_the_committed_results(path, tmp_path):
    if path.name in NEEDS_MODEL:
        import pretrained

        pretrained.folder(NEEDS_MODEL[path.name])  # skips, naming how to fetch it, when the folder is absent
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    if not notebooks.models_available():
        pytest.skip("the committed outputs come from the real models: set TL_LOGITLENS_MODELS")
    fresh = notebooks.execute(path, tmp_path)  # raises CellExecutionError with the failing cell's traceback
    assert notebooks.problems(fresh) == []
    found = notebooks.differences(nbformat.read(path, as_version=4), fresh)
    assert not found, f"{path.name} prints other results than it shows (make tutorials rewrites it):\n" + "\n".join(
        found
    )
