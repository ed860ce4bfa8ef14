"""`tl-logitlens train-lens`: the lens it writes, resuming, and usage errors in one line."""

import json

import pytest
import torch

import tl_logitlens as tll
from tl_logitlens.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    model = tll.demo_model()
    tokens = torch.cat([tll.demo.induction_prompt(model, n=6, seed=s) for s in range(8)])  # 8 x 12 scored
    path = tmp_path_factory.mktemp("data") / "tokens.pt"
    torch.save(tokens, path)
    return path, tokens


def test_train_lens_writes_the_lens_the_api_trains(tmp_path, capsys, token_file):
    path, tokens = token_file
    out_dir = tmp_path / "lens"
    code, out, err = run(
        capsys,
        "train-lens",
        "--model",
        "demo",
        "--data",
        str(path),
        "--steps",
        "4",
        "--tokens-per-step",
        "24",
        "--batch-size",
        "2",
        "--out",
        str(out_dir),
        "--quiet",
    )
    assert code == 0, err
    assert "Trained 2 translators for 4 steps on 96 tokens" in out
    assert json.loads((out_dir / "config.json").read_text())["lens_type"] == "linear_tuned_lens"
    model = tll.demo_model()
    loaded = tll.TunedLens.load(out_dir, model)
    expected = tll.train_tuned_lens(model, tokens, steps=4, tokens_per_step=24, batch_size=2, progress=False)
    for (k, a), (_, b) in zip(loaded.state_dict().items(), expected.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)
    # Again without --resume: refused, the checkpoint untouched; with it, the finished run is kept.
    code, out, err = run(
        capsys,
        "train-lens",
        "--model",
        "demo",
        "--data",
        str(path),
        "--steps",
        "4",
        "--tokens-per-step",
        "24",
        "--batch-size",
        "2",
        "--out",
        str(out_dir),
        "--quiet",
    )
    assert code == 2 and "holds a training checkpoint; pass --resume" in err and len(err.strip().splitlines()) == 1
    code, out, err = run(
        capsys,
        "train-lens",
        "--model",
        "demo",
        "--data",
        str(path),
        "--steps",
        "4",
        "--tokens-per-step",
        "24",
        "--batch-size",
        "2",
        "--out",
        str(out_dir),
        "--quiet",
        "--resume",
    )
    assert code == 0 and "for 4 steps on 96 tokens" in out
    code, out, err = run(
        capsys,
        "train-lens",
        "--model",
        "demo",
        "--data",
        str(path),
        "--steps",
        "5",
        "--tokens-per-step",
        "24",
        "--out",
        str(out_dir),
        "--quiet",
        "--resume",
    )
    assert code == 2 and "other settings" in err and "steps: checkpoint 4, now 5" in err
    assert len(err.strip().splitlines()) == 1
    # In the command line's words: flags, not Python keywords.
    assert "--steps: checkpoint 4, now 5" in err and "--resume" in err and "another --out" in err
    assert "resume=False" not in err and "checkpoint_dir" not in err
    (out_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    code, out, err = run(
        capsys,
        "train-lens",
        "--model",
        "demo",
        "--data",
        str(path),
        "--steps",
        "4",
        "--tokens-per-step",
        "24",
        "--out",
        str(out_dir),
        "--quiet",
        "--resume",
    )
    assert code == 2 and "not a readable training checkpoint" in err and "another --out, or delete" in err
    assert "resume=False" not in err and len(err.strip().splitlines()) == 1


def test_train_lens_shows_a_progress_bar_with_tokens_per_second_and_loss(tmp_path, capsys, token_file):
    path, _ = token_file
    code, out, err = run(
        capsys,
        "train-lens",
        "--model",
        "demo",
        "--data",
        str(path),
        "--steps",
        "2",
        "--tokens-per-step",
        "24",
        "--out",
        str(tmp_path / "lens"),
        "--loss",
        "ce",
    )
    assert code == 0, err
    assert "tok/s" in err and "loss" in err and "step 2/2" in err


def test_train_lens_usage_errors_are_one_line_exit_2(tmp_path, capsys, token_file):
    path, _ = token_file
    existing = tmp_path / "a_file"
    existing.write_text("x")
    cases = [
        (["--data", str(path), "--steps", "0"], "--steps 0: give a positive number"),
        (["--data", str(path), "--tokens-per-step", "-5"], "--tokens-per-step -5: give a positive number"),
        (["--data", str(tmp_path / "missing.pt")], "no data file"),
        (["--data", str(path), "--out", str(existing)], "is an existing file, not a folder"),
        (["--data", str(path), "--loss", "mse"], "invalid choice"),
    ]
    for argv, match in cases:
        code, out, err = run(capsys, "train-lens", "--model", "demo", *argv)
        assert code == 2 and match in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
