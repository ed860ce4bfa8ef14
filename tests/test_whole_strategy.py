"""The CUDA strategy's pieces, run here on the CPU through the same code.

On CUDA the kernel takes one product over the whole vocabulary (:func:`tl_logitlens.kernel.tiles.read_whole`):

- a half-precision ``W_U`` is read in its own dtype, the normalised vectors rounded to it,
  with float32 accumulation, logits and statistics (:func:`tl_logitlens.kernel.tuning.half_products`).
  ``force(half_products=True)`` sends the CPU through the same code, whose numbers must equal
  float64 statistics of the *rounded* vectors (tests/reference.py rounds them itself) and
  differ from the float32 reading by the rounding, so a path that skipped it fails;
- the sums and ranks are one set of reductions that ``torch.compile`` fuses (compiled here for
  the CPU too);
- top-k comes from block maxima (:func:`tl_logitlens.kernel.tiles.block_top_k`).
"""

import builders
import pytest
import reference
import torch
from test_kernel import _direct_stats

import tl_logitlens as tll
from tl_logitlens.kernel import tiles, tuning

HALF = [torch.bfloat16, torch.float16]
TOKENS = builders.tokens(batch=2, seq=9)


def test_policy_is_cuda_only_unless_forced(monkeypatch):
    monkeypatch.delenv("TL_LOGITLENS_HALF_PRODUCTS", raising=False)
    W = torch.zeros(4, 8, dtype=torch.bfloat16)
    assert not tuning.half_products(W) and not tuning.half_products(W.half())
    with tuning.force(half_products=True):
        assert tuning.half_products(W) and tuning.half_products(W.half())
        assert not tuning.half_products(W.float()) and not tuning.half_products(W.double())
        with tuning.force(half_products=False):
            assert not tuning.half_products(W)
        assert tuning.half_products(W)  # the inner block restored the outer setting
    monkeypatch.setenv("TL_LOGITLENS_HALF_PRODUCTS", "1")
    assert tuning.half_products(W)
    with tuning.force(half_products=False):  # force beats the environment
        assert not tuning.half_products(W)
    monkeypatch.setenv("TL_LOGITLENS_HALF_PRODUCTS", "0")
    assert not tuning.half_products(W)
    monkeypatch.setenv("TL_LOGITLENS_HALF_PRODUCTS", "yes")
    with pytest.raises(ValueError, match="TL_LOGITLENS_HALF_PRODUCTS must be 0 .* got 'yes'"):
        tuning.half_products(W)
    assert not tuning.half_products(W.float())  # a float32 W_U has no half products to choose
    with pytest.raises(ValueError, match="half_products must be True, False or None"):
        with tuning.force(half_products="yes"):
            pass


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_whole_product_accumulates_and_writes_float32(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 512, generator=gen).to(dtype)
    W = (torch.randn(512, 3 * tiles.WHOLE_CAST_COLUMNS // 2, generator=gen) * 0.05).to(dtype)
    want = x.double() @ W.double()
    got = tiles.whole_product(x, W, torch.empty(9, W.shape[1]))
    assert got.dtype == torch.float32
    scale = (x.double().abs() @ W.double().abs()).max().item()
    err = (got.double() - want).abs().max().item()
    # float32 accumulation of exact products; a half-precision output would be off by ~1e-3 * scale
    rounded_out = (torch.mm(x, W).double() - want).abs().max().item()
    assert err <= 1e-6 * scale < rounded_out, (err, rounded_out, scale)


@pytest.mark.parametrize("cap", [0.0, 3.0], ids=["plain", "soft-capped"])
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_read_whole_on_half_vectors_is_exact_for_the_rounded_vectors(dtype, cap):
    gen = torch.Generator().manual_seed(5)
    g, n, d, V = 3, 7, 64, 1000
    x = torch.randn(g * n, d, generator=gen).to(dtype)
    W = (torch.randn(d, V, generator=gen) * 0.5).to(dtype)
    b = torch.randn(V, generator=gen) * 0.1
    nxt = torch.randint(0, V, (n,), generator=gen)
    nxt[::3] = -1
    tid = torch.randint(0, V, (n, 2), generator=gen)

    def transform(t):
        return cap * torch.tanh(t / cap)

    transform.elementwise = True
    bufs = [torch.empty(g * n * V) for _ in range(3)]
    got = tiles.read_whole(
        x, g, W, b, transform if cap else None, bufs, top_k=4, with_reference=True, next_tokens=nxt, target_ids=tid
    )
    assert got.entropy.dtype == torch.float32
    want = _direct_stats(x, W, b, cap, g, nxt, tid)
    for name, value in want.items():
        torch.testing.assert_close(getattr(got, name).double(), value, atol=2e-4, rtol=1e-5, msg=name)


def _sums_cases():
    gen = torch.Generator().manual_seed(2)
    for g, n, V, ref, t in ((3, 5, 777, True, 2), (2, 4, 1001, False, 0)):
        logits = torch.randn(g, n, V, generator=gen) * 4
        thresholds = logits[..., :t] if t else None  # some logits' own values: ties count as not above
        yield logits, logits.amax(-1), ref, thresholds


def test_fused_sums_equal_the_eager_buffers_and_float64():
    for logits, peak, ref, thresholds in _sums_cases():
        g, n, V = logits.shape
        bufs = [torch.empty(g * n * V) for _ in range(3)]
        fused = tiles.whole_sums(logits, peak, ref, thresholds)
        eager = tiles._eager_sums(logits.clone(), peak, ref, thresholds, bufs)
        s = (logits - peak.unsqueeze(-1)).double()
        e = s.exp()
        want = [e.sum(-1), (e * s).sum(-1), (e[:1] * s).sum(-1) if ref else None, None]
        if thresholds is not None:
            want[3] = (logits.double().unsqueeze(-2) > thresholds.double().unsqueeze(-1)).sum(-1)
        for a, b_, w in zip(fused, eager, want):
            if w is None:
                assert a is None and b_ is None
                continue
            torch.testing.assert_close(a.double(), w.double(), atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(b_.double(), w.double(), atol=1e-4, rtol=1e-5)


def _stats64(logits, tokens):
    """Entropy, KL to the last entry, next-token loss and top-4 logits from float64 ``[layer, batch, pos, V]``."""
    logp = torch.log_softmax(logits, -1)
    nxt = tokens[:, 1:].unsqueeze(0).unsqueeze(-1).expand(logits.shape[0], -1, -1, 1)
    return {
        "entropy": -(logp.exp() * logp).sum(-1),
        "kl_to_final": (logp[-1].exp() * (logp[-1] - logp)).sum(-1),
        "next_token_loss": -logp[:, :, :-1].gather(-1, nxt)[..., 0],
        "top_logits": logits.topk(4, dim=-1).values,
    }


def _reading(result):
    return {
        "entropy": result.entropy.double(),
        "kl_to_final": result.kl_to_final.double(),
        "next_token_loss": result.next_token_loss[:, :, :-1].double(),
        "top_logits": result.top_logits.double(),
    }


def _worst(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


# One bfloat16 and one float16 model (a GPT-2 or folded-LN one, a Llama or RMS one).
HALF_MODELS = builders.precision_cases((torch.bfloat16,))[:1] + builders.precision_cases((torch.float16,))[-1:]


@pytest.mark.parametrize("strategy", ["whole", "tiled"])
@pytest.mark.parametrize("case", HALF_MODELS, ids=[c.name for c in HALF_MODELS])
def test_half_products_read_the_rounded_vectors_through_every_entry_point(case, strategy):
    """The lens with half products equals float64 statistics of the vectors rounded to the
    model's dtype; without them it equals the unrounded ones; the two differ."""
    model = builders.build(case)
    dtype = model.W_U.dtype
    rounded = _stats64(reference.lens_logits64(model, TOKENS, round_to=dtype), TOKENS)
    exact = _stats64(reference.lens_logits64(model, TOKENS), TOKENS)
    width = 16 if strategy == "tiled" else None
    with tuning.force(strategy=strategy, width=width, half_products=True):
        half = _reading(tll.logit_lens(model, TOKENS, targets="next", top_k=4))
        ev = tll.evaluate_lens(model, TOKENS, batch_size=1, progress=False)
    with tuning.force(strategy=strategy, width=width, half_products=False):
        full = _reading(tll.logit_lens(model, TOKENS, targets="next", top_k=4))
    # Measured: 3e-7 to 6e-7 for both (the reference's float64 norm could round an element to
    # the other side of a half-precision boundary than the kernel's float32 one; none did).
    assert _worst(half, rounded) <= 1e-5, _worst(half, rounded)
    assert _worst(full, exact) <= 1e-5, _worst(full, exact)
    # The rounding is real (9.6e-5 in float16, 6.6e-4 in bfloat16): a path that skipped it fails.
    assert _worst(half, full) > 5e-5, _worst(half, full)
    torch.testing.assert_close(
        ev.mean("kl_to_final").double(), rounded["kl_to_final"][..., :-1].mean((1, 2)), atol=1e-5, rtol=1e-5
    )


def test_compiled_sums_equal_eager_ones():
    """What CUDA runs: whole_sums through torch.compile (here compiled for the CPU, ~15 s)."""
    compiled = torch.compile(tiles.whole_sums, dynamic=True)
    for logits, peak, ref, thresholds in _sums_cases():
        got, want = compiled(logits, peak, ref, thresholds), tiles.whole_sums(logits, peak, ref, thresholds)
        for a, b in zip(got, want):
            assert (a is None) == (b is None)
            if b is not None:
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("V,k,block", [(1000, 5, 64), (1024, 5, 128), (1001, 1, 128), (300, 4, 128), (5000, 50, 32)])
def test_block_top_k_equals_topk(V, k, block):
    """The GPU strategy's top-k (block maxima, then the best blocks) against torch.topk, on
    random rows, rows whose top values share one block, rows whose top values sit one per
    block (all k blocks needed) and in the ragged tail, and rows with -inf."""
    gen = torch.Generator().manual_seed(V + k)
    x = torch.randn(8, V, generator=gen)
    x[1, 3 * block : 3 * block + k] += 10  # the whole top k in one block
    x[2, (torch.arange(k) * block + 7) % V] += 10  # one per block, k blocks
    x[3, -1] += 20  # the last column (in the ragged tail when V % block)
    x[4, : V // 2] = float("-inf")
    values, ids = tiles.block_top_k(x, k, block=block)
    want = x.topk(k, dim=-1)
    assert torch.equal(values, want.values)
    assert torch.equal(x.gather(1, ids), values)  # the ids hold those values
    assert bool((ids.sort(-1).values.diff(dim=-1) != 0).all())  # distinct ids
