"""One matrix product's worth of rows, read a tile of vocabulary columns at a time.

``logits = x @ W_U + b_U`` for ``[rows, d_model]`` normalised vectors is never held
whole: it is computed a tile of columns at a time (a width measured for the processor at
hand, :mod:`tl_logitlens.kernel.tuning`) into a buffer small enough to mostly stay in its
caches, every statistic is updated from that tile, and the tile is overwritten by the next.
Writing whole ``[rows, d_vocab]`` rows to main memory and reading them back cost the previous,
row-chunked kernel about 1.22 x the plain product on GPT-2 shapes; tiles bring the whole logit lens
to about 1.0 x (``make bench``).

The statistics are running sums over the tiles, shifted by each row's running maximum
``m`` (the online log-sum-exp): with ``s = l - m``,

- ``Z = sum exp(s)``, ``A = sum exp(s) * s``: entropy ``= log Z - A / Z``;
- ``D = sum exp(s_ref) * s``: ``sum p_ref * s = D / Z_ref``, so
  ``KL(ref || x) = A_ref / Z_ref - log Z_ref - D / Z_ref + log Z``;

and when a tile raises the maximum from ``m`` to ``m'`` the sums so far are rescaled by
``exp(m - m')`` (``A`` and ``D`` also shift by ``(m - m') * Z``). Top-k is merged tile by
tile, looking only inside blocks of columns whose maximum beats the row's running k-th
value. True next tokens' and targets' logits are picked from the tile that holds them,
and so are the logits of token groups' members (``member_ids``, sorted): each tile hands
over the members' columns it holds, so ``[rows, members]`` numbers are kept, never a
``[rows, d_vocab]`` block (:func:`tl_logitlens.readout.group_statistics` reduces them).

On the fused CPU path the product is not one stream of multi-threaded products: single-threaded
workers (:mod:`tl_logitlens.kernel.workers`, one per torch thread) take pieces in turn, a block of
positions (every entry of them, the reference's rows with them) by a tile of columns, each worker
with its own buffers, each piece with its own statistics. At the end they are merged exactly, in
the tiles' order (:meth:`_FusedTiles.merge`: the sums moved to the common maximum, as a tile that
raises it moves them; counts added; the best ``k`` of all candidates), so a worker that loses its
core to another process only takes fewer pieces, nothing waits at a barrier inside a product, and
the numbers do not depend on which worker took which piece.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch

from . import native, workers

#: Vocabulary columns per tile when set (a forced width, as the tests do); ``None``: the
#: width measured for the machine at hand (:mod:`tl_logitlens.kernel.tuning`).
TILE_COLUMNS: Optional[int] = None
#: How many ``[rows, width]`` buffers the kernel holds.
BUFFERS = 3
# Width when none is measured or given.
_FALLBACK_COLUMNS = 1024
# Top-k candidates are searched inside blocks of this many columns.
_TOPK_BLOCK = 128
# exp(x) = 2 ** (x * log2(e)): torch's exp2 costs half its exp, and the scaling rides on
# the in-place shift by the row maximum, so the shifted logits are kept in log2 units.
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@dataclass
class ProductStats:
    """Statistics of ``g`` entries x ``n`` rows read by :func:`read_product`, each ``[g, n, ...]``."""

    log_z: torch.Tensor  # log sum exp(logits): log p = logit - log_z
    entropy: torch.Tensor
    top_logits: torch.Tensor  # [g, n, k]
    top_ids: torch.Tensor  # [g, n, k]
    kl_to_reference: Optional[torch.Tensor] = None
    next_logit: Optional[torch.Tensor] = None  # the true next token's logit (0 where none)
    target_logits: Optional[torch.Tensor] = None  # [g, n, t]
    target_ranks: Optional[torch.Tensor] = None  # [g, n, t]
    member_logits: Optional[torch.Tensor] = None  # [g, n, members]: the group members' logits


def needs_whole_rows(transform: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> bool:
    """Whether ``transform`` needs a whole row of logits at once (an elementwise soft cap does not)."""
    return transform is not None and not getattr(transform, "elementwise", False)


def tile_width(
    d_vocab: int, transform: Optional[Callable[[torch.Tensor], torch.Tensor]], width: Optional[int] = None
) -> int:
    """Columns per tile: :data:`TILE_COLUMNS` if set, else ``width`` (the measured one), else 1024;
    the whole vocabulary for a transform that needs whole rows."""
    if needs_whole_rows(transform):
        return d_vocab
    return min(d_vocab, TILE_COLUMNS or width or _FALLBACK_COLUMNS)


def _update_top_k(
    tile: torch.Tensor, k: int, top_values: torch.Tensor, top_ids: torch.Tensor, offset: int, first: bool
) -> torch.Tensor:
    """Fold one tile of raw logits ``[m, w]`` into the running top-k ``[m, k]`` (in place); returns its row maxima.

    After the first tile a column can enter the top k only if it beats the row's running
    k-th value, so only the rows and blocks of columns whose maximum does are searched;
    that is exact, and after the first few tiles few rows qualify.
    """
    m, w = tile.shape
    size = _TOPK_BLOCK
    n_blocks = w // size
    if first or w % size or n_blocks < 2 or k > size:  # first, small or ragged tile: search it whole
        values, ids = tile.topk(min(k, w), dim=-1)
        _merge(top_values, top_ids, None, values, ids + offset)
        return values[:, 0]
    blocks = tile.view(m, n_blocks, size)
    block_max = blocks.amax(-1)  # [m, n_blocks]
    hit = block_max > top_values[:, -1:]
    rows = hit.any(-1).nonzero().squeeze(1)
    if rows.numel():
        local, block = hit[rows].nonzero(as_tuple=True)
        values, ids = blocks[rows[local], block].topk(k, dim=-1)  # [hits, k]
        slots = (block * k).unsqueeze(1) + torch.arange(k, device=tile.device)
        cand_values = tile.new_full((rows.numel(), n_blocks * k), float("-inf"))
        cand_ids = torch.zeros(rows.numel(), n_blocks * k, dtype=torch.long, device=tile.device)
        cand_values[local.unsqueeze(1), slots] = values
        cand_ids[local.unsqueeze(1), slots] = ids + (block * size + offset).unsqueeze(1)
        _merge(top_values, top_ids, rows, cand_values, cand_ids)
    return block_max.amax(-1)


def _merge(
    top_values: torch.Tensor,
    top_ids: torch.Tensor,
    rows: Optional[torch.Tensor],
    values: torch.Tensor,
    ids: torch.Tensor,
) -> None:
    """Fold candidates ``values``/``ids`` for ``rows`` (all rows if ``None``) into the running top-k, in place."""
    k = top_values.shape[1]
    old_values = top_values if rows is None else top_values[rows]
    old_ids = top_ids if rows is None else top_ids[rows]
    best, where = torch.cat([old_values, values], dim=1).topk(k, dim=-1)
    best_ids = torch.cat([old_ids, ids], dim=1).gather(1, where)
    if rows is None:
        top_values.copy_(best)
        top_ids.copy_(best_ids)
    else:
        top_values[rows] = best
        top_ids[rows] = best_ids


def _pick(picked: torch.Tensor, logits: torch.Tensor, token: torch.Tensor, a: int, z: int) -> None:
    """``picked[:, i] = logits[:, i, token[i] - a]`` for the rows whose ``token`` lies in ``[a, z)``."""
    rows = ((token >= a) & (token < z)).nonzero().squeeze(1)
    if rows.numel():
        picked[:, rows] = logits[:, rows, token[rows] - a]


def read_product(
    x: torch.Tensor,
    g: int,
    W: torch.Tensor,
    b: Optional[torch.Tensor],
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]],
    buffers: List[torch.Tensor],
    *,
    top_k: int,
    with_reference: bool,
    next_tokens: Optional[torch.Tensor] = None,
    target_ids: Optional[torch.Tensor] = None,
    keep_logits: Optional[Callable[[int, int, torch.Tensor], None]] = None,
    w_tile: Optional[torch.Tensor] = None,
    width: Optional[int] = None,
    member_ids: Optional[torch.Tensor] = None,
    fused: Optional[bool] = None,
    piece_rows: Optional[int] = None,
) -> ProductStats:
    """Read ``x [g * n, d_model]`` (``g`` entries of the same ``n`` rows) through ``W [d_model, d_vocab]``.

    ``with_reference``: entry 0 is the reference distribution for every entry's KL.
    ``next_tokens [n]`` (``-1`` for none) and ``target_ids [n, t]`` are per row.
    ``buffers``: :data:`BUFFERS` flat tensors of at least ``g * n * width`` elements.
    ``keep_logits(a, z, logits [g, p, z - a], i0)`` receives each tile's raw logits of positions
    ``i0 : i0 + p`` (all ``n`` of them without workers), possibly from a worker's thread.
    ``W`` may be stored in another dtype than ``x`` (a bfloat16 or float16 model read in
    float32): each tile of columns is then cast into ``w_tile`` (a flat buffer of at least
    ``d_model * width`` elements of ``x``'s dtype, made here when not given), so no full
    float32 copy of the unembedding is ever made; a ``W`` already in ``x``'s dtype is read
    in place.
    ``width``: columns per tile (see :func:`tile_width`).
    ``member_ids [members]``: token ids sorted ascending (repeats allowed) whose logits are
    picked from the tile that holds them into ``member_logits [g, n, members]``.
    ``fused``: read each tile's statistics with the fused C kernel (:mod:`~.native`, one pass
    over each row while the tile is in cache) or as tensor operations; ``None``: the fused
    kernel wherever :func:`tl_logitlens.kernel.native.fused` says it runs.
    ``piece_rows``: on the fused path with more than one worker (:func:`tl_logitlens.kernel.workers.count`),
    the rows of a piece (blocks of positions of at most ``piece_rows + g - 1`` rows); ``None``: every
    row in each piece. The workers' buffers are carved out of ``buffers`` (a piece and its
    reference rows each); as many workers as fit take part.
    """
    m, d_vocab = x.shape[0], W.shape[1]
    width = tile_width(d_vocab, transform, width)
    n_tiles = -(-d_vocab // width)
    fused = native.fused(x) if fused is None else fused
    single = width >= d_vocab
    n = m // g
    # One stream (every tile in turn, each product and pass on all threads) unless workers take
    # pieces in turn: blocks of positions x tiles, each worker with its own buffers ("lane").
    wanted = workers.count(x.device) if fused and n_tiles > 1 else 1
    blocks, lanes = [(0, n)], [[buffers[0], buffers[1]]]
    if wanted > 1:
        blocks = _position_blocks(n, g, piece_rows)
        lanes = _lanes(buffers, _lane_sizes(blocks, g, width, with_reference), wanted)
    reader = _FusedTiles if fused else _EagerTiles
    # Per block of positions: (its first position, x rows, statistics, members, and with workers each
    # worker's top-k and counts and each piece's own sums: the sums merged in the tiles' order are the
    # same numbers whichever worker read which piece, so a call is reproducible to the bit).
    parts = []
    for i0, i1 in blocks:
        xq = x if len(blocks) == 1 else x.view(g, n, -1)[:, i0:i1].reshape(g * (i1 - i0), -1)
        nt = None if next_tokens is None else next_tokens[i0:i1]
        tid = None if target_ids is None else target_ids[i0:i1]
        stats = reader(xq, g, W, b, transform, buffers, top_k, with_reference, nt, tid, single)
        members = None if member_ids is None else _Members(member_ids, xq, g, d_vocab, width)
        parts.append((i0, xq, stats, members, [None] * len(lanes), [None] * n_tiles))
    read_tile = _TileReader(W, b, transform, width, lanes, w_tile, x.dtype, keep_logits)

    def piece(lane: int, item: int) -> None:  # tile-major: the lanes share a tile of W_U while it is warm
        number, q = divmod(item, len(blocks))
        i0, xq, stats, members, per_lane, per_piece = parts[q]
        if wanted > 1:
            if per_lane[lane] is None:
                per_lane[lane] = stats.lane(lanes[lane][1])
            per_piece[number] = stats = per_lane[lane].piece()
        read_tile(lane, number * width, xq, g, i0, stats, members)

    workers.run_in_turn(n_tiles * len(blocks), len(lanes), piece)
    results = []
    for _, _, stats, members, per_lane, per_piece in parts:
        if wanted > 1:
            stats.merge(per_piece, [s for s in per_lane if s is not None])
        results.append(stats.finish(None if members is None else members.logits))
    return results[0] if len(results) == 1 else _concat_positions(results)


class _TileReader:
    """One tile's logits: the product of a block of rows and a tile of columns into a lane's buffer,
    the bias, the transform, then handed to the kept logits, the group members and the statistics."""

    def __init__(self, W, b, transform, width, lanes, w_tile, dtype, keep_logits) -> None:
        self.W, self.b, self.transform, self.width = W, b, transform, width
        self.lanes, self.keep_logits = lanes, keep_logits
        self.cast = W.dtype != dtype
        # Sized by the width actually read: the measurement (tuning.measure) asks for wider tiles than the default.
        self.per_lane = W.shape[0] * min(W.shape[1], width)
        if self.cast and (w_tile is None or w_tile.numel() < self.per_lane * len(lanes)):
            w_tile = torch.empty(self.per_lane * len(lanes), dtype=dtype, device=W.device)
        self.w_tile = w_tile

    def __call__(
        self, lane: int, a: int, x: torch.Tensor, g: int, i0: int, stats: Any, members: Optional[_Members]
    ) -> None:
        W, m = self.W, x.shape[0]
        z = min(W.shape[1], a + self.width)
        w = z - a
        tile = self.lanes[lane][0][: m * w].view(m, w)
        columns = W[:, a:z]
        if self.cast:  # this tile of the unembedding in the compute dtype, in the lane's reused buffer
            at = lane * self.per_lane
            columns = self.w_tile[at : at + W.shape[0] * w].view(W.shape[0], w).copy_(columns)
        torch.mm(x, columns, out=tile)
        if self.b is not None:
            tile.add_(self.b[a:z])
        if self.transform is not None:
            tile.copy_(self.transform(tile))
        if self.keep_logits is not None:
            self.keep_logits(a, z, tile.view(g, m // g, w), i0)
        if members is not None:
            members.pick(tile.view(g, m // g, w), a, self.width)
        stats.fold(tile, a, z)


def _position_blocks(n: int, g: int, piece_rows: Optional[int]) -> List[Tuple[int, int]]:
    """Blocks of positions ``(i0, i1)`` of at most ``piece_rows + g - 1`` rows each (``g`` rows per
    position), as even as they can be; one block when ``piece_rows`` is ``None``."""
    count = 1 if piece_rows is None else max(1, min(n, -(-g * n // max(piece_rows, 1))))
    edges = [round(i * n / count) for i in range(count + 1)]
    return [(edges[i], edges[i + 1]) for i in range(count)]


def _lane_sizes(blocks: List[Tuple[int, int]], g: int, width: int, with_reference: bool) -> List[int]:
    """Elements of a lane's buffers: a tile of the largest block's rows, and its reference rows' exponentials."""
    positions = max(i1 - i0 for i0, i1 in blocks)
    return [g * positions * width] + ([positions * width] if with_reference else [])


def _concat_positions(parts: List[ProductStats]) -> ProductStats:
    """Blocks of positions' statistics, each ``[g, positions, ...]``, joined along the positions."""
    fields = {}
    for name in ProductStats.__dataclass_fields__:
        values = [getattr(p, name) for p in parts]
        fields[name] = None if values[0] is None else torch.cat(values, 1)
    return ProductStats(**fields)


def _lanes(buffers: List[torch.Tensor], sizes: List[int], wanted: int) -> List[List[torch.Tensor]]:
    """Up to ``wanted`` lanes, each a list of flat views of ``sizes`` elements, carved out of ``buffers``
    without overlap (first fit); as many as fit, at least one."""
    offsets = [0] * len(buffers)
    lanes: List[List[torch.Tensor]] = []
    for _ in range(wanted):
        lane = []
        for size in sizes:
            slot = next((i for i, buf in enumerate(buffers) if buf.numel() - offsets[i] >= size), None)
            if slot is None:
                if not lanes:
                    raise ValueError(f"buffers of {buffers[0].numel()} elements cannot hold a piece of {size}")
                return lanes
            lane.append(buffers[slot][offsets[slot] : offsets[slot] + size])
            offsets[slot] += size
        lanes.append(lane + [None] * (2 - len(lane)))
    return lanes


class _EagerTiles:
    """:func:`read_product`'s statistics as tensor operations: top-k from the blocks that can still
    enter it, the picked tokens, the targets' counts and the online sums, each its own pass over the tile."""

    def __init__(self, x, g, W, b, transform, buffers, top_k, with_reference, next_tokens, target_ids, single):
        m = x.shape[0]
        self.g, self.n, self.top_k, self.buffers, self.next_tokens = g, m // g, top_k, buffers, next_tokens
        self.sums = _OnlineSums(x, g, with_reference)
        self.top_values = x.new_full((m, top_k), float("-inf"))
        self.top_ids = torch.zeros(m, top_k, dtype=torch.long, device=x.device)
        self.next_logit = x.new_zeros(g, self.n) if next_tokens is not None else None
        self.targets = None if target_ids is None else _Targets(x, g, W, b, transform, target_ids, single)

    def fold(self, tile: torch.Tensor, a: int, z: int) -> None:
        """Fold one tile of raw logits ``[m, w]`` (columns ``a:z``) in; the tile is overwritten."""
        m, w = tile.shape
        tile3 = tile.view(self.g, self.n, w)
        row_max = _update_top_k(tile, self.top_k, self.top_values, self.top_ids, a, first=a == 0)
        if self.next_tokens is not None:
            _pick(self.next_logit, tile3, self.next_tokens, a, z)
        if self.targets is not None:
            self.targets.count(tile3, a, z, self.buffers[2][: m * w].view(self.g, self.n, w))
        scratch = [self.buffers[1][: m * w].view(m, w), self.buffers[2][: m * w].view(m, w)]
        self.sums.fold(tile, row_max, *scratch, first=a == 0)

    def finish(self, member_logits: Optional[torch.Tensor]) -> ProductStats:
        log_z, entropy, kl = self.sums.finish()
        shape = (self.g, self.n, self.top_k)
        return ProductStats(
            log_z=log_z,
            entropy=entropy,
            top_logits=self.top_values.view(shape),
            top_ids=self.top_ids.view(shape),
            kl_to_reference=kl,
            next_logit=self.next_logit,
            target_logits=None if self.targets is None else self.targets.logits,
            target_ranks=None if self.targets is None else self.targets.ranks(),
            member_logits=member_logits,
        )


class _FusedTiles:
    """:func:`read_product`'s statistics from the fused C kernel (:func:`tl_logitlens.kernel.native.fold_tile`):
    every row of a tile read twice while in cache; the same sums, top-k, picks and counts as :class:`_EagerTiles`."""

    def __init__(self, x, g, W, b, transform, buffers, top_k, with_reference, next_tokens, target_ids, single):
        m = x.shape[0]
        n = m // g
        self.g, self.n, self.top_k = g, n, top_k
        self.ref_exps = buffers[1] if with_reference else None  # the reference rows' exponentials, per tile
        self._fresh(x, m, with_reference)
        self.next_pick = None
        if next_tokens is not None:
            self.next_pick = [next_tokens.to(torch.long).contiguous(), x.new_zeros(m)]
        self.targets, self.single = None, single
        if target_ids is not None:
            t = target_ids.shape[1]
            # The thresholds: targets' logits computed alone (as _Targets does), or in one tile its own.
            guess = (
                None if single else _Targets(x, g, W, b, transform, target_ids, False).guess.reshape(m, t).contiguous()
            )
            self.targets = [guess, x.new_zeros(m, t), target_ids.to(torch.long).contiguous(), x.new_zeros(m, t)]

    def _fresh(self, x: torch.Tensor, m: int, with_reference: bool) -> None:
        """Running statistics that start empty: sums, top-k, the reference's scratch."""
        self._fresh_sums(x, m, with_reference)
        self.ref_prev = x.new_empty(self.n, 2) if with_reference else None
        self.top = [x.new_full((m, self.top_k), float("-inf")), torch.zeros(m, self.top_k, dtype=torch.long)]

    def _fresh_sums(self, x: torch.Tensor, m: int, with_reference: bool) -> None:
        self.tiles = 0
        self.sums = [x.new_full((m,), float("-inf")), x.new_zeros(m), x.new_zeros(m)]
        self.sums.append(x.new_zeros(m) if with_reference else None)

    def _copy(self) -> _FusedTiles:
        """These statistics' rows, inputs and shared picks, in a new object (every array shared)."""
        other = object.__new__(_FusedTiles)
        other.__dict__.update(self.__dict__)
        return other

    def lane(self, ref_exps: Optional[torch.Tensor]) -> _FusedTiles:
        """Statistics for another worker over the same rows: its own top-k and counts (``ref_exps``
        its scratch), the picked logits shared (each column is in one tile only); the sums are
        each piece's own (:meth:`piece`)."""
        other = self._copy()
        peak = self.sums[0]
        other._fresh(peak, peak.shape[0], self.sums[3] is not None)
        other.ref_exps = ref_exps
        if self.targets is not None:
            thresholds, above, target_ids, target_logits = self.targets
            other.targets = [thresholds, torch.zeros_like(above), target_ids, target_logits]
        return other

    def piece(self) -> _FusedTiles:
        """Statistics for one piece read by this worker: its own sums, this worker's top-k and counts."""
        other = self._copy()
        peak = self.sums[0]
        other._fresh_sums(peak, peak.shape[0], self.sums[3] is not None)
        return other

    def fold(self, tile: torch.Tensor, a: int, z: int) -> None:
        """Fold one contiguous tile of raw logits ``[m, w]`` (columns ``a:z``) in."""
        targets = self.targets
        if targets is not None and self.single:  # one tile: the targets' own logits are the thresholds
            ids = targets[2].repeat(self.g, 1)
            targets[0] = tile.gather(1, ids).contiguous()
        native.fold_tile(tile, self.n, a, self.sums, self.ref_exps, self.ref_prev, self.top, targets, self.next_pick)
        self.tiles += 1

    def merge(self, pieces: List[_FusedTiles], lanes: List[_FusedTiles]) -> None:
        """Make these statistics those of every tile read: the sums of ``pieces`` (in the same order,
        the same numbers to the bit), the top-k and counts of the workers' ``lanes``.

        Exact: each piece's sums are moved to the common maximum ``P`` of each row, as a tile that
        raises the maximum moves them (module docstring), in float64: with ``c = exp(p - P)``,
        ``Z = sum c Z_j``, ``A = sum c (A_j + (p_j - P) Z_j)`` and, against the reference row's
        ``c_ref`` and ``Z_ref``, ``D = sum c_ref (D_j + (p_j - P) Z_ref_j)``; counts add up; the
        top-k is the best ``k`` of all lanes' (among equal logits the lower token id first).
        """
        used = [piece for piece in pieces if piece is not None and piece.tiles]
        g, n, k = self.g, self.n, self.top_k
        peaks = torch.stack([lane.sums[0] for lane in used]).double()  # [lanes, m]
        peak = peaks.amax(0)
        shift = peaks - peak
        scale = shift.exp()
        totals = torch.stack([lane.sums[1] for lane in used]).double()
        spreads = torch.stack([lane.sums[2] for lane in used]).double()
        merged = [peak, (scale * totals).sum(0), (scale * (spreads + shift * totals)).sum(0), None]
        if self.sums[3] is not None:
            crosses = torch.stack([lane.sums[3] for lane in used]).double()

            def ref(t: torch.Tensor) -> torch.Tensor:  # each row's reference row: row r % n
                return t[:, :n].repeat(1, g)

            merged[3] = (ref(scale) * (crosses + shift * ref(totals))).sum(0)
        for i, value in enumerate(merged):
            if value is not None:
                self.sums[i].copy_(value)
        values = torch.cat([lane.top[0] for lane in lanes], 1)
        ids = torch.cat([lane.top[1] for lane in lanes], 1)
        by_id = ids.argsort(1)  # then a stable sort by value: ties keep the lower id first
        values, ids = values.gather(1, by_id), ids.gather(1, by_id)
        order = values.sort(dim=1, descending=True, stable=True).indices[:, :k]
        self.top[0].copy_(values.gather(1, order))
        self.top[1].copy_(ids.gather(1, order))
        if self.targets is not None:
            self.targets[1].copy_(torch.stack([lane.targets[1] for lane in lanes]).sum(0))  # whole numbers
        self.tiles = sum(lane.tiles for lane in used)

    def finish(self, member_logits: Optional[torch.Tensor]) -> ProductStats:
        g, n, k = self.g, self.n, self.top_k
        peak, total, spread, cross = self.sums
        log_z, entropy, kl = _finish_sums(peak, total, spread, cross, g, n)
        t = self.targets
        return ProductStats(
            log_z=log_z,
            entropy=entropy,
            top_logits=self.top[0].view(g, n, k),
            top_ids=self.top[1].view(g, n, k),
            kl_to_reference=kl,
            next_logit=None if self.next_pick is None else self.next_pick[1].view(g, n),
            target_logits=None if t is None else t[3].view(g, n, -1),
            # columns above the threshold, less the target itself where it was computed a hair lower
            target_ranks=None if t is None else (t[1] - (t[3] > t[0]).to(t[1].dtype)).view(g, n, -1),
            member_logits=member_logits,
        )


def _finish_sums(
    peak: torch.Tensor, total: torch.Tensor, spread: torch.Tensor, cross: Optional[torch.Tensor], g: int, n: int
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(log Z, entropy, KL to entry 0 or None)``, each ``[g, n]``, from the online sums ``[g * n]``
    (module docstring): ``entropy = log Z - A / Z``, ``KL = A_ref / Z_ref - log Z_ref - D / Z_ref + log Z``."""
    shape = (g, n)
    log_total = total.log()
    entropy = log_total - spread / total
    kl = None
    if cross is not None:
        ref_total, ref_log_total = total[:n], log_total[:n]
        neg_h_ref = spread[:n] / ref_total - ref_log_total
        kl = (neg_h_ref - cross.view(shape) / ref_total + log_total.view(shape)).clamp_min(0.0)
    return (peak + log_total).view(shape), entropy.view(shape), kl


class _OnlineSums:
    """The online log-sum-exp of :func:`read_product` over ``x [g * n, ...]``'s rows, tile by tile.

    Per row the running maximum ``peak``, ``Z = sum exp(s)`` and ``A = sum exp(s) * s`` with
    ``s = l - peak``; with a reference (entry 0), ``D [g, n] = sum exp(s_ref) * s``. When a tile
    raises the maximum the sums so far are rescaled (module docstring).
    """

    def __init__(self, x: torch.Tensor, g: int, with_reference: bool) -> None:
        m = x.shape[0]
        self.g, self.n = g, m // g
        self.peak = x.new_full((m,), float("-inf"))
        self.total = x.new_zeros(m)  # Z
        self.spread = x.new_zeros(m)  # A
        self.cross = x.new_zeros(g, self.n) if with_reference else None  # D

    def fold(
        self, tile: torch.Tensor, row_max: torch.Tensor, exps: torch.Tensor, scratch: torch.Tensor, first: bool
    ) -> None:
        """Fold one tile of raw logits ``[m, w]`` in (shifted in place); ``exps``, ``scratch``: ``[m, w]`` buffers."""
        g, n = self.g, self.n
        # Move to the new maximum, rescaling what was summed so far.
        new_peak = torch.maximum(self.peak, row_max)
        if not first:
            step = self.peak - new_peak  # <= 0
            decay = torch.exp(step)
            self.spread.add_(step * self.total).mul_(decay)
            if self.cross is not None:
                self.cross.add_(step.view(g, n) * self.total[:n]).mul_(decay[:n])
            self.total.mul_(decay)
        self.peak = new_peak
        torch.add(new_peak.unsqueeze(1) * -_LOG2E, tile, alpha=_LOG2E, out=tile)  # (l - peak) * log2(e)
        torch.exp2(tile, out=exps)  # exp(l - peak)
        self.total.add_(exps.sum(-1))
        self.spread.add_(torch.mul(exps, tile, out=scratch).sum(-1), alpha=_LN2)
        if self.cross is not None:
            products = scratch.view(g, n, -1)
            torch.mul(exps[:n].unsqueeze(0), tile.view(g, n, -1), out=products)
            self.cross.add_(products.sum(-1), alpha=_LN2)

    def finish(self) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """``(log Z, entropy, KL to entry 0 or None)``, each ``[g, n]``."""
        cross = None if self.cross is None else self.cross.reshape(-1)
        return _finish_sums(self.peak, self.total, self.spread, cross, self.g, self.n)


class _Members:
    """Token-group members' logits ``[g, n, members]``, each picked from the tile that holds it."""

    def __init__(self, member_ids: torch.Tensor, x: torch.Tensor, g: int, d_vocab: int, width: int) -> None:
        self.ids = member_ids
        self.logits = x.new_zeros(g, x.shape[0] // g, member_ids.shape[0])
        # Where each tile's members start in the sorted ids: one host copy, no per-tile sync.
        edges = torch.arange(0, d_vocab + width, width).clamp_max(d_vocab)
        self.bounds = torch.searchsorted(member_ids.cpu(), edges).tolist()

    def pick(self, tile3: torch.Tensor, a: int, width: int) -> None:
        lo, hi = self.bounds[a // width], self.bounds[a // width + 1]
        if hi > lo:
            self.logits[:, :, lo:hi] = tile3[:, :, self.ids[lo:hi] - a]


class _Targets:
    """Targets' logits ``[g, n, t]`` and ranks: how many columns beat each target, tile by tile."""

    def __init__(
        self,
        x: torch.Tensor,
        g: int,
        W: torch.Tensor,
        b: Optional[torch.Tensor],
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]],
        target_ids: torch.Tensor,
        single: bool,
    ) -> None:
        n = x.shape[0] // g
        self.ids, self.single = target_ids, single
        self.logits = x.new_zeros(g, n, target_ids.shape[1])
        self.above = x.new_zeros(g, n, target_ids.shape[1])  # columns above the target: its rank
        self.guess = None
        if not single:
            # The targets' logits are needed before their tiles come: computed here alone,
            # they can differ from the tile's in the last bit, so the target's own column
            # is taken back out of the count at the end (only exact near-ties are uncertain).
            self.guess = torch.einsum("gnd,dnt->gnt", x.view(g, n, -1), W[:, target_ids].to(x.dtype))
            if b is not None:
                self.guess += b[target_ids]
            if transform is not None:
                self.guess = transform(self.guess)

    def count(self, tile3: torch.Tensor, a: int, z: int, marks: torch.Tensor) -> None:
        """Pick the targets this tile holds and count its columns above each; ``marks`` is a ``[g, n, w]`` buffer."""
        g = tile3.shape[0]
        if self.single:
            self.logits.copy_(tile3.gather(2, self.ids.expand(g, -1, -1)))
            self.guess = self.logits
        for j in range(self.ids.shape[1]):
            if not self.single:
                _pick(self.logits[..., j], tile3, self.ids[:, j], a, z)
            self.above[..., j] += torch.gt(tile3, self.guess[..., j : j + 1], out=marks).sum(-1)

    def ranks(self) -> torch.Tensor:
        return self.above - (self.logits > self.guess).to(self.above.dtype)  # 0 in one tile: guess is logits


def whole_sums(
    logits: torch.Tensor, peak: torch.Tensor, with_reference: bool, thresholds: Optional[torch.Tensor] = None
) -> Tuple[Optional[torch.Tensor], ...]:
    """The reductions of :func:`read_whole` over raw ``logits [g, n, V]``, shifted by ``peak [g, n]``.

    ``s = l - peak``: returns ``(Z, A, D, above)`` with ``Z = sum exp(s)``,
    ``A = sum exp(s) * s``, ``D = sum exp(s_ref) * s`` (entry 0 is the reference; ``None``
    unless ``with_reference``), each ``[g, n]``, and ``above [g, n, t]``: how many logits
    exceed each of ``thresholds [g, n, t]`` (``None`` without). Plain tensor algebra, so that
    ``torch.compile`` fuses it into one pass over the logits (:func:`_fused_sums`); eager,
    it is the reference the fused code is tested against.
    """
    s = logits - peak.unsqueeze(-1)
    e = torch.exp(s)
    total, spread = e.sum(-1), (e * s).sum(-1)
    cross = (e[:1] * s).sum(-1) if with_reference else None
    above = None
    if thresholds is not None:
        above = torch.stack([(logits > thresholds[..., j : j + 1]).sum(-1) for j in range(thresholds.shape[-1])], -1)
    return total, spread, cross, above


def _eager_sums(
    logits: torch.Tensor,
    peak: torch.Tensor,
    with_reference: bool,
    thresholds: Optional[torch.Tensor],
    buffers: List[torch.Tensor],
) -> Tuple[Optional[torch.Tensor], ...]:
    """:func:`whole_sums` in the kernel's buffers (``logits`` is shifted in place): no ``[g, n, V]`` allocation."""
    g, n, V = logits.shape
    scratch = buffers[2][: g * n * V].view(g, n, V)
    above = None
    if thresholds is not None:  # on the raw logits, before the shift
        above = torch.stack(
            [torch.gt(logits, thresholds[..., j : j + 1], out=scratch).sum(-1) for j in range(thresholds.shape[-1])], -1
        )
    shifted = logits.sub_(peak.unsqueeze(-1))
    exps = torch.exp(shifted, out=buffers[1][: g * n * V].view(g, n, V))
    total, spread = exps.sum(-1), torch.mul(exps, shifted, out=scratch).sum(-1)
    cross = torch.mul(shifted, exps[:1], out=scratch).sum(-1) if with_reference else None
    return total, spread, cross, above


_compiled_sums: Any = None


def _fused_sums(
    logits: torch.Tensor,
    peak: torch.Tensor,
    with_reference: bool,
    thresholds: Optional[torch.Tensor],
    buffers: List[torch.Tensor],
) -> Tuple[Optional[torch.Tensor], ...]:
    """:func:`whole_sums` fused by ``torch.compile`` on CUDA where it works (one pass over the
    logits, no ``[g, n, V]`` intermediates), else eager in the buffers.
    ``TL_LOGITLENS_COMPILE=0`` keeps it eager (:func:`tl_logitlens.kernel.native.compile_allowed`)."""
    global _compiled_sums
    if logits.device.type != "cuda" or not native.compile_allowed():
        return _eager_sums(logits, peak, with_reference, thresholds, buffers)
    if _compiled_sums is None:
        try:
            _compiled_sums = torch.compile(whole_sums, dynamic=True)
        except Exception:  # noqa: BLE001 - no compiler here: the eager path is exact too
            _compiled_sums = False
    if _compiled_sums is not False:
        try:
            return _compiled_sums(logits, peak, with_reference, thresholds)
        except Exception:  # noqa: BLE001 - a failed compile falls back, once and for all
            _compiled_sums = False
    return _eager_sums(logits, peak, with_reference, thresholds, buffers)


def block_top_k(logits: torch.Tensor, k: int, block: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``logits.topk(k, dim=-1)`` for ``logits [m, V]`` from one pass over the logits.

    The top ``k`` values of a row lie in at most ``k`` blocks of ``block`` columns, and
    those blocks are among the ``k`` whose maxima are largest (each holds a value at least the
    row's k-th largest). So: block maxima (one read of the logits), the ``k`` best blocks, and
    an exact top-k over their ``k * block`` columns plus the ragged tail. ``torch.topk`` on a
    GPU reads a wide row once per radix digit. Exact; among exactly equal values either may
    be returned, as with ``torch.topk``.

    Example::

        >>> import torch
        >>> from tl_logitlens.tiles import block_top_k
        >>> x = torch.randn(4, 1000)
        >>> values, ids = block_top_k(x, 5, block=64)
        >>> torch.equal(values, x.topk(5).values), torch.equal(ids, x.topk(5).indices)
        (True, True)
    """
    m, V = logits.shape
    size = block or _TOPK_BLOCK
    n_blocks = V // size
    if n_blocks <= k:  # too few blocks to prune anything
        return logits.topk(min(k, V), dim=-1)
    body = logits[:, : n_blocks * size].view(m, n_blocks, size)
    best = body.amax(-1).topk(k, dim=-1).indices  # [m, k] blocks
    columns = (best.unsqueeze(-1) * size + torch.arange(size, device=logits.device)).view(m, k * size)
    if V > n_blocks * size:  # the ragged tail is always a candidate
        tail = torch.arange(n_blocks * size, V, device=logits.device).expand(m, -1)
        columns = torch.cat([columns, tail], dim=1)
    values, where = logits.gather(1, columns).topk(k, dim=-1)
    return values, columns.gather(1, where)


# Whether torch.mm takes out_dtype= on this device (half inputs, float32 output: CUDA, torch >= 2.8).
_mm_out_dtype: dict = {}


def whole_product(x: torch.Tensor, W: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out [m, d_vocab] = x [m, d_model] @ W`` in ``out``'s dtype, with no full-size copy of ``W``.

    - ``x`` and ``W`` in one half precision, float32 ``out`` (half products): on CUDA one
      tensor-core product with float32 accumulation written straight as float32
      (``torch.mm(..., out_dtype=)``); elsewhere, or where that is missing, the same numbers
      from float32 products (a product of two half-precision numbers is exact in float32),
      ``W`` cast :data:`WHOLE_CAST_COLUMNS` columns at a time.
    - ``x`` in ``out``'s dtype: one product, ``W`` cast the same way where its dtype differs.

    Example::

        >>> import torch
        >>> from tl_logitlens.tiles import whole_product
        >>> x, W = torch.randn(3, 16).bfloat16(), torch.randn(16, 5).bfloat16()
        >>> out = whole_product(x, W, torch.empty(3, 5))
        >>> torch.allclose(out.double(), x.double() @ W.double(), atol=1e-5)
        True
    """
    if x.dtype == W.dtype == out.dtype:
        return torch.mm(x, W, out=out)
    if x.dtype == W.dtype and x.device.type == "cuda" and _mm_out_dtype.get(x.device, True):
        try:
            return torch.mm(x, W, out_dtype=out.dtype, out=out)
        except (RuntimeError, TypeError) as err:  # an older torch: float32 products, slower
            _mm_out_dtype[x.device] = False
            import warnings

            warnings.warn(
                f"tl_logitlens: torch.mm(out_dtype=) is unavailable here ({err}); half-precision "
                "products run in float32 (exact, slower)",
                stacklevel=2,
            )
    xs = x.to(out.dtype)
    for a in range(0, W.shape[1], WHOLE_CAST_COLUMNS):
        z = min(W.shape[1], a + WHOLE_CAST_COLUMNS)
        torch.mm(xs, W[:, a:z].to(out.dtype), out=out[:, a:z])
    return out


#: Columns of a half-precision unembedding cast to float32 at once by :func:`read_whole`:
#: a few large products keep a GPU busy, and the cast block stays small
#: (``d_model * 8192`` floats: 128 MiB at ``d_model`` 4096).
WHOLE_CAST_COLUMNS = 8192


def read_whole(
    x: torch.Tensor,
    g: int,
    W: torch.Tensor,
    b: Optional[torch.Tensor],
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]],
    buffers: List[torch.Tensor],
    *,
    top_k: int,
    with_reference: bool,
    next_tokens: Optional[torch.Tensor] = None,
    target_ids: Optional[torch.Tensor] = None,
    keep_logits: Optional[Callable[[int, int, torch.Tensor], None]] = None,
    member_ids: Optional[torch.Tensor] = None,
) -> ProductStats:
    """:func:`read_product` in one product over the whole vocabulary, statistics as vectorised reductions.

    The strategy for GPUs (:mod:`tl_logitlens.kernel.tuning` picks it on CUDA): one large product
    keeps cuBLAS at full speed, and every statistic is a reduction over ``[g * n, d_vocab]``
    with no per-tile Python loop and no host synchronisation (no ``nonzero``): top-k from
    block maxima (:func:`block_top_k`), the rest in one fused set of reductions
    (:func:`whole_sums`), so the logits are written once and read about twice. Same
    arguments and results as :func:`read_product`; ``buffers`` hold ``g * n * d_vocab``
    elements each, in the statistics' dtype (float32 or float64). The product
    (:func:`whole_product`): ``x`` in ``W``'s half precision is read by the tensor cores
    into float32 logits (:func:`tl_logitlens.kernel.tuning.half_products`); a ``W`` in another
    dtype than a float32 ``x`` is cast :data:`WHOLE_CAST_COLUMNS` columns at a time, so no
    float32 copy of the whole unembedding is made.

    Example::

        >>> import torch
        >>> from tl_logitlens.tiles import read_product, read_whole
        >>> x, W = torch.randn(6, 8), torch.randn(8, 50)
        >>> bufs = [torch.empty(6 * 50) for _ in range(3)]
        >>> a = read_whole(x, 2, W, None, None, bufs, top_k=3, with_reference=True)
        >>> b = read_product(x, 2, W, None, None, bufs, top_k=3, with_reference=True, width=16)
        >>> torch.allclose(a.entropy, b.entropy, atol=1e-5), torch.equal(a.top_ids, b.top_ids)
        (True, True)
    """
    m, d_vocab = x.shape[0], W.shape[1]
    n = m // g
    logits = whole_product(x, W, buffers[0][: m * d_vocab].view(m, d_vocab))
    dtype = logits.dtype  # the statistics': x may be in W's half precision
    if b is not None:
        logits.add_(b.to(dtype))
    if transform is not None:
        logits.copy_(transform(logits))
    logits3 = logits.view(g, n, d_vocab)
    if keep_logits is not None:
        keep_logits(0, d_vocab, logits3, 0)

    # Raw logits first: top-k and the picked tokens' logits.
    top_values, top_ids = block_top_k(logits, top_k)
    next_logit = None
    if next_tokens is not None:
        picked = logits3.gather(2, next_tokens.clamp_min(0).view(1, n, 1).expand(g, n, 1)).squeeze(2)
        next_logit = torch.where(next_tokens.view(1, n) >= 0, picked, torch.zeros_like(picked))
    m_logits = None if member_ids is None else logits3[:, :, member_ids]  # a copy, before the shift below
    t_logits = None if target_ids is None else logits3.gather(2, target_ids.unsqueeze(0).expand(g, -1, -1))

    # Every other statistic in one set of reductions: sums shifted by the row maximum (top-1)
    # and the targets' ranks (how many logits beat each).
    peak = top_values[:, 0]
    total, spread, cross, above = _fused_sums(logits3, peak.view(g, n), with_reference, t_logits, buffers)
    total, spread = total.reshape(m), spread.reshape(m)
    ranks = None if above is None else above.to(dtype)
    log_total = total.log()
    entropy = log_total - spread / total
    kl = None
    if with_reference:
        # sum p_ref * s_x = D / Z_ref, D = sum exp(s_ref) * s_x, for every entry at once
        neg_h_ref = spread[:n] / total[:n] - log_total[:n]
        kl = (neg_h_ref - cross / total[:n] + log_total.view(g, n)).clamp_min(0.0)
    return ProductStats(
        log_z=(peak + log_total).view(g, n),
        entropy=entropy.view(g, n),
        top_logits=top_values.view(g, n, top_k),
        top_ids=top_ids.view(g, n, top_k),
        kl_to_reference=kl,
        next_logit=next_logit,
        target_logits=t_logits,
        target_ranks=ranks,
        member_logits=m_logits,
    )
