"""Micro-batches of an exact number of scored tokens, from a stream whose position can be saved.

A training step reads exactly ``tokens_per_step`` scored tokens (a position with a true next
token; padding never counts). :class:`MicroBatches` cuts the data's batches to that budget: a
batch cut at a step's end keeps whole rows, and its rest re-reads the cut row from its start
(the cut tokens keep their context) and scores only what the head did not. Its position
``(drawn, used)`` goes into a checkpoint, and :meth:`MicroBatches.skip_to` restores it.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Tuple

import torch

from ...errors import LensInputError
from ...inputs import Tokens, batches, split_long

#: Data with no scored token: nothing to train on (as evaluate_lens refuses it).
NOTHING_TO_TRAIN_ON = (
    "train_tuned_lens: no token was scored: every sequence is shorter than two tokens (a token is scored where a "
    "next token follows it), so there is nothing to train on; nothing was trained or written. Pass sequences of at "
    "least two tokens."
)


class MicroBatch:
    """Right-padded ids ``[b, seq]`` with ``lengths [b]``, scoring positions ``first[r] <= p < lengths[r] - 1``.

    A batch cut at a step's budget keeps whole rows: its rest re-reads the cut row from its
    start (the cut tokens keep their context) and scores only what the head did not.
    """

    def __init__(self, ids: torch.Tensor, lengths: torch.Tensor, first: Optional[torch.Tensor] = None) -> None:
        self.ids, self.lengths = ids, lengths
        self.first = torch.zeros_like(lengths) if first is None else first

    def counts(self) -> torch.Tensor:
        return (self.lengths - 1 - self.first).clamp_min(0)

    def scored(self) -> int:
        return int(self.counts().sum())

    def mask(self) -> torch.Tensor:
        """``[b, seq - 1]``: the scored positions (they have a next token and belong to this batch)."""
        pos = torch.arange(self.ids.shape[1] - 1).unsqueeze(0)
        return (pos >= self.first.unsqueeze(1)) & (pos < (self.lengths - 1).unsqueeze(1))

    def split(self, budget: int) -> Tuple[MicroBatch, Optional[MicroBatch]]:
        """``(the first budget scored tokens, the rest or None)``; every scored pair lands in exactly one."""
        counts = self.counts()
        cum = torch.cumsum(counts, 0)
        r = int((cum < budget).sum())  # the row where the budget runs out
        before = int(cum[r - 1]) if r > 0 else 0
        k = budget - before  # scored tokens of row r that go to the head (1 .. counts[r])
        head_len = self.lengths[: r + 1].clone()
        head_len[r] = int(self.first[r]) + k + 1
        head = MicroBatch(self.ids[: r + 1, : int(head_len.max())], head_len, self.first[: r + 1].clone())
        rest_first = self.first[r:].clone()
        rest_first[0] += k
        rest = MicroBatch(self.ids[r:], self.lengths[r:].clone(), rest_first)
        if rest.scored() == 0:
            return head, None
        return head, rest


class MicroBatches:
    """Micro-batches of at most a given number of scored tokens, with a position that can be
    saved and restored: ``(batches drawn, scored tokens of the last one already used)``."""

    def __init__(self, view: Any, data: Any, batch_size: int, n_ctx: Optional[int]) -> None:
        stream, total = batches(view, data, batch_size)
        if total == 0:  # known up front for token ids: refuse before any forward pass
            raise LensInputError(NOTHING_TO_TRAIN_ON)
        self.counts = {"split": 0, "windows": 0}
        self.source: Iterator[Tokens] = split_long(stream, n_ctx, batch_size, self.counts)
        self.drawn = 0  # batches taken from the source
        self.used = 0  # scored tokens already used of the batch being read
        self.pending: Optional[MicroBatch] = None

    def _draw(self) -> Optional[MicroBatch]:
        try:
            tokens = next(self.source)
        except StopIteration:
            return None
        self.drawn += 1
        self.used = 0
        return MicroBatch(tokens.ids, tokens.lengths)

    def skip_to(self, drawn: int, used: int) -> None:
        """Restore a position saved by a run of the same data: re-read and drop what it consumed."""
        while self.drawn < drawn:
            self.pending = self._draw()
            if self.pending is None:
                raise LensInputError(
                    f"cannot resume: the checkpoint had read {drawn} batches of the data but the data now "
                    f"holds only {self.drawn}; resume with the same data (in the same order) as the run "
                    "that wrote the checkpoint"
                )
        if used == 0:
            self.pending = None  # the last batch drawn was used up
        elif self.pending is not None:
            _, self.pending = self.pending.split(used)
            self.used = used

    def take(self, budget: int) -> Optional[MicroBatch]:
        """The next micro-batch of at most ``budget`` scored tokens, or ``None`` when the data is spent."""
        while self.pending is None or self.pending.scored() == 0:
            self.pending = self._draw()
            if self.pending is None:
                return None
        if self.pending.scored() <= budget:
            out, self.pending = self.pending, None
            self.used = 0
            return out
        out, self.pending = self.pending.split(budget)
        self.used += budget
        return out


def fingerprint(tokens: MicroBatch) -> Tuple[int, ...]:
    """A cheap summary of a micro-batch (its shape, scored range and a position-weighted id sum),
    compared across ranks each step: ranks reading different data would otherwise train silently wrong."""
    ids = tokens.ids.long()
    weights = torch.arange(1, ids.numel() + 1, dtype=torch.long).view_as(ids) % 1000003
    return (*ids.shape, int((ids * weights).sum()), *tokens.lengths.tolist(), *tokens.first.tolist())
