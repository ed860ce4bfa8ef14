"""The command line, run as a user would: outputs written, numbers printed, usage errors in one line."""

import json
import subprocess
import sys

import pytest

import builders
import tl_logitlens as tll
from tl_logitlens.cli import build_parser, main
from tl_logitlens.model_access import TransformerBridge


@pytest.fixture(scope="module")
def words():
    """An induction prompt of the demo model as text, and its last word."""
    model = tll.demo_model()
    tokens = tll.demo.induction_prompt(model, n=8, seed=3)
    text = [model.tokenizer.decode([int(t)]) for t in tokens[0, 1:]]
    return " ".join(text[:-1]), text[-1], text[0]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_demo_writes_every_figure_table_and_summary(tmp_path, capsys):
    code, out, err = run(capsys, "demo", "--out", str(tmp_path))
    assert code == 0, err
    for name in ("lens_heatmap.png", "trajectory.png", "lens_metrics.png", "attribution_components.png",
                 "attribution_heads.png", "attribution_neurons.png", "lens.csv", "attribution_heads.csv", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["residual_error"] < 1e-4
    # The built-in model's mechanism shows: the head writing most of the answer sits in the
    # induction layer, and the final layer predicts the answer.
    assert next(iter(summary["top_heads"])).startswith("L1H")
    assert summary["answer"] != summary["wrong"]
    assert summary["lens_at_last_position"][-1]["top1"] == summary["answer"]
    assert "What each layer predicts" in out and "final_post" in out and "Top heads" in out


def test_lens_and_dla_on_the_demo_model(tmp_path, capsys, words):
    prompt, answer, first = words
    code, out, err = run(capsys, "lens", "--model", "demo", "--prompt", prompt, "--target", answer,
                         "--metric", "rank", "--out", str(tmp_path / "lens"))
    assert code == 0, err
    assert (tmp_path / "lens" / "trajectory.png").exists() and (tmp_path / "lens" / "lens.csv").exists()
    assert f"'{answer}': p=" in out
    code, out, err = run(capsys, "dla", "--model", "demo", "--prompt", prompt, "--answer", answer,
                         "--wrong", first, "--by", "head", "--out", str(tmp_path / "dla"))
    assert code == 0, err
    summary = json.loads((tmp_path / "dla" / "summary.json").read_text())
    assert summary["residual_error"] < 1e-4 and "logit difference" in out


@pytest.mark.skipif(TransformerBridge is None, reason="local HF folders load through TransformerBridge (3.x/4.x)")
def test_local_hugging_face_folder(capsys):
    path = builders.hf_dir("gpt2")
    code, out, err = run(capsys, "dla", "--model", path, "--prompt", "w3 w4 w5", "--answer", "w6", "--by", "neuron")
    assert code == 0, err
    assert "residual error" in out


@pytest.mark.parametrize("argv, message", [
    (["lens", "--model", "./no/such/folder", "--prompt", "x"], "no model directory at './no/such/folder'"),
    (["lens", "--model", "demo", "--prompt", "red", "--metric", "colour"], "invalid choice: 'colour'"),
    (["dla", "--model", "demo", "--prompt", "red", "--answer", "red blue"], "is not a single token"),
    (["dla", "--model", "demo", "--prompt", "red"], "the following arguments are required: --answer"),
])
def test_usage_errors_exit_2_with_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_help_documents_every_option_with_an_example():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        text = sub.format_help()
        assert "example:" in text and f"tl-logitlens {name}" in text, name
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "tl_logitlens", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "tl-logitlens" in done.stdout


def test_real_model_folder(models_dir, capsys):
    if TransformerBridge is None:
        pytest.skip("needs TransformerBridge")
    code, out, err = run(capsys, "lens", "--model", str(models_dir / "stories260k"), "--prompt", "Once upon a time")
    assert code == 0, err
    assert "final_post" in out


def test_eval_on_a_text_file(tmp_path, capsys, words):
    prompt, _, _ = words
    data = tmp_path / "docs.txt"
    data.write_text("\n".join([prompt, prompt + " " + prompt.split()[0], ""]))
    code, out, err = run(capsys, "eval", "--model", "demo", "--data", str(data), "--quiet", "--out", str(tmp_path / "ev"))
    assert code == 0, err
    for name in ("lens_eval.csv", "lens_eval.json", "lens_eval.png"):
        assert (tmp_path / "ev" / name).stat().st_size > 0
    assert "final_post" in out and "tokens" in out
    code, out, err = run(capsys, "eval", "--model", "demo", "--data", str(tmp_path / "missing.txt"))
    assert code == 2 and "no data file" in err
