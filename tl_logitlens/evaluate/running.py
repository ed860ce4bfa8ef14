"""Running statistics of a lens over many tokens, in fixed memory, that merge exactly.

The quantiles (:meth:`RunningStats.quantile`) are read from the histograms: interpolated
geometrically inside the bin that holds the quantile and clamped to the smallest and largest
values seen, so a quantile is off by at most one bin: a relative error below
``10 ** (1 / HIST_BINS_PER_DECADE) - 1`` (1.2%) for values in ``[1e-6, 1e4)``, an absolute
error below ``1e-6`` under that, and a value in ``[1e4, max]`` above it.

Per stack entry and statistic (:data:`STATISTICS`): a float64 sum, the minimum, the maximum
and a fixed histogram (:data:`HIST_BINS_PER_DECADE` log-spaced bins per decade over
``[HIST_LOW, HIST_HIGH)``, one bin below and one above), plus token, sequence and top-1 counts.
Two shards' statistics merge by adding sums, counts and histograms and combining extremes,
so a dataset split over processes gives exactly one process's counts and quantiles
(:meth:`RunningStats.merge`, :meth:`RunningStats.all_reduce`).

Example::

    >>> import torch
    >>> from tl_logitlens.evaluate.running import RunningStats
    >>> a, b = RunningStats(2), RunningStats(2)
    >>> for r, x in ((a, torch.tensor([[0.5], [1.0]])), (b, torch.tensor([[2.0], [3.0]]))):
    ...     r.add({"kl_to_final": x, "next_token_loss": x, "entropy": x}, torch.zeros(2, 1, dtype=torch.long),
    ...           torch.zeros(1, dtype=torch.long))
    >>> a.merge(b); a.n_tokens, a.sums["kl_to_final"].tolist()
    (2, [2.5, 4.0])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Tuple

import torch

from ..errors import LensInputError

__all__ = [
    "STATISTICS",
    "HIST_LOW",
    "HIST_HIGH",
    "HIST_BINS_PER_DECADE",
    "N_BINS",
    "bin_index",
    "bin_edges",
    "RunningStats",
    "FieldError",
    "reading_field",
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

    @property
    def n_layer(self) -> int:
        return int(self.agree.shape[0])

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

    # -- summaries ------------------------------------------------------------------------------
    def mean(self, statistic: str) -> torch.Tensor:
        """``[layer]`` mean of ``statistic`` over the tokens (float64; 0 with no token)."""
        _check_statistic(statistic)
        return self.sums[statistic] / max(1, self.n_tokens)

    def quantile(self, statistic: str, q: float) -> torch.Tensor:
        """``[layer]`` the ``q``-quantile of ``statistic`` from its histogram (within one bin, module docstring);
        NaN for an entry that saw no token."""
        _check_statistic(statistic)
        if not 0.0 <= q <= 1.0:
            raise LensInputError(f"q must lie in [0, 1], got {q!r}")
        out = torch.full((self.n_layer,), float("nan"), dtype=torch.float64)
        for layer in range(self.n_layer):
            counts = self.hists[statistic][layer]
            if int(counts.sum()) > 0:
                low, high = float(self.minima[statistic][layer]), float(self.maxima[statistic][layer])
                out[layer] = _histogram_quantile(counts, q, low, high)
        return out

    # -- persistence (the "statistics" and top-1 fields of a saved evaluation) ------------------
    def to_dict(self) -> Dict[str, Any]:
        """The statistics as JSON-ready values; histograms sparse, ``[[bin, count], ...]`` per entry."""

        def sparse(h: torch.Tensor) -> List[List[List[int]]]:
            return [[[int(i), int(row[i])] for i in torch.nonzero(row).flatten().tolist()] for row in h]

        return {
            "n_tokens": int(self.n_tokens),
            "n_sequences": int(self.n_sequences),
            "histogram": {"low": HIST_LOW, "high": HIST_HIGH, "bins_per_decade": HIST_BINS_PER_DECADE},
            "statistics": {
                stat: {
                    "sum": [float(v) for v in self.sums[stat].tolist()],
                    "min": [float(v) for v in self.minima[stat].tolist()],
                    "max": [float(v) for v in self.maxima[stat].tolist()],
                    "hist": sparse(self.hists[stat]),
                }
                for stat in STATISTICS
            },
            "top1_agree": [int(v) for v in self.agree.tolist()],
            "top1_correct": [int(v) for v in self.correct.tolist()],
        }

    @classmethod
    def from_dict(cls, data: Mapping, n_layer: int) -> RunningStats:
        """Inverse of :meth:`to_dict` for ``n_layer`` entries; a malformed value raises naming its field
        (:class:`~tl_logitlens.errors.LensInputError`, the field as ``err.field``)."""
        out = cls(n_layer)
        with reading_field("histogram"):
            bins = data["histogram"]
            if (bins["low"], bins["high"], bins["bins_per_decade"]) != (HIST_LOW, HIST_HIGH, HIST_BINS_PER_DECADE):
                raise LensInputError(f"the saved histogram bins {bins} differ from this version's")
        for stat in STATISTICS:
            with reading_field(f"statistics.{stat}"):
                entry = data["statistics"][stat]
            for key, store in (("sum", out.sums), ("min", out.minima), ("max", out.maxima)):
                with reading_field(f"statistics.{stat}.{key}"):
                    store[stat] = _per_layer(entry[key], torch.float64, n_layer)
            with reading_field(f"statistics.{stat}.hist"):
                rows = entry["hist"]
                if len(rows) != n_layer:
                    raise ValueError(f"has {len(rows)} rows for {n_layer} labels")
                for layer, pairs in enumerate(rows):
                    for i, count in pairs:
                        out.hists[stat][layer, int(i)] = int(count)
        for key, name in (("top1_agree", "agree"), ("top1_correct", "correct")):
            with reading_field(key):
                setattr(out, name, _per_layer(data[key], torch.int64, n_layer))
        for key in ("n_tokens", "n_sequences"):
            with reading_field(key):
                setattr(out, key, int(data[key]))
        return out


def _check_statistic(statistic: str) -> None:
    if statistic not in STATISTICS:
        raise LensInputError(f"statistic must be one of {STATISTICS}, got {statistic!r}")


def _histogram_quantile(counts: torch.Tensor, q: float, low_seen: float, high_seen: float) -> float:
    """The ``q``-quantile of one entry's histogram ``counts [N_BINS]``, clamped to the values seen."""
    target = q * int(counts.sum())
    cum = torch.cumsum(counts, 0)
    i = min(int((cum < target).sum()), N_BINS - 1)  # the bin holding the quantile
    before = float(cum[i - 1]) if i > 0 else 0.0
    inside = float(counts[i])
    frac = 0.0 if inside == 0 else min(1.0, max(0.0, (target - before) / inside))
    lo, hi = bin_edges(i)
    lo, hi = max(lo, low_seen), min(hi, high_seen)
    if hi <= lo or frac <= 0.0:
        value = lo
    elif frac >= 1.0:
        value = hi  # exactly: lo * (hi / lo) ** 1 can round away from it
    elif lo > 0:
        value = lo * (hi / lo) ** frac  # geometric inside a log-spaced bin
    else:
        value = lo + (hi - lo) * frac
    return min(max(value, low_seen), high_seen)


def _per_layer(values: Any, dtype: torch.dtype, n_layer: int) -> torch.Tensor:
    out = torch.tensor(values, dtype=dtype)
    if out.shape != (n_layer,):
        raise ValueError(f"holds {tuple(out.shape)} values for {n_layer} labels")
    return out


class reading_field:
    """Name the field being read: a missing key or a malformed value becomes a
    :class:`~tl_logitlens.errors.LensInputError` carrying ``field`` (the caller words the message)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: Any, tb: Any) -> bool:
        if err is None or isinstance(err, LensInputError):
            return False
        if isinstance(err, KeyError):
            raise FieldError(self.name, f"lacks {err}") from None
        if isinstance(err, (TypeError, ValueError, IndexError, RuntimeError)):
            raise FieldError(self.name, f"is not as save() writes it ({err})") from None
        return False


class FieldError(LensInputError):
    """A saved field that is missing or malformed: ``field`` names it, ``problem`` says what is wrong."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"field {field!r} {problem}")
        self.field, self.problem = field, problem
