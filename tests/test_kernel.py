"""The kernel's tile shapes: measured for the machine, overridable, cached; both strategies exact.

Every statistic is checked against full float64 logits from tests/reference.py (which
never calls tl_logitlens), under the measured shape, a forced small ragged shape, a
blocked top-k shape, and the whole-vocabulary ("whole", the CUDA default) strategy run
here on the CPU through the same code.
"""

import importlib
import json

import builders
import pytest
import reference
import torch
from conftest import FUSED_AVAILABLE

import tl_logitlens as tll
from tl_logitlens.kernel import tiles, tuning, workers

readout_module = importlib.import_module("tl_logitlens.kernel.read")

CASES = builders.cases()
# One HookedTransformer (2.x/3.x) or one bridge (4.x), and a GPT-2 bridge where it exists.
PICK = [CASES[0]] + [c for c in CASES if c.name == "gpt2"][:1]
TOKENS = builders.tokens(batch=2, seq=9)


@pytest.fixture(autouse=True)
def fresh_tuning(monkeypatch):
    """Each test measures afresh, with no disk cache unless it sets one."""
    monkeypatch.delenv("TL_LOGITLENS_TILE_CACHE", raising=False)
    monkeypatch.delenv("TL_LOGITLENS_AUTOTUNE", raising=False)
    tuning.clear_cache()
    tuning.set_chunk_budget(None)
    yield
    tuning.clear_cache()
    tuning.set_chunk_budget(None)


def _check_against_reference(model, result, ref, k):
    ref_top = ref["logits"].topk(k, dim=-1)
    torch.testing.assert_close(result.top_logits.double(), ref_top.values.double(), atol=1e-4, rtol=1e-5)
    gaps = ref_top.values[..., 0] - ref_top.values[..., 1]
    clear = gaps > 1e-3
    assert torch.equal(result.top_ids[..., 0][clear], ref_top.indices[..., 0][clear])
    torch.testing.assert_close(result.entropy.double(), ref["entropy"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.kl_to_final.double(), ref["kl"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.next_token_loss[:, :, :-1].double(), ref["loss"], atol=1e-4, rtol=1e-4)
    assert torch.equal(result.target_ranks[:, :, :-1, 0], ref["next_ranks"])


# (strategy, width, rows, top-k block, statistics path): measured; ragged 7-column tiles of 5
# rows (each searched whole for top-k); 16-column tiles whose top-k comes from blocks of 8; the
# tiled shapes on both statistics paths (fused C kernel, eager tensor operations); whole.
SHAPES = {
    "measured": ("tiled", None, None, None, None),
    "ragged-7x5": ("tiled", 7, 5, None, True),
    "blocked-16": ("tiled", 16, 12, 8, True),
    "ragged-7x5-eager": ("tiled", 7, 5, None, False),
    "blocked-16-eager": ("tiled", 16, 12, 8, False),
    "whole": ("whole", None, None, None, None),
    "whole-5-rows": ("whole", None, 5, None, None),
}


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("case", PICK, ids=[c.name for c in PICK])
def test_every_shape_and_strategy_matches_reference(case, shape, monkeypatch):
    model = builders.build(case)
    strategy, width, rows, block, fused = SHAPES[shape]
    if fused and not FUSED_AVAILABLE:
        pytest.skip("no fused kernel here")
    if block is not None:
        monkeypatch.setattr(tiles, "_TOPK_BLOCK", block)
    ref = reference.lens_reference(model, TOKENS)
    with tuning.force(strategy=strategy, width=width, rows=rows, fused=fused):
        result = tll.logit_lens(model, TOKENS, targets="next", top_k=4)
    _check_against_reference(model, result, ref, 4)


def test_measured_shape_is_used_and_equals_a_forced_small_shape(monkeypatch):
    model = builders.build(CASES[0])
    seen = []
    real = readout_module.read_product

    def spy(*args, **kwargs):
        # rows per product: a call's rows, or with workers taking pieces in turn, each piece's
        seen.append((kwargs.get("piece_rows") or args[0].shape[0], kwargs["width"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(readout_module, "read_product", spy)
    measured = tll.logit_lens(model, TOKENS, targets="next", top_k=3)
    shapes = list(tuning._memory.values())
    assert len(shapes) == 1 and shapes[0].source == "measured" and shapes[0].timings
    d_vocab = model.cfg.d_vocab
    assert all(w == min(d_vocab, shapes[0].width) for _, w in seen)
    assert all(m <= shapes[0].rows for m, _ in seen)
    seen.clear()
    with tuning.force(width=7, rows=5):
        small = tll.logit_lens(model, TOKENS, targets="next", top_k=3)
    assert {w for _, w in seen} == {7} and max(m for m, _ in seen) <= 5
    assert torch.equal(measured.top_ids, small.top_ids)
    for name in ("top_logits", "entropy", "kl_to_final", "next_token_loss"):
        torch.testing.assert_close(getattr(measured, name), getattr(small, name), atol=1e-5, rtol=1e-5, equal_nan=True)
    assert torch.equal(measured.target_ranks, small.target_ranks)


@pytest.mark.parametrize(
    "per_width, expected",
    [
        # steady rounds (the first also faults buffers in): the widest within 5 % of the fastest
        ({8192: [9.0, 6.0, 6.1], 4096: [8.0, 5.0, 5.05], 2048: [8.0, 5.1, 5.0], 1024: [7.0, 5.6, 5.5]}, 4096),
        ({8192: [9.0, 5.2, 5.2], 4096: [8.0, 5.0, 5.0], 2048: [8.0, 5.1, 5.0], 1024: [7.0, 5.6, 5.5]}, 8192),
        # another process blurred them (a spread of 2 after the first round): the widest, however they rank
        ({8192: [9.0, 9.0, 9.0], 4096: [8.0, 8.0, 8.0], 2048: [8.0, 4.0, 8.0], 1024: [7.0, 3.0, 6.0]}, 8192),
    ],
)
def test_the_fused_tuner_takes_the_widest_tiles_when_other_work_blurs_its_timings(monkeypatch, per_width, expected):
    if tuning._path(torch.device("cpu"), torch.float32) != "fused":
        pytest.skip("no fused kernel in this process (no C compiler)")
    calls = {w: iter(v) for w, v in per_width.items()}
    monkeypatch.setattr(tuning, "_time_kernel", lambda x, W, width, buffers: next(calls[width]) * 1e-3)
    with workers.force(1):  # one stream of products (workers: tests/test_workers.py)
        shape = tuning.measure(torch.randn(64, 20000), torch.float32)
    assert shape.width == expected
    assert {w for _, w, _ in shape.timings} == set(per_width)


def test_too_few_rounds_count_as_blurred():
    assert tuning._noisy([[2.0, 1.0], [2.0, 1.0]])  # the deadline left one round after the first
    assert not tuning._noisy([[2.0, 1.0, 1.1], [3.0, 1.2, 1.25]])
    assert tuning._noisy([[2.0, 1.0, 1.1], [3.0, 1.2, 1.7]])


def test_measurement_is_cached_bounded_and_reads_a_slice():
    W = torch.randn(64, 20000)
    first = tuning.tile_shape(W, torch.float32)
    assert first.source == "measured" and first.strategy == "tiled"
    assert max(w for _, w, _ in first.timings) <= tuning._SLICE_COLUMNS < W.shape[1]
    assert tuning.tile_shape(W, torch.float32) == first  # the process cache: no second measurement
    # a transposed layout (HF's lm_head [d_vocab, d_model]) is measured on its own
    WT = torch.randn(20000, 64).T
    assert tuning._key(WT, torch.float32, False) != tuning._key(W, torch.float32, False)


def test_overrides(monkeypatch):
    W = torch.randn(32, 5000)
    assert tuning.tile_shape(W, torch.float32, chunk_size=9).rows == 9
    tuning.set_chunk_budget(3 * 4 * 1000 * 20)  # 20 rows of 1000-column float32 tiles
    with tuning.force(width=1000), workers.force(1):
        assert tuning.tile_shape(W, torch.float32)[:2] == (20, 1000)
    if tuning._path(torch.device("cpu"), torch.float32) == "fused":
        with tuning.force(width=1000), workers.force(2):  # two pieces and their reference rows each
            assert tuning.tile_shape(W, torch.float32)[:2] == (15, 1000)
    tuning.set_chunk_budget(None)
    with pytest.raises(tll.LensInputError, match="chunk budget"):
        tuning.set_chunk_budget(0)
    monkeypatch.setenv("TL_LOGITLENS_AUTOTUNE", "0")
    tuning.clear_cache()
    assert tuning.tile_shape(W, torch.float32).source == "fallback"
    # a transform that needs whole rows gets one tile over the vocabulary
    assert tuning.tile_shape(W, torch.float32, whole_rows=True).width == 5000


def test_disk_cache_round_trips_and_a_corrupt_file_is_ignored(tmp_path, monkeypatch):
    path = tmp_path / "shapes.json"
    monkeypatch.setenv("TL_LOGITLENS_TILE_CACHE", str(path))
    W = torch.randn(48, 6000)
    measured = tuning.tile_shape(W, torch.float32)
    data = json.loads(path.read_text())
    assert list(data.values())[0]["width"] == measured.width
    tuning.clear_cache()

    def no_measuring(*a, **k):
        raise AssertionError("measured although the disk cache had the shape")

    monkeypatch.setattr(tuning, "measure", no_measuring)
    from_disk = tuning.tile_shape(W, torch.float32)
    assert from_disk.source == "disk" and from_disk[:3] == measured[:3]

    monkeypatch.undo()
    monkeypatch.setenv("TL_LOGITLENS_TILE_CACHE", str(path))
    path.write_text("{not json")
    tuning.clear_cache()
    with pytest.warns(UserWarning, match="unreadable tile-shape cache"):
        again = tuning.tile_shape(W, torch.float32)
    assert again.source == "measured"
    assert json.loads(path.read_text())  # rewritten whole
    path.write_text(json.dumps({tuning._key(W, torch.float32, False): {"rows": -3}}))
    tuning.clear_cache()
    with pytest.warns(UserWarning, match="malformed entry"):
        assert tuning.tile_shape(W, torch.float32).source == "measured"


def test_processor_report():
    assert isinstance(tuning.processor_name(), str) and tuning.processor_name()
    assert all(k.startswith("L") for k in tuning.cache_sizes())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_whole_strategy_matches_cpu_tiles(dtype):
    gen = torch.Generator().manual_seed(0)
    W = (torch.randn(256, 30000, generator=gen) * 0.05).to(dtype)
    x = torch.randn(40, 256, generator=gen)
    targets = torch.randint(0, 30000, (20, 2), generator=gen)
    nxt = torch.randint(-1, 30000, (20,), generator=gen)
    kw = dict(top_k=5, with_reference=True, next_tokens=nxt, target_ids=targets)
    cpu = tiles.read_product(x, 2, W.float(), None, None, [torch.empty(40 * 1024) for _ in range(3)], width=1024, **kw)
    cu = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    assert tuning.default_strategy(torch.device("cuda")) == "whole"
    gpu = tiles.read_whole(
        x.cuda(), 2, W.cuda(), None, None, [torch.empty(40 * 30000, device="cuda") for _ in range(3)], **cu
    )
    for name in ("log_z", "entropy", "top_logits", "kl_to_reference", "next_logit", "target_logits"):
        torch.testing.assert_close(getattr(gpu, name).cpu(), getattr(cpu, name), atol=2e-4, rtol=1e-4)
    assert torch.equal(gpu.top_ids.cpu(), cpu.top_ids)
    if dtype == torch.bfloat16:  # tensor-core products of rounded vectors (torch.mm out_dtype=float32)
        xh = x.to(dtype)
        want = _direct_stats(xh, W, torch.zeros(30000), 0.0, 2, nxt, targets)
        half = tiles.read_whole(
            xh.cuda(), 2, W.cuda(), None, None, [torch.empty(40 * 30000, device="cuda") for _ in range(3)], **cu
        )
        for name in ("log_z", "entropy", "kl_to_reference", "next_logit", "target_logits", "target_ranks"):
            torch.testing.assert_close(getattr(half, name).cpu().double(), want[name], atol=2e-4, rtol=1e-5, msg=name)
        assert not tiles._mm_out_dtype  # the tensor-core product ran, not the float32 fallback


@pytest.mark.parametrize(
    "name", ["tl_logitlens.kernel.tuning", "tl_logitlens.kernel.tiles", "tl_logitlens.kernel.workers"]
)
def test_kernel_docstring_examples(name):
    import doctest

    module = importlib.import_module(name)
    failures, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert failures == 0 and attempted > 0


def _direct_stats(x, W, b, cap, g, next_tokens, target_ids):
    """Float64 statistics of ``x @ W + b`` (soft-capped), written out from full logits."""
    logits = x.double() @ W.double() + b.double()
    if cap:
        logits = cap * torch.tanh(logits / cap)
    n = x.shape[0] // g
    logp = torch.log_softmax(logits, -1).view(g, n, -1)
    logits3 = logits.view(g, n, -1)
    ref = logp[0]
    t = logits3.gather(2, target_ids.expand(g, -1, -1))
    return {
        "log_z": torch.logsumexp(logits, -1).view(g, n),
        "entropy": -(logp.exp() * logp).sum(-1),
        "kl_to_reference": (ref.exp() * (ref - logp)).sum(-1),
        "top_logits": logits3.topk(4, dim=-1).values,
        "next_logit": torch.where(
            next_tokens >= 0, logits3.gather(2, next_tokens.clamp_min(0).view(1, n, 1).expand(g, n, 1))[..., 0], 0.0
        ),
        "target_logits": t,
        "target_ranks": torch.stack([(logits3 > t[..., j : j + 1]).sum(-1) for j in range(t.shape[-1])], -1).double(),
    }


# Every reader: the tiled one with ragged tiles and with blocked top-k, each on both statistics
# paths (the fused C kernel where it builds, eager tensor operations), and the whole vocabulary.
_FUSED = pytest.mark.skipif(not FUSED_AVAILABLE, reason="no fused kernel here")
READERS = [
    pytest.param("tiled-ragged", True, id="ragged-fused", marks=_FUSED),
    pytest.param("tiled-ragged", False, id="ragged-eager"),
    pytest.param("tiled-blocked", True, id="blocked-fused", marks=_FUSED),
    pytest.param("tiled-blocked", False, id="blocked-eager"),
    pytest.param("whole", None, id="whole"),
]


@pytest.mark.parametrize("n_targets", [1, 2])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "fp16"])
@pytest.mark.parametrize("cap", [0.0, 3.0], ids=["plain", "soft-capped"])
@pytest.mark.parametrize("strategy,fused", READERS)
def test_kernel_strategies_against_direct_float64(strategy, fused, cap, w_dtype, n_targets, monkeypatch):
    """Every statistic of every reader, on both statistics paths, against float64 logits: ragged and
    blocked tiles, the whole vocabulary, a soft cap, a half-precision W_U (cast a tile at a time, so
    the reference reads the same half-precision values upcast), one target (counted in the fused
    kernel's sums pass) and two (counted in passes of their own)."""
    gen = torch.Generator().manual_seed(5)
    g, n, d, V = 3, 7, 24, 1000
    x = torch.randn(g * n, d, generator=gen)
    W = (torch.randn(d, V, generator=gen) * 0.5).to(w_dtype)
    b = torch.randn(V, generator=gen) * 0.1
    nxt = torch.randint(0, V, (n,), generator=gen)
    nxt[::3] = -1  # rows with no next token
    tid = torch.randint(0, V, (n, n_targets), generator=gen)

    def transform(t):
        return cap * torch.tanh(t / cap)

    transform.elementwise = True
    kw = dict(top_k=4, with_reference=True, next_tokens=nxt, target_ids=tid)
    bufs = [torch.empty(g * n * V) for _ in range(3)]
    if strategy == "whole":
        got = tiles.read_whole(x, g, W, b, transform if cap else None, bufs, **kw)
    else:
        width = 97 if strategy == "tiled-ragged" else 256  # 97: ragged tiles, searched whole; 256: blocks of 64
        monkeypatch.setattr(tiles, "_TOPK_BLOCK", 64)
        got = tiles.read_product(x, g, W, b, transform if cap else None, bufs, width=width, fused=fused, **kw)
    want = _direct_stats(x, W, b, cap, g, nxt, tid)
    for name, value in want.items():
        torch.testing.assert_close(getattr(got, name).double(), value, atol=2e-4, rtol=1e-5, msg=name)
    top = (x.double() @ W.double() + b.double()).view(g, n, V)
    top = (cap * torch.tanh(top / cap) if cap else top).topk(4, dim=-1)
    clear = (top.values[..., :-1] - top.values[..., 1:]).min(-1).values > 1e-4  # rows with no near-tie
    assert clear.sum() > g * n // 2 and torch.equal(got.top_ids[clear], top.indices[clear])


@pytest.mark.parametrize("given", [False, True], ids=["own-buffer", "small-buffer"])
def test_half_precision_unembedding_in_tiles_wider_than_the_default(given, stats_path):
    # A bfloat16 W read in float32 is cast a tile at a time into w_tile. The measurement of the tile
    # shape (tuning.measure, at the first read of every real bfloat16 model with a vocabulary over
    # 1024) asks for 4096-column tiles without a buffer: the one made here must be that wide, and a
    # given one too small for the tile is replaced, not overrun.
    gen = torch.Generator().manual_seed(7)
    g, n, d, V = 2, 3, 16, 5000
    x = torch.randn(g * n, d, generator=gen)
    W = (torch.randn(d, V, generator=gen) * 0.5).to(torch.bfloat16)
    nxt = torch.randint(0, V, (n,), generator=gen)
    tid = torch.randint(0, V, (n, 1), generator=gen)
    kw = dict(top_k=4, with_reference=True, next_tokens=nxt, target_ids=tid)
    bufs = [torch.empty(g * n * 4096) for _ in range(3)]
    w_tile = torch.empty(d * 1024) if given else None
    got = tiles.read_product(x, g, W, None, None, bufs, width=4096, w_tile=w_tile, **kw)
    want = _direct_stats(x, W.float(), torch.zeros(V), 0.0, g, nxt, tid)
    for name, value in want.items():
        torch.testing.assert_close(getattr(got, name).double(), value, atol=2e-4, rtol=1e-5, msg=name)


@pytest.mark.parametrize("lanes", [1, 2], ids=["one-stream", "two-workers"])
def test_working_buffers_are_kept_for_the_next_call_within_the_budget(lanes, monkeypatch):
    """A second read finds the first one's buffers (no fresh pages to fault in), a call never
    shares them with one running at the same time, and what is kept stays within the budget."""
    W = torch.randn(16, 500)
    u = readout_module.Unembedding(W, None, tll.kernel.FinalNorm("LN", None, None, 1e-5))
    vectors = torch.randn(2, 30, 16)
    made = []
    real_empty = torch.empty

    def empty(*args, **kwargs):
        if len(args) == 1 and isinstance(args[0], int) and args[0] >= 60 * 64:  # a flat working buffer
            made.append(args[0])
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(readout_module.torch, "empty", empty)
    readout_module._workspace.clear()
    # with workers, each holds a piece and its reference rows: two buffers a worker
    count = 2 * lanes if lanes > 1 and FUSED_AVAILABLE else tiles.BUFFERS
    monkeypatch.setattr(workers, "_forced", [lanes])
    with tuning.force(width=64, rows=60):
        first = readout_module.read_rows(u, vectors, norm="recompute", top_k=3)
        assert len(made) == count
        kept = readout_module._workspace.take(1, torch.float32, torch.device("cpu"))
        assert len(made) == count  # the kept set, not new ones
        second = readout_module.read_rows(u, vectors, norm="recompute", top_k=3)  # while `kept` is out
        assert len(made) == 2 * count
        readout_module._workspace.give_back(kept)
        readout_module.read_rows(u, vectors, norm="recompute", top_k=3)
        assert len(made) == 2 * count
    assert torch.equal(first.top_ids, second.top_ids) and torch.equal(first.entropy, second.entropy)
    tuning.set_chunk_budget(1000)  # smaller than the kept set: let go of it, keep nothing bigger
    with tuning.force(width=64, rows=60):
        readout_module.read_rows(u, vectors, norm="recompute", top_k=3)
    assert len(made) == 3 * count and not readout_module._workspace._kept
