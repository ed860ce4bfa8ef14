"""compare_runs and the pairwise kernel: KL, JS and TV between two runs' readings, tile by tile,
against a float64 reference from full logits (tests/reference.py), on small models of every kind
the installed transformer-lens builds, in bfloat16, and on the real stories260k."""

import math

import builders
import pytest
import reference
import torch

import tl_logitlens as tll
from tl_logitlens.kernel import FinalNorm, Unembedding, pairwise
from tl_logitlens.model_access import TransformerBridge

CLEAN = builders.tokens(batch=2, seq=9, seed=4)
CORRUPTED = CLEAN.clone()
CORRUPTED[:, 3] = torch.tensor([17, 40])  # one changed token per prompt: positions 3.. diverge
CASES = {c.name: c for c in builders.cases()}
SMALL = [name for name in ("ht-rms", "ht-ln-folded", "gpt2", "llama-gqa", "native-ln") if name in CASES]


def divergences64(p_logits: torch.Tensor, q_logits: torch.Tensor):
    """(KL(p||q), JS, TV) over the last axis from full logits, in float64, by the textbook formulas."""
    log_p, log_q = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    p, q = log_p.exp(), log_q.exp()
    m = (p + q) / 2
    kl = (p * (log_p - log_q)).sum(-1)
    js = 0.5 * (p * (log_p - m.log())).sum(-1) + 0.5 * (q * (log_q - m.log())).sum(-1)
    tv = 0.5 * (p - q).abs().sum(-1)
    return kl, js, tv


@pytest.fixture
def narrow_tiles(monkeypatch):
    """7-column tiles: many tiles and a ragged last one over the 61-token test vocabulary."""
    monkeypatch.setattr(pairwise, "PAIR_COLUMNS", 7)


def _check_against_reference(model, result, atol):
    ref = divergences64(reference.lens_logits64(model, CLEAN), reference.lens_logits64(model, CORRUPTED))
    for name, want in zip(("kl", "js", "tv"), ref):
        got = getattr(result, name).double()
        assert got.shape == want.shape, name
        err = (got - want).abs().max().item()
        assert err <= atol * max(1.0, want.abs().max().item()), f"{name}: max error {err:.3g}"
    # The changed position differs at every entry, later positions once attention has read it.
    assert float(ref[2][:, :, 3].min()) > 1e-3 and float(ref[2][-1, :, 3:].min()) > 1e-6
    assert float(ref[2][:, :, :3].max()) < 1e-12, "positions before the change read the same"


@pytest.mark.parametrize("name", SMALL)
def test_divergences_match_full_logits_in_float64(name, narrow_tiles):
    model = builders.build(CASES[name])
    result = tll.compare_runs(model, CLEAN, CORRUPTED)
    assert result.labels == reference.accumulated(model, model.run_with_cache(CLEAN)[1])[0]
    _check_against_reference(model, result, atol=2e-5)


def test_divergences_in_bfloat16_match_the_reference():
    cases = {c.name: c for c in builders.precision_cases((torch.bfloat16,))}
    name = next(n for n in cases if n.startswith("llama") or n.startswith("ht-rms"))
    model = builders.build(cases[name])
    result = tll.compare_runs(model, CLEAN, CORRUPTED)
    # float32 statistics of the bfloat16 model's own streams and weights: float32 rounding only
    _check_against_reference(model, result, atol=1e-4)


def test_one_tile_and_many_tiles_agree(monkeypatch):
    model = builders.build(CASES[SMALL[0]])
    whole = tll.compare_runs(model, CLEAN, CORRUPTED)
    monkeypatch.setattr(pairwise, "PAIR_COLUMNS", 5)
    monkeypatch.setattr(pairwise, "PAIR_BUDGET_BYTES", 1)  # one row per chunk
    tiled = tll.compare_runs(model, CLEAN, CORRUPTED)
    for name in ("kl", "js", "tv"):
        torch.testing.assert_close(getattr(tiled, name), getattr(whole, name), atol=2e-6, rtol=1e-5)


def test_identical_runs_read_zero_and_bounds_hold():
    model = builders.build(CASES[SMALL[0]])
    same = tll.compare_runs(model, CLEAN, CLEAN)
    for name in ("kl", "js", "tv"):
        assert float(getattr(same, name).abs().max()) < 1e-6
    far = tll.compare_runs(model, CLEAN, torch.flip(CLEAN, [1]))
    assert float(far.js.max()) <= math.log(2) and float(far.tv.max()) <= 1.0
    assert bool((far.js <= far.tv * math.log(2) + 1e-6).all())  # JS <= TV log 2


def test_read_pairs_with_a_soft_cap_matches_the_formula():
    gen = torch.Generator().manual_seed(0)
    W, x, y = torch.randn(16, 90, generator=gen), torch.randn(6, 16, generator=gen), torch.randn(6, 16, generator=gen)

    def cap(t):
        return 3.0 * torch.tanh(t / 3.0)

    cap.elementwise = True  # type: ignore[attr-defined]
    u = Unembedding(W, torch.randn(90, generator=gen), FinalNorm(None, None, None, 0.0), cap)
    got = pairwise.read_pairs(u, x, y, norm="none", width=13)
    want = divergences64(cap(x.double() @ W.double() + u.b.double()), cap(y.double() @ W.double() + u.b.double()))
    for g, w in zip((got.kl, got.js, got.tv), want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5)


def test_positions_and_table():
    model = builders.build(CASES[SMALL[0]])
    last = tll.compare_runs(model, CLEAN, CORRUPTED, positions=-1)
    full = tll.compare_runs(model, CLEAN, CORRUPTED)
    assert last.kl.shape == (len(full.labels), 2, 1)
    torch.testing.assert_close(last.js[:, :, 0], full.js[:, :, -1])
    frame = full.to_dataframe()
    assert len(frame) == full.kl.numel()
    assert full.first_divergent_entry("tv", 1e-4)[:, :3].eq(-1).all()  # nothing differs before the change


def test_save_load_plot_and_page(tmp_path):
    model = builders.build(CASES[SMALL[0]])
    runs = tll.compare_runs(model, CLEAN, CORRUPTED)
    runs.save(tmp_path / "runs.json")
    back = tll.RunComparison.load(tmp_path / "runs.json")
    assert back.labels == runs.labels and torch.equal(back.js, runs.js)
    fig = runs.plot(statistic="kl")
    assert fig.axes[0].get_ylabel() == "stack entry"
    page = runs.to_html(tmp_path / "runs.html")
    assert "tll-figure" in page.read_text()
    with pytest.raises(tll.LensInputError, match="statistic must be one of"):
        runs.plot(statistic="hellinger")


def test_different_lengths_are_refused_before_any_forward_pass():
    model = builders.build(CASES[SMALL[0]])
    shorter = CORRUPTED[:, :8]
    builders.raises_before_forward(
        model, tll.LensInputError, "same lengths", lambda: tll.compare_runs(model, CLEAN, shorter)
    )
    builders.raises_before_forward(
        model, tll.LensInputError, "corrupted prompt", lambda: tll.compare_runs(model, CLEAN, None)
    )


#: Hugging Face folders boot through TransformerBridge (transformer-lens 3.x/4.x); 2.x has none.
_NEEDS_BRIDGE = pytest.mark.skipif(
    TransformerBridge is None,
    reason="local HF models boot through TransformerBridge (3.x/4.x)",
)


@_NEEDS_BRIDGE
def test_stories260k_final_entry_matches_the_models_own_logits(models_dir):
    model = TransformerBridge.boot_transformers(str(models_dir / "stories260k"), device="cpu").eval()
    clean, corrupted = "Once upon a time, Lily had a red ball.", "Once upon a time, Tim had a red ball."
    tc, tq = model.to_tokens(clean), model.to_tokens(corrupted)
    if tc.shape != tq.shape:
        pytest.skip("the names tokenise to different lengths in this vocabulary")
    runs = tll.compare_runs(model, clean, corrupted)
    with torch.no_grad():
        want = divergences64(model(tc), model(tq))  # the model's own output, not the lens
    for got, w in zip((runs.kl[-1], runs.js[-1], runs.tv[-1]), want):
        torch.testing.assert_close(got.double(), w, atol=5e-4, rtol=1e-3)
    changed = int((tc != tq).nonzero()[0, 1])
    assert float(runs.tv[:, :, :changed].max()) < 1e-5 and float(runs.tv[-1, :, changed:].max()) > 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_pairs_on_cuda_matches_the_cpu(dtype):
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(64, 5000, generator=gen).to(dtype)
    x, y = torch.randn(40, 64, generator=gen), torch.randn(40, 64, generator=gen)
    norm = FinalNorm("RMS", torch.rand(64, generator=gen) + 0.5, None, 1e-6)
    cpu = pairwise.read_pairs(Unembedding(W, None, norm), x, y)
    gpu = pairwise.read_pairs(Unembedding(W.cuda(), None, norm), x.cuda(), y.cuda())
    for a, b in zip((cpu.kl, cpu.js, cpu.tv), (gpu.kl, gpu.js, gpu.tv)):
        assert b.device.type == "cpu"
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@pytest.mark.real
@_NEEDS_BRIDGE
def test_gemma_final_entry_matches_the_hugging_face_logits():
    import pretrained

    model = TransformerBridge.boot_transformers(str(pretrained.folder("gemma-3-270m")), device="cpu").eval()
    clean, corrupted = "The capital of France is", "The capital of Italy is"
    tc, tq = model.to_tokens(clean), model.to_tokens(corrupted)
    assert tc.shape == tq.shape
    runs = tll.compare_runs(model, clean, corrupted, positions=-1)
    with torch.no_grad():  # the Hugging Face model's own logits, in float64: no tl_logitlens on this side
        want = divergences64(model.original_model(tc).logits[:, -1:], model.original_model(tq).logits[:, -1:])
    for got, w in zip((runs.kl[-1], runs.js[-1], runs.tv[-1]), want):
        torch.testing.assert_close(got.double(), w, atol=2e-4, rtol=2e-3)
    assert float(runs.js[-1, 0, 0]) > 0.1  # France and Italy have different capitals
