"""Single-threaded workers taking pieces of a product in turn (tl_logitlens.kernel.workers) and the
exact merge of their statistics (tiles._FusedTiles.merge): every statistic against float64 logits
from the test's own arithmetic, whichever worker read which piece, in blocks of positions or whole.
"""

import threading
import warnings

import pytest
import torch
from conftest import FUSED_AVAILABLE
from test_kernel import _direct_stats

from tl_logitlens.inputs.tokens import gather_positions
from tl_logitlens.kernel import precision, tiles, tuning, workers

needs_fused = pytest.mark.skipif(not FUSED_AVAILABLE, reason="no fused kernel here")


def _scheduled(order):
    """A run_in_turn that hands items to workers in a fixed way, on the calling thread."""

    def run(items, n_workers, work):
        if order == "round-robin":
            plan = [(i % n_workers, i) for i in range(items)]
        elif order == "reversed":
            plan = [((i // 2) % n_workers, i) for i in reversed(range(items))]
        else:  # "last-worker": every piece on the last worker, the others idle
            plan = [(n_workers - 1, i) for i in range(items)]
        for worker, item in plan:
            work(worker, item)

    return run


@needs_fused
@pytest.mark.parametrize("n_targets", [1, 2])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("cap", [0.0, 3.0], ids=["plain", "soft-capped"])
@pytest.mark.parametrize("piece_rows", [None, 5, 9], ids=["whole-rows", "pieces-5", "pieces-9"])
@pytest.mark.parametrize("order", ["round-robin", "reversed", "last-worker", "threads"])
def test_pieces_read_in_turn_match_float64(order, piece_rows, cap, w_dtype, n_targets, monkeypatch):
    """Each worker keeps its own sums, top-k and counts over the pieces it took; merged, they are
    those of the whole product, whatever the assignment (threads: the real pool)."""
    if order != "threads":
        monkeypatch.setattr(workers, "run_in_turn", _scheduled(order))
    gen = torch.Generator().manual_seed(11)
    g, n, d, V = 3, 7, 24, 1000
    x = torch.randn(g * n, d, generator=gen)
    W = (torch.randn(d, V, generator=gen) * 0.5).to(w_dtype)
    b = torch.randn(V, generator=gen) * 0.1
    nxt = torch.randint(0, V, (n,), generator=gen)
    nxt[::3] = -1
    tid = torch.randint(0, V, (n, n_targets), generator=gen)

    def transform(t):
        return cap * torch.tanh(t / cap)

    transform.elementwise = True
    bufs = [torch.empty(g * n * 128) for _ in range(6)]
    members = torch.tensor([3, 3, 97, 500, 999])
    with workers.force(3):
        got = tiles.read_product(
            *(x, g, W, b, transform if cap else None, bufs),
            **dict(top_k=4, with_reference=True, next_tokens=nxt, target_ids=tid, member_ids=members),
            **dict(width=97, fused=True, piece_rows=piece_rows),
        )
    want = _direct_stats(x, W.float(), b, cap, g, nxt, tid)
    for name, value in want.items():
        torch.testing.assert_close(getattr(got, name).double(), value, atol=2e-4, rtol=1e-5, msg=name)
    logits = (x.double() @ W.double() + b.double()).view(g, n, V)
    logits = cap * torch.tanh(logits / cap) if cap else logits
    torch.testing.assert_close(got.member_logits.double(), logits[..., members], atol=2e-4, rtol=1e-5)
    top = logits.topk(4, dim=-1)
    clear = (top.values[..., :-1] - top.values[..., 1:]).min(-1).values > 1e-4
    assert clear.sum() > g * n // 2 and torch.equal(got.top_ids[clear], top.indices[clear])


@needs_fused
def test_equal_logits_keep_the_lower_token_first_across_workers(monkeypatch):
    # Columns 5 and 205 hold the same logit in every row; the worker that read 205 is merged first.
    def tile_2_first_on_worker_0(items, n_workers, work):
        for worker, item in [(0, 2), (1, 1), (1, 0)]:
            work(worker, item)

    monkeypatch.setattr(workers, "run_in_turn", tile_2_first_on_worker_0)
    x = torch.eye(4)
    W = torch.zeros(4, 300)
    W[:, 5] = W[:, 205] = 2.0
    bufs = [torch.empty(4 * 100) for _ in range(4)]
    with workers.force(2):
        got = tiles.read_product(x, 1, W, None, None, bufs, top_k=2, with_reference=False, width=100, fused=True)
    assert got.top_ids[0, :, :2].tolist() == [[5, 205]] * 4


def test_position_blocks_are_even_and_bounded():
    for n, g, rows in [(256, 13, 1024), (39, 19, 1228), (7, 3, 5), (10, 1, 3), (5, 4, 1000)]:
        blocks = tiles._position_blocks(n, g, rows)
        assert blocks[0][0] == 0 and blocks[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        sizes = [i1 - i0 for i0, i1 in blocks]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
        assert g * max(sizes) <= rows + g - 1  # what read_rows sizes the lanes' buffers for
    assert tiles._position_blocks(50, 3, None) == [(0, 50)]


def test_lanes_are_carved_without_overlap_and_refused_when_none_fits():
    bufs = [torch.empty(100) for _ in range(3)]
    lanes = tiles._lanes(bufs, [60, 30], 4)
    assert len(lanes) == 3  # 60 + 30 fits in one buffer each, not a fourth time
    spans = [(t.data_ptr(), t.data_ptr() + 4 * t.numel()) for lane in lanes for t in lane]
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    with pytest.raises(ValueError, match="cannot hold a piece"):
        tiles._lanes(bufs, [101], 2)


def test_run_in_turn_does_every_item_once_on_single_threaded_workers():
    seen, threads = [], set()
    lock = threading.Lock()
    caller = torch.get_num_threads()

    def work(worker, item):
        with lock:
            seen.append(item)
            threads.add((threading.current_thread().name, torch.get_num_threads()))

    workers.run_in_turn(50, 2, work)
    assert sorted(seen) == list(range(50))
    assert all(name.startswith("tl_logitlens-worker-") and count == 1 for name, count in threads)
    assert torch.get_num_threads() == caller  # the pool put the caller's count back

    def fail(worker, item):
        if item == 7:
            raise KeyError("piece 7")

    with pytest.raises(KeyError, match="piece 7"):
        workers.run_in_turn(20, 2, fail)
    workers.run_in_turn(3, 2, work)  # the pool still serves after a failure


def test_worker_count_follows_threads_force_and_the_single_threaded_caller():
    threads = torch.get_num_threads()
    assert workers.count(torch.device("cpu")) == threads
    with workers.force(3):
        assert workers.count(torch.device("cpu")) == 3
    with pytest.raises(ValueError, match="positive int"):
        with workers.force(0):
            pass
    with workers.caller_single_threaded():
        assert torch.get_num_threads() == 1
        assert workers.count(torch.device("cpu")) == threads  # still the caller's threads
    assert torch.get_num_threads() == threads


@needs_fused
def test_the_tuner_gives_workers_narrow_pieces(monkeypatch):
    # With workers the near-fastest width that is narrowest wins (pieces end together), rows are the
    # piece rule's; when other work blurs the rounds, 2048 columns.
    def timer(per_width):
        def fake(x, W, width, buffers):
            return per_width[width] * x.shape[0] * W.shape[1] * 1e-9

        return fake

    W = torch.randn(768, 20000)
    with workers.force(2):
        monkeypatch.setattr(tuning, "_time_kernel", timer({8192: 1.0, 4096: 1.02, 2048: 1.04, 1024: 1.2}))
        shape = tuning.measure(W, torch.float32)
        assert (shape.width, shape.rows, shape.lanes) == (2048, tuning.piece_rows(768), 2)
        rounds = iter([1.0, 2.0, 1.0] * 10)
        monkeypatch.setattr(tuning, "_time_kernel", lambda x, W, width, buffers: next(rounds))
        assert tuning.measure(W, torch.float32).width == 2048
    with workers.force(1):
        monkeypatch.setattr(tuning, "_time_kernel", timer({8192: 1.0, 4096: 1.02, 2048: 1.04, 1024: 1.2}))
        assert tuning.measure(W, torch.float32).lanes == 1
    assert tuning.piece_rows(768) == 2048 and tuning.piece_rows(640) == 2457 and tuning.piece_rows(8192) == 256


def test_the_finite_check_reads_a_sum_first_and_still_finds_every_bad_value():
    big = torch.full((1000,), 3e38)  # finite, but its sum overflows: the exact check decides
    precision.require_finite(big, "big")
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.zeros(10, dtype=torch.bfloat16)
        x[3] = bad
        with pytest.raises(precision.NonFiniteActivationError, match="1 NaN or inf"):
            precision.require_finite(x, "x")
    precision.require_finite(torch.arange(5), "integers")
    with warnings.catch_warnings():  # a tensor in a graph: read without touching autograd
        warnings.simplefilter("error")
        precision.require_finite(torch.randn(5, requires_grad=True) * 2, "in a graph")


def test_gathering_every_position_in_order_is_the_tensor_itself():
    x = torch.randn(2, 5, 3)
    every = torch.arange(5).expand(2, 5)
    assert gather_positions(x, every) is x
    some = torch.tensor([[4, 0], [1, 1]])
    assert torch.equal(gather_positions(x, some), torch.stack([x[0, [4, 0]], x[1, [1, 1]]]))


def test_an_interrupted_caller_returns_only_when_no_worker_is_running(monkeypatch):
    # Ctrl-C while waiting: the caller's buffers go back to the workspace as it unwinds, so every
    # worker must have stopped first (after its current piece), and no further piece may start.
    started, running = [], []
    lock = threading.Lock()
    real_queue = workers.queue.Queue

    class InterruptedOnce(real_queue):
        armed = True

        def get(self, *args, **kwargs):
            if InterruptedOnce.armed and threading.current_thread() is threading.main_thread():
                InterruptedOnce.armed = False
                while len(started) < 2:  # both workers inside a piece
                    threading.Event().wait(0.001)
                raise KeyboardInterrupt
            return super().get(*args, **kwargs)

    def work(worker, item):
        with lock:
            started.append(item)
            running.append(item)
        threading.Event().wait(0.05)
        with lock:
            running.remove(item)

    monkeypatch.setattr(workers.queue, "Queue", InterruptedOnce)
    with pytest.raises(KeyboardInterrupt):
        workers.run_in_turn(40, 2, work)
    assert running == [] and 2 <= len(started) < 40


@needs_fused
def test_the_same_call_gives_the_same_bits_whichever_worker_reads_which_piece(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    g, n, d, V = 4, 9, 32, 3000
    x, W = torch.randn(g * n, d, generator=gen), torch.randn(d, V, generator=gen)
    tid = torch.randint(0, V, (n, 2), generator=gen)
    results = []
    for order in ("round-robin", "reversed", "last-worker"):
        monkeypatch.setattr(workers, "run_in_turn", _scheduled(order))
        bufs = [torch.empty(g * n * 200) for _ in range(6)]
        with workers.force(3):
            results.append(
                tiles.read_product(
                    x, g, W, None, None, bufs, top_k=5, with_reference=True, target_ids=tid, width=200, piece_rows=12
                )
            )
    for name in ("log_z", "entropy", "kl_to_reference", "top_logits", "top_ids", "target_ranks"):
        assert all(torch.equal(getattr(r, name), getattr(results[0], name)) for r in results[1:]), name
