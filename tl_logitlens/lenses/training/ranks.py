"""How a tuned-lens training run shares each step among the ranks of a process group (or runs alone).

Every rank reads the whole data in the same order and cuts the same micro-batches as one
process; micro-batch ``k`` of step ``s`` (from 0) runs on rank ``(k + s) % world`` only
(:meth:`Ranks.runs`), so a step's tokens are one process's whatever the world size. Each step
the ranks check that they cut the same micro-batches (a fingerprint of their tokens) and that
none failed, then one all-reduce sums the translators' gradients and the loss
(:meth:`Ranks.sum_step`). Rank 0 alone writes; the others wait for it (:meth:`Ranks.on_main`).
Alone (no group) every method is the single-process case.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable, List, Optional

import torch

from ...distributed import Group, guarded
from .batches import MicroBatch, fingerprint


class Ranks:
    """The process group a run trains in (``None``: one process), as the training loop uses it."""

    def __init__(self, group: Optional[Group]) -> None:
        self.group = group
        self.main = group is None or group.is_main
        self.world = 1 if group is None else group.world

    def guard(self) -> AbstractContextManager:
        """Wrap data-dependent work: under a group, a failure here reaches every rank at the next :meth:`check`."""
        return guarded(self.group)

    def check(self, **agree: Any) -> None:
        """Under a group, every rank learns whether any failed (and whether ``agree=`` values match)."""
        if self.group is not None:
            self.group.check(**agree)

    def on_main(self, write: Callable[[], None]) -> None:
        """Rank 0 writes; every rank waits for it (the check is the barrier) and learns if it failed."""
        with self.guard():
            if self.main:
                write()
        self.check()

    def share(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a checkpoint only rank 0 read)."""
        return obj if self.group is None else self.group.broadcast_object(obj)

    def broadcast_params(self, params: List[torch.Tensor]) -> None:
        """One starting lens on every rank (a ``lens=`` passed in may differ between ranks)."""
        if self.group is not None:
            self.group.broadcast_(params)

    def runs(self, k: int, step: int) -> bool:
        """Whether this rank runs micro-batch ``k`` of step ``step`` (both from 0)."""
        return self.group is None or (k + step) % self.group.world == self.group.rank

    def fold_fingerprint(self, so_far: int, tokens: MicroBatch) -> int:
        """The step's fingerprint so far with ``tokens`` folded in (0 alone: nothing to compare)."""
        return 0 if self.group is None else hash((so_far, fingerprint(tokens)))

    def sum_step(self, params: List[torch.nn.Parameter], total: float) -> float:
        """The step's gradient and loss summed over every rank's micro-batches (one all-reduce)."""
        if self.group is None:
            return total
        summed = torch.tensor([total], dtype=torch.float32, device=params[0].device)
        self.group.sum_([p.grad for p in params] + [summed])
        return float(summed[0])
