"""train_tuned_lens: one step against plain autograd, exact token accounting, kill-and-resume,
non-finite losses, half precision, and the tuned lens beating the logit lens on a real model."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import builders
import pytest
import reference
import torch

import tl_logitlens as tll
from tl_logitlens.errors import LensInputError, NonFiniteActivationError
from tl_logitlens.lenses.training import CHECKPOINT
from tl_logitlens.lenses.training.batches import MicroBatch

ROOT = Path(__file__).resolve().parents[1]
_STEP_KINDS = [c for c in builders.cases() if c.name in ("gpt2", "llama-gqa", "ht-ln", "ht-rms")]


def _random_lens(model, seed=0, scale=0.1):
    lens = tll.TunedLens(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen))
    return lens


def _norm_eps(model):
    ln = model.ln_final
    inner = getattr(ln, "original_component", None) or ln
    for name in ("eps", "variance_epsilon"):
        if getattr(inner, name, None) is not None:
            return float(getattr(inner, name))
    return float(model.cfg.eps)


def _reference_step(model, tokens, start, loss, lr=1.0, weight_decay=1e-3):
    """One SGD step of the tuned-lens objective with full float64 logits and plain autograd.

    Independent of tl_logitlens: the model's own cache, the final norm written out from the
    module's parameters, log_softmax over the whole vocabulary, then torch's clip formula and
    the first step of Nesterov SGD (buffer = gradient) written out by hand.
    """
    n = model.cfg.n_layers
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    weight, bias = reference.norm_affine(model)
    eps = _norm_eps(model)
    centre = str(model.cfg.normalization_type).startswith("LN")

    def norm(x):
        if centre:
            x = x - x.mean(-1, keepdim=True)
        x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        if weight is not None:
            x = x * weight.double()
        if bias is not None:
            x = x + bias.double()
        return x

    W = model.W_U.detach().double()
    b_U = model.b_U.detach().double() if getattr(model, "b_U", None) is not None else 0
    rows = lambda t: t[:, :-1].reshape(-1, t.shape[-1]).double()  # noqa: E731
    final = rows(cache[f"blocks.{n - 1}.hook_resid_post"])
    log_p = torch.log_softmax(norm(final) @ W + b_U, -1)
    next_ids = tokens[:, 1:].reshape(-1)
    params = {k: v.detach().double().clone().requires_grad_(True) for k, v in start.items()}
    total = 0
    for layer in range(n):
        h = rows(cache[f"blocks.{layer}.hook_resid_pre"])
        A, c = params[f"translators.{layer}_pre.weight"], params[f"translators.{layer}_pre.bias"]
        log_q = torch.log_softmax(norm(h + h @ A.T + c) @ W + b_U, -1)
        if loss == "kl":
            per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
        else:
            per_token = -log_q.gather(-1, next_ids[:, None])[:, 0]
        total = total + per_token.mean()
    total.backward()
    grads = {k: p.grad for k, p in params.items()}
    grad_norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
    coef = min(1.0, 1.0 / (float(grad_norm) + 1e-6))
    momentum = 0.9
    out = {}
    for k, p in params.items():
        g = grads[k] * coef + weight_decay * p.detach()
        out[k] = p.detach() - lr * (1 - momentum) * (g + momentum * g)  # Nesterov, first step: buffer = g
    return out


@pytest.mark.parametrize("loss", ["kl", "ce"])
@pytest.mark.parametrize("case", _STEP_KINDS, ids=[c.name for c in _STEP_KINDS])
def test_one_step_equals_plain_autograd_in_float64(case, loss):
    """Micro-batches of 2 sequences, the step's tokens counted exactly: one step of ours moves the
    translators as the full-logit float64 reference does, within 1e-6."""
    model = builders.build(case)
    tokens = builders.tokens(batch=3, seq=9, seed=7)
    start = {k: v.detach().clone() for k, v in _random_lens(model).state_dict().items()}
    expected = _reference_step(model, tokens, start, loss)
    lens = _random_lens(model)
    trained = tll.train_tuned_lens(
        model, tokens, steps=1, tokens_per_step=3 * 8, batch_size=2, loss=loss, lens=lens, progress=False
    )
    assert trained is lens
    worst = moved = 0.0
    for k, v in trained.state_dict().items():
        moved = max(moved, float((expected[k] - start[k].double()).abs().max()))
        worst = max(worst, float((v.double() - expected[k]).abs().max()))
    assert moved > 1e-3  # the step did something to compare
    assert worst < 1e-6, (worst, moved)


def _pairs(batch):
    return [(int(batch.ids[r, p]), int(batch.ids[r, p + 1])) for r, p in batch.mask().nonzero().tolist()]


@pytest.mark.parametrize("budget", [1, 3, 9, 10, 12, 17])
def test_a_cut_batch_scores_every_pair_exactly_once(budget):
    ids = torch.arange(40).view(4, 10)
    batch = MicroBatch(ids, torch.tensor([10, 3, 1, 7]))
    seen, rest = [], batch
    while rest is not None:
        head, rest = rest.split(budget) if rest.scored() > budget else (rest, None)
        assert head.scored() <= budget and (rest is None or head.scored() == budget)
        seen += _pairs(head)
    assert seen == _pairs(batch) and len(seen) == 17


def test_micro_batching_does_not_change_the_lens():
    """Steps of 20 tokens cut sequences in two; the cut rows keep their context, so one sequence
    per forward pass or four give the same lens (the loss is a mean over the step's tokens)."""
    model = tll.demo_model()
    tokens = torch.cat([tll.demo.induction_prompt(model, n=5, seed=s) for s in range(6)])  # 6 x 10 scored
    one = tll.train_tuned_lens(model, tokens, steps=3, tokens_per_step=20, batch_size=1, progress=False)
    four = tll.train_tuned_lens(model, tokens, steps=3, tokens_per_step=20, batch_size=4, progress=False)
    for (k, a), (_, b) in zip(one.state_dict().items(), four.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)


def test_running_out_of_data_warns_with_steps_and_tokens(tmp_path):
    model = tll.demo_model()
    tokens = torch.cat([tll.demo.induction_prompt(model, n=5, seed=s) for s in range(5)])  # 50 scored tokens
    with pytest.warns(
        UserWarning, match=r"ran out after 3 of 10 steps \(50 tokens of the 200 planned; the last step was partial\)"
    ):
        lens = tll.train_tuned_lens(
            model, tokens, steps=10, tokens_per_step=20, progress=False, checkpoint_dir=tmp_path
        )
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert (saved["step"], saved["tokens_seen"]) == (3, 50)
    loaded = tll.TunedLens.load(tmp_path, model)
    for (k, a), (_, b) in zip(lens.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    import tl_logitlens as tll
    sys.path.insert(0, {tests!r})
    from test_train import demo_data

    def slow():
        for batch in demo_data():
            time.sleep(0.3)  # room for the test to kill the run between checkpoints
            yield batch

    tll.train_tuned_lens(tll.demo_model(), slow(), steps=12, tokens_per_step=30, batch_size=2,
                         checkpoint_dir={folder!r}, checkpoint_every=2, progress=False)
    print("finished")
""")


def demo_data():
    """Batches of 2 demo-model induction prompts (24 scored tokens each), deterministic."""
    model = tll.demo_model()
    for i in range(16):
        yield torch.cat([tll.demo.induction_prompt(model, n=6, seed=2 * i + j) for j in range(2)])


def test_a_killed_run_resumes_to_the_uninterrupted_lens(tmp_path):
    folder = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT.format(tests=str(ROOT / "tests"), folder=str(folder))],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    killed_at = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (folder / CHECKPOINT).is_file():
                step = torch.load(folder / CHECKPOINT, weights_only=True)["step"]
                if step >= 4:
                    proc.send_signal(signal.SIGKILL)
                    killed_at = step
                    break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate()
    assert killed_at is not None, f"the run was not killed mid-way: {out.decode()[-300:]} {err.decode()[-2000:]}"
    assert b"finished" not in out
    step = torch.load(folder / CHECKPOINT, weights_only=True)["step"]
    assert 4 <= step < 12 and not (folder / "params.pt").exists()

    model = tll.demo_model()
    with builders.CountForwards(model) as counter:
        resumed = tll.train_tuned_lens(
            model,
            demo_data(),
            steps=12,
            tokens_per_step=30,
            batch_size=2,
            checkpoint_dir=folder,
            checkpoint_every=2,
            progress=False,
        )
    with builders.CountForwards(model) as full:
        whole = tll.train_tuned_lens(model, demo_data(), steps=12, tokens_per_step=30, batch_size=2, progress=False)
    assert 0 < counter.calls < full.calls  # it continued, it did not start again
    for (k, a), (_, b) in zip(resumed.state_dict().items(), whole.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)
    assert torch.load(folder / CHECKPOINT, weights_only=True)["step"] == 12
    # A finished run resumed again returns its lens without a forward pass.
    with builders.CountForwards(model) as counter:
        again = tll.train_tuned_lens(
            model,
            demo_data(),
            steps=12,
            tokens_per_step=30,
            batch_size=2,
            checkpoint_dir=folder,
            checkpoint_every=2,
            progress=False,
        )
    assert counter.calls == 0
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), resumed.state_dict().values()))


def test_resuming_with_other_settings_is_refused_before_any_forward(tmp_path):
    model = tll.demo_model()
    tokens = torch.cat([tll.demo.induction_prompt(model, n=5, seed=s) for s in range(4)])
    tll.train_tuned_lens(model, tokens, steps=2, tokens_per_step=20, progress=False, checkpoint_dir=tmp_path)
    for change, name in (
        ({"tokens_per_step": 10}, "tokens_per_step"),
        ({"loss": "ce"}, "loss"),
        ({"steps": 3}, "steps"),
    ):
        kwargs = dict(steps=2, tokens_per_step=20, progress=False, checkpoint_dir=tmp_path)
        kwargs.update(change)
        builders.raises_before_forward(
            model,
            LensInputError,
            f"other settings.*{name}: checkpoint",
            lambda: tll.train_tuned_lens(model, tokens, **kwargs),
        )
    other = builders.build(_STEP_KINDS[0])  # another model shape: d_model 32, not 64
    builders.raises_before_forward(
        other,
        LensInputError,
        "d_model: checkpoint 64, now 32",
        lambda: tll.train_tuned_lens(
            other, builders.tokens(), steps=2, tokens_per_step=20, progress=False, checkpoint_dir=tmp_path
        ),
    )
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    builders.raises_before_forward(
        model,
        LensInputError,
        "not a readable training checkpoint",
        lambda: tll.train_tuned_lens(
            model, tokens, steps=2, tokens_per_step=20, progress=False, checkpoint_dir=tmp_path
        ),
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"steps": 0}, "steps must be a positive int"),
        ({"tokens_per_step": 2.5}, "tokens_per_step must be a positive int"),
        ({"optimizer": "lbfgs"}, "optimizer must be"),
        ({"loss": "mse"}, "loss must be"),
        ({"lr": float("nan")}, "lr must be a positive finite number"),
        ({"lens": tll.LogitLens()}, "lens must be a TunedLens"),
    ],
)
def test_bad_arguments_are_refused_before_any_forward(kwargs, match):
    model = tll.demo_model()
    tokens = tll.demo.induction_prompt(model)
    builders.raises_before_forward(
        model, LensInputError, match, lambda: tll.train_tuned_lens(model, tokens, progress=False, **kwargs)
    )


class _Poisoned(tll.TunedLens):
    """A lens whose 1_pre translator returns NaN from the given forward call on."""

    def __init__(self, model, after):
        super().__init__(model)
        self.calls, self.after = 0, after

    def transform(self, h, label):
        out = super().transform(h, label)
        if label == "1_pre":
            self.calls += 1
            if self.calls > self.after:
                out = out * float("nan")
        return out


def test_a_non_finite_loss_stops_naming_the_entry_and_step_and_keeps_the_checkpoint(tmp_path):
    model = tll.demo_model()
    tokens = torch.cat([tll.demo.induction_prompt(model, n=5, seed=s) for s in range(8)])  # 10 scored tokens each
    lens = _Poisoned(model, after=4)  # steps of 20 tokens, one sequence per micro-batch: step 3 goes NaN
    with pytest.raises(NonFiniteActivationError, match=r"loss at 1_pre is not finite at step 3 \(after 40 tokens"):
        tll.train_tuned_lens(
            model,
            tokens,
            steps=4,
            tokens_per_step=20,
            batch_size=1,
            checkpoint_every=1,
            checkpoint_dir=tmp_path,
            lens=lens,
            progress=False,
        )
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert saved["step"] == 2 and all(bool(torch.isfinite(v).all()) for v in saved["lens"].values())
    assert not (tmp_path / "params.pt").exists()
    # A translator that is already inf: stopped at step 1, naming it.
    bad = tll.TunedLens(model)
    with torch.no_grad():
        bad.translators["0_pre"].bias.fill_(float("inf"))
    with pytest.raises(NonFiniteActivationError, match=r"loss at 0_pre is not finite at step 1"):
        tll.train_tuned_lens(model, tokens, steps=1, tokens_per_step=20, lens=bad, progress=False)


_HALF = [c for c in builders.precision_cases((torch.bfloat16,)) if not c.folded][:1]


@pytest.mark.parametrize("case", _HALF, ids=[c.name for c in _HALF])
def test_a_bfloat16_model_trains_in_float32(case):
    model = builders.build(case)
    tokens = builders.tokens(batch=8, seq=12, seed=3)
    before = tll.evaluate_lens(model, tokens, progress=False).mean("kl_to_final")
    lens = tll.train_tuned_lens(model, tokens, steps=4, tokens_per_step=22, batch_size=4, progress=False)
    assert all(p.dtype == torch.float32 for p in lens.parameters())
    after = tll.evaluate_lens(model, tokens, lens=lens, progress=False).mean("kl_to_final")
    assert bool((after[:-1] < before[:-1]).all()), (before, after)


def test_stories_tuned_lens_beats_the_logit_lens_on_held_out_text(models_dir):
    """On text stories260k writes itself (40 sequences to train on, 8 held out): the tuned lens's
    KL to the final distribution is below the logit lens's at every entry, by far at 0_pre."""
    TransformerBridge = pytest.importorskip("transformer_lens.model_bridge").TransformerBridge
    model = TransformerBridge.boot_transformers(str(models_dir / "stories260k"), device="cpu").eval()
    text = builders.sampled_tokens(model, 48, 96, seed=0)
    train, held = text[:40], text[40:]
    lens = tll.train_tuned_lens(model, train, steps=29, tokens_per_step=128, batch_size=8, progress=False)
    logit = tll.evaluate_lens(model, held, progress=False).mean("kl_to_final")[:-1]
    tuned = tll.evaluate_lens(model, held, lens=lens, progress=False).mean("kl_to_final")[:-1]
    assert bool((tuned < logit).all()), (logit, tuned)
    assert float(logit[0]) > 15 and float(tuned[0]) < float(logit[0]) / 3, (logit, tuned)


def test_incl_mid_trains_the_mid_entries_and_saves_them(tmp_path):
    model = tll.demo_model()
    tokens = torch.cat([tll.demo.induction_prompt(model, n=5, seed=s) for s in range(4)])
    lens = tll.train_tuned_lens(
        model, tokens, steps=2, tokens_per_step=20, incl_mid=True, checkpoint_dir=tmp_path, progress=False
    )
    assert lens.labels == ["0_pre", "0_mid", "1_pre", "1_mid"]
    assert all(float(lens.translators[label].bias.detach().abs().max()) > 0 for label in lens.labels)
    loaded = tll.TunedLens.load(tmp_path, model)
    assert loaded.incl_mid and all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), lens.state_dict().values())
    )


def test_adam_takes_tuned_lens_first_step():
    """Adam's first step moves every parameter with a gradient by exactly its learning rate
    (m / sqrt(v) = sign(g) after bias correction): lr * 1e-3, tuned-lens's Adam scale."""
    model = tll.demo_model()
    tokens = torch.cat([tll.demo.induction_prompt(model, n=5, seed=s) for s in range(2)])
    lens = tll.train_tuned_lens(model, tokens, steps=1, tokens_per_step=20, optimizer="adam", lr=2.0, progress=False)
    moved = torch.cat([p.detach().abs().flatten() for p in lens.parameters()])
    assert float(moved.max()) == pytest.approx(2e-3, rel=1e-4)
    assert float((moved > 1.9e-3).float().mean()) > 0.9
