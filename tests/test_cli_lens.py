"""``--lens DIR`` on the command line: ``lens`` reads through a saved tuned lens, ``eval`` compares it
with the logit lens; a missing folder or a lens for another model is one line, exit 2."""

import json

import builders
import pytest
import torch

import tl_logitlens as tll
from tl_logitlens.cli import main
from tl_logitlens.evaluate import STATISTICS, LensComparison, evaluate_lens
from tl_logitlens.model_access import HookedTransformer


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def demo():
    """The demo model, a randomly perturbed tuned lens of it saved to a folder, and an induction prompt as text."""
    model = tll.demo_model()
    lens = tll.TunedLens(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lens.translators.values():
            layer.weight.copy_(0.4 * torch.randn(layer.weight.shape, generator=g) / model.cfg.d_model**0.5)
            layer.bias.copy_(0.4 * torch.randn(layer.bias.shape, generator=g))
    folder = builders.temp_dir("tll-cli-lens-")
    lens.save(folder)
    tokens = tll.demo.induction_prompt(model, n=8, seed=3)
    words = " ".join(model.tokenizer.decode([int(t)]) for t in tokens[0, 1:])
    return model, lens, folder, words


def test_lens_reads_through_the_tuned_lens(demo, tmp_path, capsys):
    model, lens, folder, words = demo
    code, out, err = run(capsys, "lens", "--model", "demo", "--prompt", words, "--lens", folder, "--out", str(tmp_path))
    assert code == 0, err
    assert "tuned lens" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["lens"] == {"name": "tuned", "dir": folder}
    # What the API gives for the same lens (the plain lens reads something else at 0_pre).
    expected = tll.logit_lens(model, words, positions=-1, lens=lens, top_k=1)
    plain = tll.logit_lens(model, words, positions=-1, top_k=1)
    probs = [row["top1_prob"] for row in summary["lens_at_last_position"]]
    assert probs == pytest.approx(expected.top_probs[:, 0, 0].tolist(), abs=1e-4)
    assert probs[0] != pytest.approx(float(plain.top_probs[0, 0, 0]), abs=1e-4)
    import pandas as pd

    table = pd.read_csv(tmp_path / "lens.csv")
    assert set(table["lens"]) == {"tuned"}
    for name in ("lens_heatmap.png", "lens_metrics.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_eval_compares_the_logit_and_the_tuned_lens(demo, tmp_path, capsys):
    model, lens, folder, words = demo
    data = tmp_path / "docs.txt"
    data.write_text("\n".join([words, " ".join(words.split()[2:]), words.split()[0] + " " + words]))
    out_dir = tmp_path / "cmp"
    code, out, err = run(
        capsys, "eval", "--model", "demo", "--data", str(data), "--lens", folder, "--quiet", "--out", str(out_dir)
    )
    assert code == 0, err
    assert "logit" in out and "tuned" in out and "final_post" in out
    for name in ("lens_compare.csv", "lens_compare.json", "lens_compare.png"):
        assert (out_dir / name).stat().st_size > 0
    saved = LensComparison.load(out_dir / "lens_compare.json")
    assert saved.lenses == ["logit", "tuned"]
    texts = data.read_text().splitlines()
    for name, used in (("logit", None), ("tuned", lens)):
        alone = evaluate_lens(model, texts, lens=used, progress=False)
        assert saved[name].n_tokens == alone.n_tokens
        for stat in STATISTICS:
            torch.testing.assert_close(saved[name].mean(stat), alone.mean(stat), atol=1e-6, rtol=1e-6)
    import pandas as pd

    table = pd.read_csv(out_dir / "lens_compare.csv")
    assert table["lens"].tolist() == ["logit"] * 3 + ["tuned"] * 3


def test_lens_errors_are_one_line_exit_2(demo, tmp_path, capsys):
    model, lens, folder, words = demo
    empty = tmp_path / "empty"
    empty.mkdir()
    data = tmp_path / "docs.txt"
    data.write_text(words)
    other = builders.hooked("LN") if HookedTransformer is not None else builders.native_bridge("LN")
    foreign = tmp_path / "foreign"
    tll.TunedLens(other).save(foreign)  # d_model 32; the demo model's is 64
    damaged = tmp_path / "damaged"
    lens.save(damaged)
    (damaged / "params.pt").write_bytes(b"truncated")
    cases = [
        (["lens", "--model", "demo", "--prompt", "red", "--lens", str(tmp_path / "missing")], "no such folder"),
        (["eval", "--model", "demo", "--data", str(data), "--lens", str(tmp_path / "missing")], "no such folder"),
        (["lens", "--model", "demo", "--prompt", "red", "--lens", str(empty)], "holds no config.json"),
        (
            ["lens", "--model", "demo", "--prompt", "red", "--lens", str(foreign)],
            "the lens has d_model=32 but the model has d_model=64",
        ),
        (
            ["eval", "--model", "demo", "--data", str(data), "--quiet", "--lens", str(foreign)],
            "the lens has d_model=32",
        ),
        (["lens", "--model", "demo", "--prompt", "red", "--lens", str(damaged)], "cannot be read as a tensor file"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
