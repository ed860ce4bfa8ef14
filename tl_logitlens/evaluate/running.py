"""Running statistics of a lens over many tokens, in fixed memory, that merge exactly.

Per stack entry and statistic (:data:`STATISTICS`): a float64 sum, the minimum, the maximum
and a fixed histogram (:data:`HIST_BINS_PER_DECADE` log-spaced bins per decade over
``[HIST_LOW, HIST_HIGH)``, one bin below and one above), plus token, sequence and top-1 counts.
Two shards' statistics merge by adding sums, counts and histograms and combining extremes,
so a dataset split over processes gives exactly one process's counts and quantiles
(:meth:`RunningStats.merge`, :meth:`RunningStats.all_reduce`).

Example::

    >>> import torch
    >>> from tl_logitlens.running import RunningStats
    >>> a, b = RunningStats(2), RunningStats(2)
    >>> for r, x in ((a, torch.tensor([[0.5], [1.0]])), (b, torch.tensor([[2.0], [3.0]]))):
    ...     r.add({"kl_to_final": x, "next_token_loss": x, "entropy": x}, torch.zeros(2, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    >>> a.merge(b); a.n_tokens, a.sums["kl_to_final"].tolist()
    (2, [2.5, 4.0])
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Tuple

import torch

__all__ = [
    "STATISTICS",
    "HIST_LOW",
    "HIST_HIGH",
    "HIST_BINS_PER_DECADE",
    "N_BINS",
    "bin_index",
    "bin_edges",
    "RunningStats",
]

#: The per-token statistics summarised with a mean and quantiles.
STATISTICS = ("kl_to_final", "next_token_loss", "entropy")
#: Histogram range and resolution for the quantiles (values are in nats, all >= 0).
HIST_LOW = 1e-6
HIST_HIGH = 1e4
HIST_BINS_PER_DECADE = 200
_N_DECADES = round(math.log10(HIST_HIGH / HIST_LOW))
N_BINS = _N_DECADES * HIST_BINS_PER_DECADE + 2  # [0, LOW), the log bins, [HIGH, inf)


def bin_index(x: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each value of ``x`` (float64, >= 0): 0 below LOW, last bin at or above HIGH."""
    scaled = torch.floor((torch.log10(x.clamp_min(HIST_LOW)) - math.log10(HIST_LOW)) * HIST_BINS_PER_DECADE)
    index = scaled.long().clamp(0, N_BINS - 3) + 1
    index = torch.where(x < HIST_LOW, torch.zeros_like(index), index)
    return torch.where(x >= HIST_HIGH, torch.full_like(index, N_BINS - 1), index)


def bin_edges(i: int) -> Tuple[float, float]:
    if i == 0:
        return 0.0, HIST_LOW
    if i == N_BINS - 1:
        return HIST_HIGH, math.inf
    lo = HIST_LOW * 10 ** ((i - 1) / HIST_BINS_PER_DECADE)
    return lo, HIST_LOW * 10 ** (i / HIST_BINS_PER_DECADE)


class RunningStats:
    """Fixed-size running statistics for ``n_layer`` stack entries."""

    def __init__(self, n_layer: int) -> None:
        self.n_tokens = 0
        self.n_sequences = 0
        self.sums = {s: torch.zeros(n_layer, dtype=torch.float64) for s in STATISTICS}
        self.minima = {s: torch.full((n_layer,), math.inf, dtype=torch.float64) for s in STATISTICS}
        self.maxima = {s: torch.full((n_layer,), -math.inf, dtype=torch.float64) for s in STATISTICS}
        self.hists = {s: torch.zeros(n_layer, N_BINS, dtype=torch.int64) for s in STATISTICS}
        self.agree = torch.zeros(n_layer, dtype=torch.int64)
        self.correct = torch.zeros(n_layer, dtype=torch.int64)

    def add(self, values: Dict[str, torch.Tensor], top1: torch.Tensor, next_ids: torch.Tensor) -> None:
        """Fold in ``values[stat] [layer, n]`` and ``top1 [layer, n]`` for ``n`` tokens."""
        n_layer, n = top1.shape
        offsets = (torch.arange(n_layer) * N_BINS).unsqueeze(1)
        for stat, x in values.items():
            x = x.double()
            self.sums[stat] += x.sum(1)
            self.minima[stat] = torch.minimum(self.minima[stat], x.min(1).values)
            self.maxima[stat] = torch.maximum(self.maxima[stat], x.max(1).values)
            flat = (bin_index(x) + offsets).flatten()
            self.hists[stat] += torch.bincount(flat, minlength=n_layer * N_BINS).view(n_layer, N_BINS)
        self.agree += (top1 == top1[-1]).sum(1)
        self.correct += (top1 == next_ids.unsqueeze(0)).sum(1)
        self.n_tokens += n

    # -- merging (tl_logitlens.distributed): shards' statistics combine exactly -----------------
    def _packed(self) -> List[Tuple[torch.Tensor, str]]:
        """Everything as four flat tensors with the reduction that merges them, in a fixed order."""
        counts = torch.cat(
            [torch.tensor([self.n_tokens, self.n_sequences], dtype=torch.int64), self.agree, self.correct]
            + [self.hists[s].flatten() for s in STATISTICS]
        )
        return [
            (counts, "sum"),
            (torch.cat([self.sums[s] for s in STATISTICS]), "sum"),  # float64
            (torch.cat([self.minima[s] for s in STATISTICS]), "min"),
            (torch.cat([self.maxima[s] for s in STATISTICS]), "max"),
        ]

    def _unpack(self, counts: torch.Tensor, sums: torch.Tensor, minima: torch.Tensor, maxima: torch.Tensor) -> None:
        n_layer = self.agree.shape[0]
        self.n_tokens, self.n_sequences = int(counts[0]), int(counts[1])
        self.agree = counts[2 : 2 + n_layer].clone()
        self.correct = counts[2 + n_layer : 2 + 2 * n_layer].clone()
        hists = counts[2 + 2 * n_layer :].view(len(STATISTICS), n_layer, N_BINS)
        for k, s in enumerate(STATISTICS):
            self.hists[s] = hists[k].clone()
            self.sums[s] = sums[k * n_layer : (k + 1) * n_layer].clone()
            self.minima[s] = minima[k * n_layer : (k + 1) * n_layer].clone()
            self.maxima[s] = maxima[k * n_layer : (k + 1) * n_layer].clone()

    def merge(self, other: RunningStats) -> None:
        """Fold in another shard's statistics: sums and counts add, minima and maxima combine."""
        combine = {"sum": torch.add, "min": torch.minimum, "max": torch.maximum}
        self._unpack(*(combine[op](a, b) for (a, op), (b, _) in zip(self._packed(), other._packed())))

    def all_reduce(self, reduce: Callable[[torch.Tensor, str], torch.Tensor]) -> None:
        """Replace the statistics by their reduction over every rank: ``reduce(tensor, "sum"|"min"|"max")``
        is called four times, in the same order on every rank (e.g. ``Group.reduce``)."""
        self._unpack(*(reduce(t, op) for t, op in self._packed()))
