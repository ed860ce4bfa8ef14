"""Running under ``torch.distributed``: each rank evaluates its own shard, the statistics merge exactly.

The package is a citizen of PyTorch's own distributed engine (a process group launched by
``torchrun`` or initialised by the user), not a scheme of its own. Every rank runs the same
single-process code on a disjoint shard of the data; the running statistics (float64 sums,
int64 counts and histograms, minima and maxima) are all-reduced, so every rank returns the
same result, equal to one process's on the same data. Only rank 0 shows progress or writes.

Shard rule (:func:`shard_data`), rank ``r`` of ``W``:

- a token tensor ``[n, seq]``: rows ``i`` with ``i % W == r`` (strided, like an unshuffled
  ``DistributedSampler`` but without its padding): every row on exactly one rank, whatever
  ``n``; a rank may get no rows.
- a list or tuple of strings, any other iterable of strings or of batches (a ``DataLoader``
  without a ``DistributedSampler``): items ``i`` with ``i % W == r`` (for a ``DataLoader``
  an item is a batch, so it is sharded by batch index; every rank iterates the loader and
  keeps its batches).
- a ``DataLoader`` whose sampler is a ``DistributedSampler``: already sharded, used as it is.
  That sampler pads (``drop_last=False``) or drops (``drop_last=True``) samples when the
  dataset's length is not a multiple of ``W``; this is warned about, since those samples are
  then counted twice or not at all.
- a single string or a single dict batch: one item, so rank 0 reads it.

``max_tokens`` is a global budget. For a token tensor the ranks score exactly the tokens one
process would (the first ``max_tokens`` scored tokens of the data, each rank its rows of
them: :func:`tensor_budget`). For other data the budget is split evenly: rank ``r`` scores at
most ``max_tokens // W`` tokens, plus one for ranks ``r < max_tokens % W``, from the start of
its own shard; a shard that runs short is not made up by the others.

Training (:func:`tl_logitlens.lenses.train_tuned_lens`) does not shard the data this way: every
rank reads the whole data in the same order, cuts the same micro-batches as one process, and
runs micro-batch ``k`` of step ``s`` only if ``(k + s) % W == r``; :meth:`Group.sum_` then sums
the translators' gradients (one all-reduce a step), so a step's tokens and update are one
process's whatever ``W``, and a checkpoint's data position means the same on any world size.

Faults: the data-dependent work of each rank runs inside :meth:`Group.guard`; before the
statistics are reduced every rank all-gathers whether it failed and why, so a failing rank
raises its own error and every other rank raises :class:`RankFailedError` ("rank k failed:
...") instead of waiting in a collective. A rank that dies outright is caught by the process
group's timeout (:func:`init_from_env`) and by ``torchrun``, which stops the other workers.
"""

from __future__ import annotations

import atexit
import datetime
import itertools
import os
import warnings
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Iterator, List, Optional, Tuple

import torch

from .errors import LensInputError, RankFailedError

#: Seconds a collective may wait for the other ranks before the job fails (:func:`init_from_env`).
DEFAULT_TIMEOUT = 600.0

#: Marks an empty shard (a rank that holds no data: fewer items than ranks).
EMPTY = object()


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def group_active() -> bool:
    """Whether an initialised default process group exists in this process."""
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized())


def rank_and_world() -> Tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if not group_active():
        return 0, 1
    dist = _dist()
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    """True on rank 0, or without a process group: the process that prints and writes files."""
    return rank_and_world()[0] == 0


def init_from_env(timeout: float = DEFAULT_TIMEOUT, backend: Optional[str] = None) -> bool:
    """Initialise the default process group from ``torchrun``'s environment, if it set one.

    ``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``; without ``WORLD_SIZE`` and ``RANK`` (a plain ``python`` run) nothing
    happens and ``False`` is returned. The backend is NCCL when CUDA is available (each rank
    then uses ``cuda:LOCAL_RANK``) and gloo otherwise; ``backend`` overrides. ``timeout``
    (seconds) bounds every collective, so a rank that died cannot leave the others waiting.
    A group already initialised is kept (returns ``True``).

    Example::

        >>> from tl_logitlens.distributed import init_from_env
        >>> init_from_env()  # no torchrun here: no group
        False
    """
    if group_active():
        return True
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return False
    if not timeout or timeout <= 0:
        raise LensInputError(f"timeout must be a positive number of seconds, got {timeout!r}")
    dist = _dist()
    if not dist.is_available():
        raise LensInputError("torchrun set WORLD_SIZE, but this torch build has no torch.distributed")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise LensInputError(
                f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                "start at most that many processes per node (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
    _import_world_defaults()
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(timeout)))
    atexit.register(_shutdown)  # a group this function made is this process's to close
    return True


def _import_world_defaults() -> None:
    """Import ``torch.distributed.nn.functional`` while no group exists, so that it cannot pin one.

    Its collectives take ``group=group.WORLD`` as a default argument, evaluated at import.
    Imported after ``init_process_group`` (``torch.distributed.fsdp`` imports it, and
    transformers imports that while a model loads), the defaults hold the default group for
    the life of the process: :func:`_shutdown` can no longer free it, and the gloo worker
    threads outlive ``atexit``. A worker that drops its last collective's tensors after the
    interpreter began finalising must take the GIL to do so, and the process aborts
    ("terminate called without an active exception"). Imported first, the defaults are
    ``None``, which means the default group at call time.
    """
    try:
        import torch.distributed.nn.functional  # noqa: F401
    except ImportError:  # a torch without it has no such defaults either
        pass


def _shutdown() -> None:
    """Destroy the group :func:`init_from_env` made, joining its worker threads while Python runs."""
    if group_active():
        _dist().destroy_process_group()


def timeout_from_env() -> float:
    """The collective timeout in seconds: ``TL_LOGITLENS_DIST_TIMEOUT`` or :data:`DEFAULT_TIMEOUT`."""
    raw = os.environ.get("TL_LOGITLENS_DIST_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise LensInputError(f"TL_LOGITLENS_DIST_TIMEOUT={raw!r} is not a positive number of seconds")
    return value


# -- shards ---------------------------------------------------------------------------------
def distributed_sampler(data: Any) -> Any:
    from torch.utils.data import DistributedSampler

    for sampler in (getattr(data, "sampler", None), getattr(getattr(data, "batch_sampler", None), "sampler", None)):
        if isinstance(sampler, DistributedSampler):
            return sampler
    return None


def shard_data(data: Any, rank: int, world: int) -> Any:
    """This rank's shard of ``data`` by the module's rule; :data:`EMPTY` when it holds nothing.

    Shapes: a tensor ``[n, seq]`` becomes ``[len(range(rank, n, world)), seq]``.

    Example::

        >>> import torch
        >>> from tl_logitlens.distributed import shard_data
        >>> shard_data(torch.arange(10).view(5, 2), 1, 2).tolist()
        [[2, 3], [6, 7]]
        >>> from tl_logitlens.distributed import EMPTY
        >>> shard_data(["a", "b", "c"], 0, 2), shard_data(["a"], 1, 2) is EMPTY
        (['a', 'c'], True)
    """
    if world == 1:
        return data
    if type(data).__module__ == "numpy":
        data = torch.as_tensor(data)
    if isinstance(data, torch.Tensor):
        ids = data.unsqueeze(0) if data.ndim == 1 else data
        part = ids[rank::world]
        return part if part.shape[0] else EMPTY
    if isinstance(data, (str, bytes)) or hasattr(data, "keys"):
        return data if rank == 0 else EMPTY  # one item
    sampler = distributed_sampler(data)
    if sampler is not None:
        if (sampler.num_replicas, sampler.rank) != (world, rank):
            raise LensInputError(
                f"the DataLoader's DistributedSampler has num_replicas={sampler.num_replicas}, rank={sampler.rank}, "
                f"but this process is rank {rank} of {world}; build the sampler with the process group's rank and size"
            )
        n = len(sampler.dataset)
        if n % world:
            how = "dropped" if sampler.drop_last else "repeated (padding)"
            count = n % world if sampler.drop_last else world - n % world
            warnings.warn(
                f"the DistributedSampler's dataset has {n} samples, not a multiple of {world} ranks: "
                f"{count} sample(s) are {how}, so the totals are not exactly the data's. Pass the data "
                "without a DistributedSampler to shard it exactly.",
                UserWarning,
                stacklevel=3,
            )
        return data
    if isinstance(data, (list, tuple)):
        part = list(data[rank::world])
        return part if part else EMPTY
    try:
        iterator = iter(data)
    except TypeError:
        return data  # not data evaluate_lens reads: its own check names the problem
    mine = itertools.islice(iterator, rank, None, world)
    try:
        first = next(mine)
    except StopIteration:
        return EMPTY
    return itertools.chain([first], mine)


def tensor_budget(n_rows: int, seq: int, max_tokens: int, rank: int, world: int) -> Tuple[int, int]:
    """For ``max_tokens`` over a ``[n_rows, seq]`` tensor: ``(rows to shard, this rank's budget)``.

    One process scores the first ``max_tokens`` scored tokens (``seq - 1`` per row): rows
    ``0 .. rows - 1``, the last maybe in part. Sharding those rows and giving each rank the
    scored tokens of its rows makes the ranks together score exactly those tokens.

    Example::

        >>> from tl_logitlens.distributed import tensor_budget
        >>> [tensor_budget(10, 5, 10, r, 2) for r in range(2)]  # 4 per row: rows 0, 1 whole, row 2 half
        [(3, 6), (3, 4)]
    """
    per_row = max(0, seq - 1)
    if per_row == 0:
        return n_rows, 0
    rows = min(n_rows, -(-max_tokens // per_row))
    budget = sum(min(per_row, max(0, max_tokens - i * per_row)) for i in range(rank, rows, world))
    return rows, budget


def split_budget(max_tokens: int, rank: int, world: int) -> int:
    """Rank ``rank``'s even part of a global ``max_tokens``: the parts add up to it.

    Example::

        >>> from tl_logitlens.distributed import split_budget
        >>> [split_budget(10, r, 3) for r in range(3)]
        [4, 3, 3]
    """
    return max_tokens // world + (1 if rank < max_tokens % world else 0)


# -- the process group as evaluate_lens sees it -----------------------------------------------
class Group:
    """The default process group as a driver uses it: rank, size, shards, reductions and fault handling.

    Built by :func:`resolve`; evaluation and training use it the same way (:meth:`guard` the
    data-dependent work, :meth:`check` before reducing, :attr:`is_main` for output).
    """

    def __init__(self) -> None:
        dist = _dist()
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        backend = dist.get_backend()
        # NCCL reduces CUDA tensors only: the statistics travel through this rank's current device.
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.failure: Optional[BaseException] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, data: Any) -> Any:
        return shard_data(data, self.rank, self.world)

    def reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """All-reduce ``tensor`` (``op``: ``"sum"``, ``"min"``, ``"max"``); returns it on the CPU."""
        dist = _dist()
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        moved = tensor.to(self.device).contiguous()
        dist.all_reduce(moved, op=ops[op])
        return moved.cpu()

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run data-dependent work; an exception is remembered (and re-raised) for :meth:`check`."""
        try:
            yield
        except Exception as err:  # not KeyboardInterrupt: an interrupted job should stop, not meet the others
            self.failure = err
            self.check()  # tell the others, then raise our own error
            raise

    def check(self, agree: Any = None, what: str = "") -> None:
        """Every rank says whether it failed; a failure anywhere raises on every rank.

        The failing rank re-raises its own error (in :meth:`guard`); every other rank raises
        :class:`RankFailedError` naming the first failed rank and its error. ``agree``, when
        given, is a small value every rank must hold alike (a fingerprint of the data it read):
        if they differ, every rank raises :class:`LensInputError` naming ``what``.
        """
        dist = _dist()
        mine = None if self.failure is None else f"{type(self.failure).__name__}: {self.failure}"
        gathered: List[Any] = [None] * self.world
        dist.all_gather_object(gathered, (mine, agree))
        failed = [(r, got[0]) for r, got in enumerate(gathered) if got[0] is not None]
        if not failed:
            values = [got[1] for got in gathered]
            if agree is not None and any(v != values[0] for v in values):
                raise LensInputError(
                    f"the ranks disagree on {what or 'a value they must share'}: {values}; every rank must read "
                    "the same data in the same order (no shuffling without a fixed seed)"
                )
            return
        if self.failure is not None:
            return
        rank, msg = failed[0]
        more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
        raise RankFailedError(f"rank {rank} failed{more}: {msg}")

    def sum_(self, tensors: List[torch.Tensor]) -> None:
        """All-reduce (sum) ``tensors`` in place, as one flat float buffer: one collective.

        This is what ``DistributedDataParallel`` does with gradient buckets; training calls it
        once per step with the translators' gradients (and the step's loss).
        """
        if not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).to(self.device, torch.float32) for t in tensors])
        _dist().all_reduce(flat, op=_dist().ReduceOp.SUM)
        at = 0
        with torch.no_grad():
            for t in tensors:
                n = t.numel()
                t.copy_(flat[at : at + n].view_as(t))
                at += n

    def broadcast_(self, tensors: List[torch.Tensor]) -> None:
        """Overwrite ``tensors`` on every rank with rank 0's (one collective per tensor)."""
        with torch.no_grad():
            for t in tensors:
                moved = t.detach().to(self.device).contiguous()
                _dist().broadcast(moved, src=0)
                t.copy_(moved)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; for small state such as a checkpoint)."""
        box = [obj if self.is_main else None]
        _dist().broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]


def resolve(distributed: Optional[bool]) -> Optional[Group]:
    """The process group to run in: ``None`` (auto: one if initialised), ``False`` (off), ``True`` (required).

    Example::

        >>> from tl_logitlens.distributed import resolve
        >>> resolve(None) is None and resolve(False) is None  # no process group here
        True
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise LensInputError(f"distributed must be None (auto), True or False, got {distributed!r}")
    if distributed is False:
        return None
    if not group_active():
        if distributed:
            raise LensInputError(
                "distributed=True but no torch.distributed process group is initialised; launch with "
                "torchrun and call torch.distributed.init_process_group (or "
                "tl_logitlens.distributed.init_from_env) first"
            )
        return None
    return Group()


def guarded(group: Optional[Group]) -> AbstractContextManager:
    """:meth:`Group.guard` inside a group, else nothing: how a driver wraps its data-dependent work."""
    return group.guard() if group is not None else nullcontext()


def shard_for(group: Optional[Group], data: Any, max_tokens: Optional[int]) -> Tuple[Any, Optional[int]]:
    """This rank's shard of ``data`` and its part of the global ``max_tokens`` (the module's rule).

    Without a group, ``(data, max_tokens)`` unchanged. A rank's budget may be ``0``.
    """
    if group is None or group.world == 1:
        return data, max_tokens
    if type(data).__module__ == "numpy":
        data = torch.as_tensor(data)
    if isinstance(data, torch.Tensor) and data.ndim in (1, 2):
        ids = data.unsqueeze(0) if data.ndim == 1 else data
        budget = None
        if max_tokens is not None:
            rows, budget = tensor_budget(ids.shape[0], ids.shape[1], max_tokens, group.rank, group.world)
            ids = ids[:rows]
        return group.shard(ids), budget
    budget = None if max_tokens is None else split_budget(max_tokens, group.rank, group.world)
    return group.shard(data), budget
