"""Single-threaded CPU workers that take a product's pieces in turn.

Why: torch splits every matrix product, and the fused statistics split every tile, across all
its threads, and each splits at a barrier: when another process takes a core for a while, every
tile waits for the thread that lost it. On the 2-core Xeon, beside a neighbour busy on one core,
a GPT-2-shaped lens cost 1.48-1.67 x the plain product that way (its tiled products alone 1.33 x).
Here each of ``P`` threads runs its own single-threaded products and statistics on whole pieces
(:mod:`tl_logitlens.kernel.tiles`: a block of positions by a tile of columns) and takes the next
piece when it is done: no barrier inside a product, and a thread that loses its core simply takes
fewer pieces (the tiles keep a set of running statistics per worker and merge them exactly at the
end). Meanwhile the caller runs on one thread (:func:`caller_single_threaded`). Beside the same
neighbour the lens then cost 1.02 x the product (Gemma-3-270m: 0.76 x, faster than the product
on two threads, which waits at its own barriers); quietly 1.15 and 1.01 x.

The threads live for the process (one pool, rebuilt when ``torch.get_num_threads()`` changes or
after a ``fork``); each sets its own torch thread count to 1 once, and the caller's count is put
back, so nothing outside the pool sees a change.

:func:`count` says how many workers a product gets: ``torch.get_num_threads()`` on the CPU, unless
:func:`force` says otherwise (``force(1)`` runs today's one-stream path, as the tests do to run both).

Example::

    >>> from tl_logitlens.kernel import workers
    >>> seen = []
    >>> workers.run_in_turn(5, 2, lambda worker, item: seen.append(item))
    >>> sorted(seen)
    [0, 1, 2, 3, 4]
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import threading
from typing import Callable, Iterator, List, Optional

import torch

_NAME = "tl_logitlens-worker-"
_forced: List[Optional[int]] = [None]
_caller = threading.local()  # .threads: the count a caller_single_threaded block put aside
_lock = threading.Lock()
_pool: Optional[_Pool] = None


@contextlib.contextmanager
def force(workers: Optional[int]) -> Iterator[None]:
    """Inside the block, products on the CPU use ``workers`` single-threaded workers (``1``: one
    stream of multi-threaded products); ``None`` keeps what holds outside the block."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    saved = _forced[0]
    _forced[0] = saved if workers is None else workers
    try:
        yield
    finally:
        _forced[0] = saved


def count(device: torch.device) -> int:
    """Workers for a product on ``device``: the forced number, else ``torch.get_num_threads()`` on the CPU, else 1."""
    if torch.device(device).type != "cpu":
        return 1
    return _forced[0] or getattr(_caller, "threads", None) or torch.get_num_threads()


@contextlib.contextmanager
def caller_single_threaded(active: bool = True) -> Iterator[None]:
    """Inside the block the calling thread runs torch on one thread (its own count is put back after).

    For a caller that hands the heavy work to the workers and only prepares it: a second
    OpenMP thread of its own would only spin or wait at barriers beside them.
    """
    if not active or threading.current_thread().name.startswith(_NAME):
        yield
        return
    threads = torch.get_num_threads()
    saved = getattr(_caller, "threads", None)
    _caller.threads = saved or threads  # count() still answers for the caller's threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _caller.threads = saved
        torch.set_num_threads(threads)


def run_in_turn(items: int, workers: int, work: Callable[[int, int], None]) -> None:
    """Call ``work(worker, item)`` for every ``item`` in ``range(items)``, each item once, on
    ``workers`` single-threaded pool threads that take the next item when they are done.

    Returns when every item is done; the first exception raised by ``work`` is raised here
    (after the other workers stopped taking items). An interrupt of the caller (``Ctrl-C``) stops
    the workers after their current item and is raised once none is running, so no worker writes
    into buffers the caller goes on to free or reuse.
    """
    if workers <= 1 or items <= 1:
        for item in range(items):
            work(0, item)
        return
    pool = _get_pool(workers)
    taken = itertools.count()  # next() on a count is atomic under the GIL
    failed: List[BaseException] = []
    done = queue.Queue()

    def drain(worker: int) -> None:
        try:
            while not failed:
                item = next(taken)
                if item >= items:
                    break
                work(worker, item)
        except BaseException as err:  # noqa: BLE001 - handed to the caller below
            failed.append(err)
        finally:
            done.put(worker)

    for worker in range(workers):
        pool.jobs.put((drain, worker))
    finished = 0
    try:
        while finished < workers:
            done.get()
            finished += 1
    except BaseException as err:  # an interrupt: no worker may still write into buffers the caller frees
        failed.append(err)
        while finished < workers:
            try:
                done.get()
                finished += 1
            except BaseException:  # noqa: BLE001 - a second interrupt: keep waiting, the pieces are short
                pass
        raise
    if failed:
        raise failed[0]


class _Pool:
    """``size`` daemon threads, each with one torch thread, running ``(function, argument)`` jobs."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.jobs: queue.Queue = queue.Queue()
        ready = threading.Barrier(size + 1)
        caller_threads = torch.get_num_threads()
        self.threads = [
            threading.Thread(target=self._serve, args=(ready,), name=f"{_NAME}{i}", daemon=True) for i in range(size)
        ]
        for thread in self.threads:
            thread.start()
        ready.wait()
        # torch.set_num_threads also sets the count that new threads start with: put the caller's back.
        torch.set_num_threads(caller_threads)

    def _serve(self, ready: threading.Barrier) -> None:
        torch.get_num_threads()  # settle this thread's lazy initialisation first, so it keeps the 1 below
        torch.set_num_threads(1)
        ready.wait()
        while True:
            job = self.jobs.get()
            if job is None:
                return
            function, argument = job
            function(argument)

    def close(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)


def _get_pool(size: int) -> _Pool:
    global _pool
    with _lock:
        if _pool is None or _pool.size != size:
            if _pool is not None:
                _pool.close()
            _pool = _Pool(size)
        return _pool


def _forget_pool_in_child() -> None:
    # A forked child has none of the parent's threads: it builds its own pool when it needs one.
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)
