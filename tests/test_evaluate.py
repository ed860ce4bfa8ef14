"""Streaming evaluation: exact against an independent full-logit reference averaged by hand, every input
form, bounded memory."""

import json
import os
import subprocess
import sys
import textwrap
from collections import UserDict
from pathlib import Path

import builders
import pytest
import reference
import torch

import tl_logitlens as tll
from tl_logitlens.errors import LensInputError
from tl_logitlens.evaluate import HIST_BINS_PER_DECADE, STATISTICS, LensEvaluation, evaluate_lens

BIN = 10 ** (1 / HIST_BINS_PER_DECADE) - 1  # relative width of one histogram bin


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


@pytest.fixture(scope="module")
def model():
    return builders.word_model()


def _tokens(n=7, seq=11, seed=2):
    return builders.tokens(batch=n, seq=seq, seed=seed)


def _reference(model, input, norm="recompute"):
    """Per-token statistics from the independent full-logit reference (tests/reference.py, which
    never calls tl_logitlens), flattened over the scored tokens in row-major order. Texts are
    tokenised one by one, so nothing is padded and every position but the last is scored."""
    rows = [input] if isinstance(input, torch.Tensor) else [model.to_tokens(text) for text in input]
    parts = {"kl_to_final": [], "next_token_loss": [], "entropy": [], "top1": [], "next": []}
    for ids in rows:
        ref = reference.lens_reference(model, ids, norm=norm)
        n_layer = ref["entropy"].shape[0]
        parts["kl_to_final"].append(ref["kl"][:, :, :-1].reshape(n_layer, -1))
        parts["next_token_loss"].append(ref["loss"].reshape(n_layer, -1))
        parts["entropy"].append(ref["entropy"][:, :, :-1].reshape(n_layer, -1))
        parts["top1"].append(ref["logits"][:, :, :-1].argmax(-1).reshape(n_layer, -1))
        parts["next"].append(ids[:, 1:].reshape(-1))
    return {
        name: torch.cat(values, dim=-1).double() if name in STATISTICS else torch.cat(values, dim=-1)
        for name, values in parts.items()
    }


def _assert_matches(ev, ref):
    n = ref["next"].shape[0]
    assert ev.n_tokens == n
    for stat in STATISTICS:
        torch.testing.assert_close(ev.mean(stat), ref[stat].mean(1), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ev.minima[stat], ref[stat].min(1).values, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ev.maxima[stat], ref[stat].max(1).values, atol=1e-6, rtol=1e-6)
    assert ev.top1_agree.tolist() == (ref["top1"] == ref["top1"][-1]).sum(1).tolist()
    assert ev.top1_correct.tolist() == (ref["top1"] == ref["next"]).sum(1).tolist()


_KINDS = [c for c in builders.cases() if c.name in ("gpt2", "llama-gqa", "ht-ln", "ht-rms-folded")]


@pytest.mark.parametrize("case", _KINDS, ids=[c.name for c in _KINDS])
@pytest.mark.parametrize("norm", ["recompute", "cached"])
def test_each_kind_of_model_and_norm(case, norm):
    model = builders.build(case)
    tokens = _tokens(n=5, seq=8, seed=3)
    ev = evaluate_lens(model, tokens, batch_size=2, norm=norm, progress=False)
    _assert_matches(ev, _reference(model, tokens, norm=norm))
    assert ev.norm == norm


def test_lens_transform_is_applied_and_kl_stays_against_the_model(model):
    tokens = _tokens(n=4, seq=8, seed=8)
    plain = evaluate_lens(model, tokens, progress=False)
    same = evaluate_lens(model, tokens, lens=lambda vectors, label: vectors.clone(), progress=False)
    for stat in STATISTICS:
        torch.testing.assert_close(same.mean(stat), plain.mean(stat), atol=1e-6, rtol=1e-6)
    n = len(plain.labels)
    scaled = evaluate_lens(model, tokens, norm="none", lens=lambda v, label: v * 2.0, progress=False)
    raw = evaluate_lens(model, tokens, norm="none", progress=False)
    assert not torch.allclose(scaled.mean("entropy"), raw.mean("entropy"))
    assert scaled.mean("kl_to_final")[-1] > 1e-4  # the final entry is doubled, the reference is not
    assert len(scaled.labels) == n


def test_statistics_equal_the_lens_averaged_by_hand_across_batches(model):
    tokens = _tokens()
    ev = evaluate_lens(model, tokens, batch_size=3, progress=False)  # batches of 3, 3, 1
    _assert_matches(ev, _reference(model, tokens))
    assert ev.labels == tll.logit_lens(model, tokens[:1]).labels
    assert ev.n_sequences == 7
    assert ev.top1_agreement[-1] == 1.0
    assert ev.mean("kl_to_final")[-1] <= 1e-6
    torch.testing.assert_close(ev.perplexity, ev.mean("next_token_loss").exp())


def test_padding_is_never_scored(model):
    rng = torch.Generator().manual_seed(5)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(3, 9, (int(k),), generator=rng)) for k in (9, 2, 5, 1, 7)]
    ev = evaluate_lens(model, texts, batch_size=2, progress=False)
    _assert_matches(ev, _reference(model, texts))  # the reference pads all five together
    assert ev.n_tokens == 9 + 2 + 5 + 1 + 7  # BOS + k words: k scored tokens each


def test_quantiles_within_one_bin_of_the_exact_ones(model):
    tokens = _tokens(n=24, seq=20, seed=9)
    ev = evaluate_lens(model, tokens, batch_size=8, progress=False)
    ref = _reference(model, tokens)
    for stat in STATISTICS:
        values = ref[stat].sort(1).values
        n = values.shape[1]
        for q in (0.0, 0.1, 0.5, 0.9, 1.0):
            est = ev.quantile(stat, q)
            lo = values[:, max(0, int(q * (n - 1)) - 1)]
            hi = values[:, min(n - 1, int(q * (n - 1)) + 2)]
            assert bool((est >= lo / (1 + BIN) - 1e-6).all() and (est <= hi * (1 + BIN) + 1e-6).all()), (stat, q)
    assert torch.equal(ev.quantile("entropy", 0.0), ev.minima["entropy"])
    assert torch.equal(ev.quantile("entropy", 1.0), ev.maxima["entropy"])


def test_every_input_form_gives_the_same_numbers(model, tmp_path):
    tokens = _tokens(n=6, seq=9, seed=4)
    tokens[:, 0] = 1  # BOS, as the tokenizer adds it to text
    base = evaluate_lens(model, tokens, batch_size=4, progress=False)

    def same(ev):
        assert ev.n_tokens == base.n_tokens
        for stat in STATISTICS:
            torch.testing.assert_close(ev.mean(stat), base.mean(stat), atol=1e-6, rtol=1e-6)
        assert torch.equal(ev.top1_correct, base.top1_correct)

    path = tmp_path / "tokens.pt"
    torch.save(tokens, path)
    same(evaluate_lens(model, torch.load(path), progress=False))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=4)
    same(evaluate_lens(model, loader, progress=False))
    same(evaluate_lens(model, torch.utils.data.DataLoader(list(tokens), batch_size=5), progress=False))
    same(evaluate_lens(model, ({"input_ids": tokens[i : i + 2]} for i in range(0, 6, 2)), progress=False))
    same(evaluate_lens(model, [UserDict({"input_ids": tokens})], progress=False))  # like a BatchEncoding
    same(evaluate_lens(model, tokens.numpy(), progress=False))
    texts = [" ".join(f"w{int(i)}" for i in row[1:]) for row in tokens]
    same(evaluate_lens(model, texts, batch_size=4, progress=False))
    same(evaluate_lens(model, iter(texts), batch_size=4, progress=False))
    same(evaluate_lens(model, torch.utils.data.DataLoader(texts, batch_size=3), progress=False))
    # an attention mask marks right padding, which is then not scored
    padded = torch.cat([tokens, torch.full((6, 3), 2)], 1)
    mask = torch.cat([torch.ones(6, 9), torch.zeros(6, 3)], 1).long()
    same(evaluate_lens(model, [{"input_ids": padded, "attention_mask": mask}], progress=False))


def test_max_tokens_stops_exactly(model):
    tokens = _tokens(n=6, seq=10, seed=6)
    ev = evaluate_lens(model, tokens, batch_size=2, max_tokens=23, progress=False)
    assert ev.n_tokens == 23 and ev.n_sequences == 3  # 9 + 9 + 5 tokens from the first three rows
    ref = _reference(model, tokens[:3])
    cut = {k: v[..., :23] for k, v in ref.items()}
    _assert_matches(ev, cut)


def test_json_round_trip_and_dataframe(model, tmp_path):
    ev = evaluate_lens(model, _tokens(), batch_size=4, progress=False)
    path = tmp_path / "eval.json"
    ev.save(path)
    back = LensEvaluation.load(path)
    assert back.to_dict() == ev.to_dict()
    assert json.loads(path.read_text())["format"].startswith("tl_logitlens.LensEvaluation")
    for stat in STATISTICS:
        assert torch.equal(back.sums[stat], ev.sums[stat])
        assert torch.equal(back.histograms[stat], ev.histograms[stat])
        assert torch.equal(back.quantile(stat, 0.5), ev.quantile(stat, 0.5))
    frame = ev.to_dataframe()
    assert list(frame["layer"]) == ev.labels
    assert frame["kl_to_final_mean"].tolist() == ev.mean("kl_to_final").tolist()
    assert frame["next_token_loss_q50"].tolist() == ev.quantile("next_token_loss", 0.5).tolist()
    assert frame["top1_accuracy"].tolist() == ev.top1_accuracy.tolist()
    assert (frame["n_tokens"] == ev.n_tokens).all()
    with pytest.raises(LensInputError, match="not a saved LensEvaluation"):
        LensEvaluation.from_dict({"format": "something else"})


def test_plot_draws_one_curve_per_statistic(model):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    ev = evaluate_lens(model, _tokens(), progress=False)
    fig = ev.plot()
    from tl_logitlens.plots.style import METRIC_STYLE

    # shown with the names every figure uses for these statistics (plot_lens_metrics too)
    assert [line.get_label() for line in fig.axes[0].lines[:3]] == [METRIC_STYLE[s].name for s in STATISTICS]
    assert fig.axes[0].lines[0].get_ydata().tolist() == pytest.approx(ev.mean("kl_to_final").tolist())


def test_progress_bar_reports_tokens_per_second(model, capsys):
    evaluate_lens(model, _tokens(), batch_size=4, progress=True)
    assert "tok/s" in capsys.readouterr().err
    evaluate_lens(model, _tokens(), batch_size=4, progress=False)
    assert capsys.readouterr().err == ""


def test_bad_inputs_are_refused_clearly(model, monkeypatch):
    cases = [
        (torch.empty(0, 5, dtype=torch.long), "data is empty"),
        (iter([]), "data is empty"),
        (torch.rand(2, 5), "integer token ids"),
        ([torch.rand(2, 5)], "integer token ids"),
        (torch.ones(2, 3, 4, dtype=torch.long), r"shaped \[batch, seq\]"),
        (42, "data must be token ids"),
        ([{"ids": torch.ones(1, 3, dtype=torch.long)}], "input_ids"),
        ([object()], "each batch must be"),
        (torch.full((1, 4), 10_000), r"must lie in \[0,"),
    ]
    for data, message in cases:
        with pytest.raises(LensInputError, match=message):
            evaluate_lens(model, data, progress=False)
    for kwargs, message in [
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"max_tokens": 0}, "max_tokens must be a positive int"),
        ({"norm": "bogus"}, "norm must be one of"),
        ({"lens": 3}, "lens must be a callable"),
    ]:
        with pytest.raises(LensInputError, match=message):
            evaluate_lens(model, _tokens(), progress=False, **kwargs)
    with pytest.raises(LensInputError, match="shorter than two tokens"):
        evaluate_lens(model, torch.ones(3, 1, dtype=torch.long), progress=False)
    left = {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.tensor([[0, 1, 1, 1]])}
    with pytest.raises(LensInputError, match="right-padded"):
        evaluate_lens(model, [left], progress=False)
    monkeypatch.setattr(model, "tokenizer", None)
    with pytest.raises(LensInputError, match="no tokenizer"):
        evaluate_lens(model, ["w3 w4"], progress=False)
    with pytest.raises(LensInputError, match="no tokenizer"):
        evaluate_lens(model, iter(["w3 w4"]), progress=False)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import ctypes, gc, sys, torch
    sys.path.insert(0, {tests!r})
    import builders
    from tl_logitlens.evaluate import evaluate_lens

    torch.set_num_threads(1)
    model = builders.hf_bridge("gpt2") if builders.TransformerBridge else builders.hooked()

    def kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])

    def peak_added(n_batches):
        gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = kib("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")
        batches = (builders.tokens(batch=64, seq=24, seed=i) for i in range(n_batches))
        ev = evaluate_lens(model, batches, progress=False)
        assert ev.n_tokens == n_batches * 64 * 23
        return kib("VmHWM") - base

    peak_added(2)  # warm up: first-call allocations
    print(peak_added(2), peak_added(40), peak_added(2))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_memory_is_flat_in_the_number_of_batches():
    script = _MEMORY_SCRIPT.format(tests=str(Path(__file__).parent))
    root = str(Path(__file__).resolve().parent.parent)
    # A fixed mmap threshold and one malloc arena keep the allocator's own slack (about 5 MiB
    # of noise otherwise) below what a leak of per-token results would add over 38 batches.
    env = {
        **os.environ,
        "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_ARENA_MAX": "1",
    }
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    if "Permission denied" in done.stderr or "clear_refs" in done.stderr:
        pytest.skip("the peak-RSS reset is not allowed here")
    assert done.returncode == 0, done.stderr[-2000:]
    two, forty, two_again = (int(x) for x in done.stdout.split()[-3:])
    # Twenty times the batches, the same peak (KiB): nothing accumulates between batches.
    # (Keeping only the per-token statistics of every batch would add about 3.8 MiB here.)
    assert forty <= max(two, two_again) + 2048, (two, forty, two_again)


# -- a real trained model -------------------------------------------------------------------------
def _sample(model, n, length, seed):
    """``n`` sequences of ``length`` tokens sampled from the model itself, from BOS."""
    gen = torch.Generator().manual_seed(seed)
    bos = model.tokenizer.bos_token_id
    tokens = torch.full((n, 1), bos, dtype=torch.long)
    with torch.no_grad():
        for _ in range(length - 1):
            probs = torch.softmax(model(tokens)[:, -1].double(), -1)
            tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=gen)], 1)
    return tokens


def test_stories260k_final_entry_is_the_model_itself(models_dir):
    if builders.TransformerBridge is None:
        pytest.skip("the real models boot through TransformerBridge (3.x/4.x)")
    model = builders.TransformerBridge.boot_transformers(str(models_dir / "stories260k"), device="cpu").eval()
    tokens = _sample(model, n=6, length=40, seed=0)
    ev = evaluate_lens(model, tokens, batch_size=4, progress=False)
    with torch.no_grad():
        logits = model(tokens)
    own = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(), tokens[:, 1:].reshape(-1)
    )
    assert ev.mean("kl_to_final")[-1] <= 1e-5
    assert abs(float(ev.mean("next_token_loss")[-1]) - float(own)) <= 1e-4
    assert ev.top1_agreement[-1] == 1.0
    assert ev.mean("next_token_loss")[-1] < ev.mean("next_token_loss")[0]  # a trained model improves with depth

    # The same text, re-tokenised as strings: padded batches, padding excluded from the loss.
    texts = [model.tokenizer.decode(row[1:]) for row in tokens]
    ev_text = evaluate_lens(model, texts, batch_size=4, progress=False)
    tok = tll.logit_lens(model, texts[:1], top_k=1)  # tokenisation check: same path as evaluate_lens
    assert tok.input_ids.shape[0] == 1
    from tl_logitlens.inputs import tokenize
    from tl_logitlens.model_access import view

    batch = tokenize(view(model), texts)
    with torch.no_grad():
        logits = model(batch.ids)
    keep = torch.arange(batch.ids.shape[1] - 1).unsqueeze(0) < (batch.lengths - 1).unsqueeze(1)
    own = torch.nn.functional.cross_entropy(logits[:, :-1][keep].double(), batch.ids[:, 1:][keep])
    assert ev_text.n_tokens == int(keep.sum())
    assert ev_text.mean("kl_to_final")[-1] <= 1e-5
    assert abs(float(ev_text.mean("next_token_loss")[-1]) - float(own)) <= 1e-4
