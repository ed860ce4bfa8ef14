"""train_tuned_lens you can trust (issue 20): no non-finite lens written or returned, settings that cannot
train refused before the first forward pass, nothing to train on is an error, a short last step warns,
and the checkpoint folder is checked before training starts."""

import json
import os
import warnings
from pathlib import Path

import builders
import pytest
import torch

import tl_logitlens as tll
from tl_logitlens import files
from tl_logitlens.errors import LensInputError, NonFiniteActivationError
from tl_logitlens.lenses.training import CHECKPOINT


@pytest.fixture(scope="module")
def model():
    return tll.demo_model()


@pytest.fixture(scope="module")
def tokens(model):
    return torch.cat([tll.demo.induction_prompt(model, seed=s) for s in range(8)])  # 8 x 24 scored tokens


def _finite(state):
    return all(bool(torch.isfinite(v).all()) for v in state.values())


def test_an_overflowing_step_stops_naming_it_and_keeps_the_last_finite_checkpoint(model, tokens, tmp_path):
    # lr=1e30: step 1 is finite (translators ~1e29), step 2 overflows.
    with pytest.raises(
        NonFiniteActivationError, match=r"step 2 of 6 left the translator at \d+_pre .*lr=1e\+30"
    ) as err:
        tll.train_tuned_lens(
            model,
            tokens,
            steps=6,
            tokens_per_step=48,
            lr=1e30,
            checkpoint_dir=tmp_path,
            checkpoint_every=1,
            progress=False,
        )
    assert "The last checkpoint, of step 1, holds the last finite lens" in str(err.value)
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert saved["step"] == 1 and _finite(saved["lens"])
    assert not (tmp_path / "params.pt").exists()  # no lens was saved


def test_an_overflow_in_the_last_step_returns_and_saves_nothing(model, tokens, tmp_path):
    with pytest.raises(NonFiniteActivationError, match="step 2 of 2"):
        tll.train_tuned_lens(
            model, tokens, steps=2, tokens_per_step=48, lr=1e30, checkpoint_dir=tmp_path, progress=False
        )
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "params.pt").exists()
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert saved["step"] == 1 and _finite(saved["lens"])  # the step before: finite


def test_a_lens_passed_in_is_restored_when_a_step_overflows(model, tokens):
    lens = builders.randomise_lens(tll.TunedLens(model), seed=1, scale=0.01)
    with pytest.raises(NonFiniteActivationError, match="was restored to its parameters before that step"):
        tll.train_tuned_lens(model, tokens, steps=4, tokens_per_step=48, lr=1e30, lens=lens, progress=False)
    assert _finite(lens.state_dict())


@pytest.mark.parametrize(
    "setting, match",
    [
        ({"lr": 1e300}, r"lr=1e\+300 cannot train: .*beyond float32's largest number"),
        ({"lr": 1e300, "optimizer": "adam"}, r"lr=1e\+300 cannot train"),
        ({"lr": float("inf")}, "lr must be a positive finite number"),
        ({"lr": float("nan")}, "lr must be a positive finite number"),
        ({"weight_decay": 1e300}, r"weight_decay=1e\+300 cannot train"),
        ({"seed": 2**70}, r"seed must be an int in \[-2\*\*63, 2\*\*64\)"),
    ],
)
def test_settings_that_cannot_train_are_refused_before_the_first_forward_pass(model, tokens, setting, match):
    builders.raises_before_forward(
        model, LensInputError, match, lambda: tll.train_tuned_lens(model, tokens, steps=1, progress=False, **setting)
    )


def test_a_checkpoint_dir_that_cannot_be_used_is_refused_before_training(model, tokens, tmp_path, monkeypatch):
    target = tmp_path / "ro"
    target.mkdir()
    real = os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode: False if Path(p) == target else real(p, mode))
    builders.raises_before_forward(
        model,
        LensInputError,
        "checkpoint_dir: cannot write in",
        lambda: tll.train_tuned_lens(model, tokens, steps=1, checkpoint_dir=target, progress=False),
    )
    monkeypatch.undo()
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt2"}')
    builders.raises_before_forward(
        model,
        LensInputError,
        r"checkpoint_dir: the folder .* holds a file tl_logitlens did not write \(config.json\)",
        lambda: tll.train_tuned_lens(model, tokens, steps=1, checkpoint_dir=hf, progress=False),
    )
    assert (hf / "config.json").read_text() == '{"model_type": "gpt2"}'
    (hf / "notes.txt").write_text("mine")
    (hf / "config.json").unlink()
    tll.train_tuned_lens(model, tokens, steps=1, tokens_per_step=24, checkpoint_dir=hf, overwrite=True, progress=False)
    assert (hf / "notes.txt").read_text() == "mine" and (hf / CHECKPOINT).is_file()


@pytest.mark.parametrize("kind", ["one-token rows", "empty strings"])
def test_nothing_to_train_on_is_an_error_as_in_evaluate_lens(model, tmp_path, kind):
    data = torch.tensor([[1], [5], [7]]) if kind == "one-token rows" else ["", ""]
    with pytest.raises(LensInputError, match="no token was scored"):
        tll.evaluate_lens(model, data, progress=False)
    with pytest.raises(LensInputError, match="no token was scored: every sequence is shorter than two tokens"):
        tll.train_tuned_lens(model, data, steps=3, checkpoint_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder


def test_a_short_last_step_warns_with_the_tokens_seen(model, tokens):
    with pytest.warns(
        UserWarning, match=r"during the last step, 1 of 1 steps \(24 tokens of the 100 planned.*24 of the 100"
    ):
        tll.train_tuned_lens(model, tokens[:1], steps=1, tokens_per_step=100, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a full last step: no warning
        tll.train_tuned_lens(model, tokens[:2], steps=2, tokens_per_step=24, progress=False)


@pytest.mark.filterwarnings("ignore:.*unknown token:UserWarning", "ignore:.*the data ran out:UserWarning")
def test_a_string_that_names_a_file_warns_with_the_path(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("corpus.txt").write_text("red cat sun red cat\n" * 5)
    with pytest.warns(UserWarning, match=r"train_tuned_lens: the text data 'corpus.txt' names an existing file.*open"):
        tll.train_tuned_lens(model, "corpus.txt", steps=1, progress=False)
    with pytest.warns(UserWarning, match=r"compare_lenses: the text data 'corpus.txt' names an existing file"):
        tll.compare_lenses(model, "corpus.txt", progress=False)
    with pytest.warns(UserWarning, match=r"evaluate_lens: the text data \['corpus.txt'\]|evaluate_lens: .*corpus.txt"):
        tll.evaluate_lens(model, ["corpus.txt"], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # text that is not a file name: no warning
        tll.evaluate_lens(model, ["red cat sun red cat"], progress=False)


def test_resuming_a_checkpoint_of_another_model_is_refused(model, tokens, tmp_path):
    tll.train_tuned_lens(model, tokens, steps=2, tokens_per_step=24, checkpoint_dir=tmp_path, progress=False)
    other = tll.demo_model()
    with torch.no_grad():
        for p in other.unembed.parameters():
            if p.ndim == 2:
                p.mul_(1.5)
    builders.raises_before_forward(
        other,
        LensInputError,
        "was made on another model: its unembedding differs",
        lambda: tll.train_tuned_lens(
            other, tokens, steps=2, tokens_per_step=24, checkpoint_dir=tmp_path, progress=False
        ),
    )
    assert json.loads((tmp_path / "tl_logitlens.json").read_text())["unembed_sample"]
