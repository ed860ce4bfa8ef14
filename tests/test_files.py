"""Writers own their files: nothing the package writes replaces a file it did not write (issue 20).

Every writer goes through tl_logitlens.files: a lens folder, a training checkpoint folder and the
command line's --out are claimed folders (the package records what it wrote there); a saved
evaluation and an HTML page are single files that carry the package's mark. Each case checks what
is on disk afterwards, byte for byte, not only the error.
"""

import json
import os
from pathlib import Path

import pytest
import torch

import tl_logitlens as tll
from tl_logitlens import files
from tl_logitlens.errors import LensInputError

HF_FILES = {
    "config.json": '{"model_type": "gpt2", "n_embd": 64}',
    "model.safetensors": "weights",
    "tokenizer.json": "{}",
}


@pytest.fixture(scope="module")
def model():
    return tll.demo_model()


@pytest.fixture(scope="module")
def evaluation(model):
    tokens = torch.cat([tll.demo.induction_prompt(model, seed=s) for s in range(2)])
    return tll.evaluate_lens(model, tokens, progress=False)


def _snapshot(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _hf_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "hf-model"
    folder.mkdir()
    for name, text in HF_FILES.items():
        (folder / name).write_text(text)
    return folder


# -- a lens folder ---------------------------------------------------------------------------------
def test_save_refuses_a_model_folder_and_touches_nothing(model, tmp_path):
    folder = _hf_folder(tmp_path)
    before = _snapshot(folder)
    with pytest.raises(LensInputError, match=r"holds files tl_logitlens did not write \(config.json, .*overwrite=True"):
        tll.TunedLens(model).save(folder)
    assert _snapshot(folder) == before  # the model's config.json is the model's; no record was left either


def test_save_with_overwrite_replaces_only_its_own_names(model, tmp_path):
    folder = _hf_folder(tmp_path)
    tll.TunedLens(model).save(folder, overwrite=True)
    assert (folder / "model.safetensors").read_text() == "weights"  # never touched
    assert (folder / "tokenizer.json").read_text() == "{}"
    assert json.loads((folder / "config.json").read_text())["lens_type"] == "linear_tuned_lens"  # asked for
    tll.TunedLens.load(folder, model)


def test_save_again_into_its_own_folder_and_into_a_new_nested_one(model, tmp_path):
    lens = tll.TunedLens(model)
    nested = tmp_path / "a" / "b" / "lens"
    lens.save(nested)  # created, parents too
    with torch.no_grad():
        lens.translators["0_pre"].bias.fill_(0.25)
    lens.save(nested)  # its own folder: replaced without overwrite=
    assert float(tll.TunedLens.load(nested, model).translators["0_pre"].bias.detach()[0]) == 0.25


def test_save_refuses_any_other_file_and_onto_a_file(model, tmp_path):
    lens = tll.TunedLens(model)
    lens.save(tmp_path / "lens")
    (tmp_path / "lens" / "notes.txt").write_text("mine")
    with pytest.raises(LensInputError, match=r"holds a file tl_logitlens did not write \(notes.txt\)"):
        lens.save(tmp_path / "lens")
    target = tmp_path / "a_file"
    target.write_text("x")
    with pytest.raises(LensInputError, match="is a file, not a folder"):
        lens.save(target)
    assert target.read_text() == "x"


def test_a_temporary_file_left_by_a_killed_write_is_its_own(model, tmp_path):
    lens = tll.TunedLens(model)
    lens.save(tmp_path)
    (tmp_path / ".params.pt.abc123.tmp").write_bytes(b"half")
    lens.save(tmp_path)
    (tmp_path / ".other.abc123.tmp").write_bytes(b"not ours")  # not the temporary of a recorded file
    with pytest.raises(LensInputError, match=r"\.other\.abc123\.tmp"):
        lens.save(tmp_path)


def test_a_folder_that_cannot_be_written_is_refused_before_writing(model, tmp_path, monkeypatch):
    target = tmp_path / "ro"
    target.mkdir()
    real = os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode: False if Path(p) == target else real(p, mode))
    with pytest.raises(LensInputError, match="cannot write in .*ro.*read-only"):
        tll.TunedLens(model).save(target)
    with pytest.raises(LensInputError, match="cannot write in"):
        tll.TunedLens(model).save(target / "new" / "deeper")  # the nearest existing parent is checked
    assert list(target.iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_on_disk(model, tmp_path):
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o500)
    try:
        with pytest.raises(LensInputError, match="cannot write in"):
            tll.TunedLens(model).save(target)
    finally:
        target.chmod(0o700)


# -- single files: results and pages ------------------------------------------------------------------
def test_evaluation_save_replaces_only_its_own_file(evaluation, tmp_path):
    path = tmp_path / "eval.json"
    evaluation.save(path)
    evaluation.save(path)  # its own: replaced
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "data"}')
    with pytest.raises(LensInputError, match="exists and was not written by tl_logitlens.*overwrite=True"):
        evaluation.save(mine)
    assert mine.read_text() == '{"my": "data"}'
    evaluation.save(mine, overwrite=True)
    assert tll.LensEvaluation.load(mine).n_tokens == evaluation.n_tokens


def test_evaluation_save_into_a_missing_folder_or_onto_a_folder(evaluation, tmp_path):
    with pytest.raises(LensInputError, match="the folder .*missing.* does not exist; create it first"):
        evaluation.save(tmp_path / "missing" / "eval.json")
    with pytest.raises(LensInputError, match="is a folder; name the file to write"):
        evaluation.save(tmp_path)
    assert not (tmp_path / "missing").exists()


def test_comparison_save_refuses_a_foreign_file(model, tmp_path):
    tokens = tll.demo.induction_prompt(model, seed=1)
    cmp = tll.compare_lenses(model, tokens, {"logit": None, "tuned": tll.TunedLens(model)}, progress=False)
    mine = tmp_path / "cmp.json"
    mine.write_text("[1, 2]")
    with pytest.raises(LensInputError, match="was not written by tl_logitlens"):
        cmp.save(mine)
    assert mine.read_text() == "[1, 2]"
    cmp.save(tmp_path / "new.json")
    cmp.save(tmp_path / "new.json")
    assert tll.LensComparison.load(tmp_path / "new.json").lenses == ["logit", "tuned"]


def test_to_html_errors_name_the_path_never_a_temporary_file(model, tmp_path):
    pytest.importorskip("plotly")
    result = tll.logit_lens(model, tll.demo.induction_prompt(model), targets="next")
    for path, message in (
        (tmp_path / "missing" / "page.html", "the folder .*missing.* does not exist; create it first"),
        (tmp_path, "is a folder; name the file to write"),
    ):
        with pytest.raises(LensInputError, match=message) as err:
            result.to_html(path)
        assert ".tmp" not in str(err.value)
    mine = tmp_path / "page.html"
    mine.write_text("<html>my page</html>")
    with pytest.raises(LensInputError, match="was not written by tl_logitlens"):
        result.to_html(mine)
    assert mine.read_text() == "<html>my page</html>"
    result.to_html(mine, overwrite=True)
    ours = mine.read_text()
    assert files.HTML_MARK.decode() in ours
    result.to_html(mine)  # its own page now: replaced without overwrite=
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]  # no temporary file left


def test_check_folder_writes_nothing(tmp_path):
    target = tmp_path / "new" / "out"
    assert files.check_folder(target) == target
    assert not (tmp_path / "new").exists()
    with pytest.raises(LensInputError, match="the folder must be a path"):
        files.check_folder(3)


def test_a_page_or_result_the_package_wrote_counts_as_its_own_in_a_folder(model, evaluation, tmp_path):
    evaluation.save(tmp_path / "eval.json")  # single files, not recorded: their marks say whose they are
    pytest.importorskip("plotly")
    tll.logit_lens(model, tll.demo.induction_prompt(model)).to_html(tmp_path / "lens.html")
    tll.TunedLens(model).save(tmp_path)
    tll.TunedLens(model).save(tmp_path)
    assert {"eval.json", "lens.html", "params.pt"} <= {p.name for p in tmp_path.iterdir()}


# -- permissions: what the umask gives, for every writer -------------------------------------------
@pytest.fixture
def umask():
    """Set the process's umask for one test (``umask(0o022)``), and put the old one back."""
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask):
        os.umask(mask)

    yield set_mask
    os.umask(old)


def _modes(folder: Path):
    """``{relative path: permission bits}`` of every file under ``folder``."""
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_everything(model, evaluation, out: Path, capsys) -> None:
    """Every writer of the package, each into its own place under ``out``."""
    from tl_logitlens.cli import main
    from tl_logitlens.demo.index import write_index
    from tl_logitlens.plots import save_figure

    tokens = torch.cat([tll.demo.induction_prompt(model, n=4, seed=s) for s in range(2)])
    tll.TunedLens(model).save(out / "lens")  # a folder writer: config.json, params.pt, ... and its record
    tll.train_tuned_lens(model, tokens, steps=1, tokens_per_step=8, checkpoint_dir=out / "trained", progress=False)
    evaluation.save(out / "evaluation.json")  # single-file writers
    tll.compare_lenses(model, tokens, {"logit": None}, progress=False).save(out / "comparison.json")
    files.OwnedFolder(out / "owned").write_json("x.json", {"a": 1})
    files.write_owned_file(out / "single.txt", lambda tmp: Path(tmp).write_text("x"))
    write_index(out, ["evaluation.json"])
    lens = tll.logit_lens(model, tokens[:1])
    save_figure(lens.plot(), out / "figure.png", dpi=50)
    if __import__("importlib").util.find_spec("plotly") is not None:
        lens.to_html(out / "inline.html")
        (out / "pages").mkdir()
        lens.to_html(out / "pages" / "lens.html", plotly="directory")  # and plotly.min.js beside it
    assert main(["demo", "--out", str(out / "demo"), "--dpi", "50"]) == 0  # the command line's --out, pages included
    capsys.readouterr()


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_every_writer_gives_files_the_permissions_of_the_umask(model, evaluation, tmp_path, capsys, umask, mask, mode):
    """Under umask 022 every file is 0644 (a lens shared with colleagues, or copied into a container running as
    another user, can be read); the mode follows the umask, as a plain open() would give it."""
    umask(mask)
    _write_everything(model, evaluation, tmp_path, capsys)
    modes = _modes(tmp_path)
    expected = {
        "lens/config.json",
        "lens/params.pt",
        f"lens/{files.MANIFEST}",
        "trained/checkpoint.pt",
        "trained/params.pt",
        "evaluation.json",
        "comparison.json",
        "owned/x.json",
        "single.txt",
        "index.html",
        "figure.png",
        "demo/lens_heatmap.png",
        "demo/summary.json",
        "demo/lens.csv",
        "demo/index.html",
    }
    assert expected <= set(modes), sorted(expected - set(modes))
    if __import__("importlib").util.find_spec("plotly") is not None:
        assert {"inline.html", "pages/lens.html", "pages/plotly.min.js", "demo/plotly.min.js"} <= set(modes)
    wrong = {name: oct(m) for name, m in modes.items() if m != mode}
    assert not wrong, f"expected {oct(mode)} under umask {oct(mask)}: {wrong}"
