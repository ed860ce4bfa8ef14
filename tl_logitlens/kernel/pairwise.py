"""Divergences between two readings of the same rows, a tile of vocabulary columns at a time.

For row ``i`` two vectors ``x_p[i]`` and ``x_q[i]`` are read through the final norm and the
unembedding into distributions ``p`` and ``q`` over the vocabulary; this module returns, per row,

- ``KL(p || q) = sum p (log p - log q)``,
- ``JS(p, q) = (KL(p || m) + KL(q || m)) / 2`` with ``m = (p + q) / 2`` (nats, at most ``log 2``),
- ``TV(p, q) = sum |p - q| / 2`` (at most 1),

without ever holding ``[rows, d_vocab]`` logits. KL alone could be summed in one pass with the
online log-sum-exp (:mod:`tl_logitlens.kernel.tiles`), but JS and TV are not: ``|p - q|`` and
``log m`` need both distributions *normalised* at each column, and a later tile can change both
normalisers by different factors, which no running sum can undo. So the read takes two passes
over the same tiles: the first sums ``log Z_p`` and ``log Z_q`` (online log-sum-exp), the
second computes ``log p = l_p - log Z_p`` and ``log q`` exactly at every column and sums the
three statistics. Both passes recompute the tile's product (two products per side; nothing of
size ``d_vocab`` is kept), in the compute dtype (float32; float64 for a float64 model). An
unembedding stored in half precision is cast a tile of columns at a time.

A logit transform that is not elementwise (it needs whole rows) makes the tile the whole
vocabulary.

Example::

    >>> import torch
    >>> from tl_logitlens.kernel import FinalNorm, Unembedding
    >>> u = Unembedding(torch.randn(8, 300), None, FinalNorm("RMS", None, None, 1e-6))
    >>> x = torch.randn(4, 8)
    >>> same = read_pairs(u, x, x, norm="recompute")
    >>> [round(float(t.abs().max()), 6) for t in (same.kl, same.js, same.tv)]
    [0.0, 0.0, 0.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Tuple

import torch

from .precision import compute_dtype
from .read import Unembedding

#: Vocabulary columns per tile (a test may force a narrow one to exercise many tiles).
PAIR_COLUMNS = 2048
#: The most memory the working tiles of one :func:`read_pairs` chunk take (bytes).
PAIR_BUDGET_BYTES = 64 * 2**20
# Tiles alive at once per row of a side: its two logits rows (both sides in one tile) and three buffers.
_TILES_PER_ROW = 5
_LN2 = math.log(2.0)


@dataclass
class PairStats:
    """Per-row divergences of :func:`read_pairs`, each ``[rows]`` in float32 on the CPU.

    Attributes:
        kl: ``KL(p || q)``, nats.
        js: Jensen-Shannon divergence, nats (``0 <= js <= log 2``).
        tv: total variation distance (``0 <= tv <= 1``).
    """

    kl: torch.Tensor
    js: torch.Tensor
    tv: torch.Tensor


def _whole_rows(transform: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> bool:
    return transform is not None and not getattr(transform, "elementwise", False)


def _tiles(unembed: Unembedding, x: torch.Tensor, width: int, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Raw logits ``[rows, w]`` of normalised ``x [rows, d_model]``, one tile of columns after another."""
    W, b, transform = unembed.W, unembed.b, unembed.transform
    for a in range(0, W.shape[1], width):
        z = min(W.shape[1], a + width)
        tile = x @ W[:, a:z].to(dtype=dtype, memory_format=torch.contiguous_format)
        if b is not None:
            tile += b[a:z].to(dtype)
        yield transform(tile) if transform is not None else tile


def _log_z(unembed: Unembedding, x: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """``log sum exp(logits)`` per row, the online log-sum-exp over the tiles (first pass)."""
    peak = x.new_full((x.shape[0],), float("-inf"))
    total = x.new_zeros(x.shape[0])
    for tile in _tiles(unembed, x, width, dtype):
        new_peak = torch.maximum(peak, tile.amax(-1))
        total = total * torch.exp(peak - new_peak) + torch.exp(tile - new_peak.unsqueeze(1)).sum(-1)
        peak = new_peak
    return peak + total.log()


def _chunk_sums(
    unembed: Unembedding, xp: torch.Tensor, xq: torch.Tensor, width: int, dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(KL, JS, TV)`` ``[rows]`` of one chunk of normalised rows: log Z of both, then the sums (second pass).

    Per column, with ``s = p + q`` and ``log m = log s - log 2``: ``p (log p - log q)`` for KL,
    ``|p - q|`` for TV, and ``p log p + q log q - s log m`` (twice JS's term, which cancels where
    ``p`` and ``q`` agree, column by column) for JS; in place in three reused tile buffers.
    """
    n = xp.shape[0]
    both = torch.cat([xp, xq])  # one product per tile reads both sides
    log_z = _log_z(unembed, both, width, dtype)
    kl, js, tv = (xp.new_zeros(n) for _ in range(3))
    scratch = [xp.new_empty(n * width) for _ in range(3)]
    for tile in _tiles(unembed, both, width, dtype):
        tile.sub_(log_z.unsqueeze(1))
        log_p, log_q = tile[:n], tile[n:]
        p, q, work = (buffer[: log_p.numel()].view_as(log_p) for buffer in scratch)
        torch.exp(log_p, out=p)
        torch.exp(log_q, out=q)
        kl += torch.sub(log_p, log_q, out=work).mul_(p).sum(-1)
        tv += torch.sub(p, q, out=work).abs_().sum(-1)
        log_p.mul_(p).addcmul_(q, log_q)  # p log p + q log q
        log_m = torch.add(p, q, out=work).log_().clamp_min_(-1e4).sub_(_LN2)  # -inf where p = q = 0: s log m = 0
        js += log_p.addcmul_(p.add_(q), log_m, value=-1.0).sum(-1)
    return kl.clamp_min(0.0), (js / 2).clamp(0.0, _LN2), (tv / 2).clamp(0.0, 1.0)


def read_pairs(
    unembed: Unembedding,
    p_vectors: torch.Tensor,
    q_vectors: torch.Tensor,
    *,
    norm: str = "recompute",
    width: Optional[int] = None,
) -> PairStats:
    """KL, JS and TV between the readings of ``p_vectors [rows, d_model]`` and ``q_vectors [rows, d_model]``.

    Row ``i`` of one is compared with row ``i`` of the other. ``norm``: ``"recompute"`` (each
    vector through the final norm) or ``"none"``. ``width``: columns per tile (default
    :data:`PAIR_COLUMNS`). Rows are read a chunk at a time within :data:`PAIR_BUDGET_BYTES`,
    on ``W_U``'s device; results come back on the CPU.

    Example::

        >>> import torch
        >>> from tl_logitlens.kernel import FinalNorm, Unembedding
        >>> u = Unembedding(torch.randn(8, 50), None, FinalNorm(None, None, None, 0.0))
        >>> s = read_pairs(u, torch.randn(3, 8), torch.randn(3, 8), width=16)
        >>> bool((s.js <= s.tv).all()), tuple(s.kl.shape)  # JS <= TV * log 2 <= TV
        (True, (3,))
    """
    if p_vectors.shape != q_vectors.shape or p_vectors.dim() != 2:
        raise ValueError(
            f"read_pairs takes two [rows, d_model] tensors of one shape, got {p_vectors.shape} and {q_vectors.shape}"
        )
    if norm not in ("recompute", "none"):
        raise ValueError(f"read_pairs reads norm='recompute' or 'none', got {norm!r}")
    W = unembed.W
    dtype = compute_dtype(W.dtype)
    d_vocab = W.shape[1]
    width = d_vocab if _whole_rows(unembed.transform) else min(d_vocab, width or PAIR_COLUMNS)
    step = max(1, PAIR_BUDGET_BYTES // (_TILES_PER_ROW * width * torch.finfo(dtype).bits // 8))
    fnorm = unembed.final_norm.to(dtype, W.device)
    out = [torch.empty(p_vectors.shape[0], dtype=torch.float32) for _ in range(3)]
    with torch.no_grad():
        for start in range(0, p_vectors.shape[0], step):
            stop = min(p_vectors.shape[0], start + step)
            xp, xq = (fnorm.apply(v[start:stop].to(device=W.device, dtype=dtype), norm) for v in (p_vectors, q_vectors))
            for target, value in zip(out, _chunk_sums(unembed, xp, xq, width, dtype)):
                target[start:stop] = value.float().cpu()
    return PairStats(*out)
