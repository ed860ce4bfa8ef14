"""The one kernel under everything: read ``d_model`` vectors into vocabulary statistics.

``logits = norm(x) @ W_U + b_U`` for every vector, in float32, with only statistics kept:
top-k, entropy, KL to a reference distribution, loss on a true next token, chosen tokens'
logits, probabilities and ranks. Rows are taken a chunk at a time, every stack entry of
those rows in one matrix product (:func:`read_rows`), and each product is read a tile of
vocabulary columns at a time (:mod:`tl_logitlens.kernel.tiles`), so ``[rows, d_vocab]`` logits
never exist unless the caller asks for them with ``return_logits=True``. The tile shape
(rows per product, columns per tile) is measured for the processor at hand at first use
(:mod:`tl_logitlens.kernel.tuning`); on CUDA one product spans the vocabulary
(:func:`tl_logitlens.kernel.tiles.read_whole`). Memory is bounded by a budget
(:data:`DEFAULT_CHUNK_BUDGET_BYTES` on the CPU), not by how many vectors are read.

Precision and devices: statistics are float32 (float64 for a float64 model) whatever the
model's dtype. On the CPU a bfloat16 or float16 unembedding is cast a tile of columns at a
time into a reused buffer, never copied whole, and read in float32; on CUDA it is read in its
own dtype by the tensor cores, the normalised vectors rounded to it, with float32
accumulation and logits (:func:`tl_logitlens.kernel.tuning.half_products`, which also says how to
switch it off). The vectors move, a chunk at a time, to ``W_U``'s own device; results come
back on the CPU.

The statistics are exact, computed from the logits shifted by their row maximum
``s = l - max(l)`` with ``Z = sum(exp(s))``:

- ``log p = s - log Z``; ``entropy = log Z - sum(exp(s) * s) / Z``
- ``KL(ref || x) = sum p_ref (log p_ref - log p_x) = -H_ref - sum(p_ref * s_x) + log Z_x``
- a token group ``G``: ``logit_G = logsumexp(l[G])`` from its members' logits, picked tile by
  tile, and ``p_G = sum p[G] = exp(logit_G - log Z)`` (:func:`group_statistics`)

The cost is the unembedding product: on GPT-2 shapes the whole logit lens, with every
statistic, took about as long as the plain product ``vectors @ W_U`` on a 2-core AMD EPYC
(0.97 to 1.00 x in ``make bench``, which prints the processor and shape of each run).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..errors import LensInputError
from . import tuning, workers
from .norm import FinalNorm
from .precision import compute_dtype
from .tiles import BUFFERS, needs_whole_rows, read_product, read_whole, tile_width

#: The most memory the kernel's working buffers take on the CPU when ``chunk_size=None``
#: (three tiles of ``[rows, width]`` logits, :mod:`tl_logitlens.kernel.tiles`; the fused path
#: touches the first and a slice of the second). The shape within it is measured for the
#: processor at hand (:mod:`tl_logitlens.kernel.tuning`); set a budget with
#: ``tuning.set_chunk_budget(bytes)``, or rows per product with ``chunk_size=``. Memory does
#: not grow with the number of vectors read. Buffers within the budget are kept for the next
#: call (:class:`_Workspace`).
DEFAULT_CHUNK_BUDGET_BYTES = tuning.CPU_BUDGET_BYTES


def check_chunk_size(chunk_size: Optional[int]) -> None:
    """Refuse a ``chunk_size`` (rows per product, or ``None``) that is not a positive int; the
    entry points call this before any forward pass (:mod:`tl_logitlens.kernel.tuning` sizes products)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise LensInputError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


@dataclass
class Readout:
    """Statistics of vectors read through the final norm and the unembedding.

    ``lead`` below is the vectors' leading shape (everything but ``d_model``).

    Attributes:
        top_ids, top_logits, top_probs: ``[*lead, k]`` the k most likely tokens.
        entropy: ``[*lead]`` entropy of the full-vocabulary distribution, nats.
        kl_to_reference: ``[*lead]`` KL(reference || vectors), nats, when a reference was given.
        next_token_loss: ``[*lead]`` cross-entropy of the given next token, NaN where none.
        target_ids: ``[*lead, t]`` the targets read (shared targets are broadcast).
        target_logits, target_probs: ``[*lead, t]``.
        target_ranks: ``[*lead, t]`` 0-based rank over the full vocabulary (ties do not count).
        group_logits: ``[*lead, group]`` with token groups: each group's log-sum-exp logit.
        group_probs: ``[*lead, group]`` each group's summed probability.
        logits: ``[*lead, d_vocab]`` only with ``return_logits=True``.

    Example::

        >>> import torch
        >>> import tl_logitlens as tll
        >>> model = tll.demo_model()
        >>> r = tll.readout(model, torch.randn(4, model.cfg.d_model), top_k=2, targets=[5])
        >>> tuple(r.top_ids.shape), tuple(r.entropy.shape), tuple(r.target_ranks.shape)
        ((4, 2), (4,), (4, 1))
    """

    top_ids: torch.Tensor
    top_logits: torch.Tensor
    top_probs: torch.Tensor
    entropy: torch.Tensor
    kl_to_reference: Optional[torch.Tensor] = None
    next_token_loss: Optional[torch.Tensor] = None
    target_ids: Optional[torch.Tensor] = None
    target_logits: Optional[torch.Tensor] = None
    target_probs: Optional[torch.Tensor] = None
    target_ranks: Optional[torch.Tensor] = None
    group_logits: Optional[torch.Tensor] = None
    group_probs: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = field(default=None, repr=False)


class GroupMembers:
    """Token groups as the kernel reads them: every (token, group) pair, sorted by token.

    ``ids [members]`` ascending (a token in several groups appears once per group) is what
    the tiles pick logits for; ``slots[j]`` indexes group ``j``'s members within ``ids``.

    Example::

        >>> m = GroupMembers([[7, 2], [2, 9]])
        >>> m.ids.tolist(), [s.tolist() for s in m.slots]
        ([2, 2, 7, 9], [[0, 2], [1, 3]])
    """

    def __init__(self, groups: List[List[int]]) -> None:
        pairs = sorted((token, j) for j, members in enumerate(groups) for token in members)
        self.ids = torch.tensor([token for token, _ in pairs], dtype=torch.long)
        self.slots = [torch.tensor([i for i, (_, j) in enumerate(pairs) if j == g]) for g in range(len(groups))]


def group_statistics(
    member_logits: torch.Tensor, log_z: torch.Tensor, members: GroupMembers
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(group_logits, group_probs)`` ``[..., group]`` from the members' logits ``[..., members]``
    and ``log Z [...]``: ``logit_G = logsumexp(l[G])``, ``p_G = exp(logit_G - log Z)``."""
    logits = torch.stack(
        [torch.logsumexp(member_logits[..., s.to(member_logits.device)], -1) for s in members.slots], -1
    )
    return logits, torch.exp(logits - log_z.unsqueeze(-1))


@dataclass(frozen=True)
class Unembedding:
    """What the kernel reads vectors through: the final norm, then ``x @ W + b``, then ``transform``.

    Attributes:
        W: ``[d_model, d_vocab]`` in the model's own dtype and on its own device; the kernel
            casts it a tile of columns at a time (a float32 copy of a 7B model's unembedding
            is 0.5 GB), never whole.
        b: ``[d_vocab]`` bias, or ``None``.
        final_norm: the :class:`~tl_logitlens.kernel.norm.FinalNorm` applied first.
        transform: what the model does to its logits after the unembedding (a soft cap), or
            ``None``; one with ``elementwise = True`` is applied a tile at a time, any other
            to whole ``[rows, d_vocab]`` rows.

    Example::

        >>> import torch
        >>> from tl_logitlens.kernel import FinalNorm, Unembedding, read_rows
        >>> u = Unembedding(torch.randn(8, 50), None, FinalNorm("RMS", None, None, 1e-6))
        >>> r = read_rows(u, torch.randn(2, 3, 8), norm="recompute", top_k=4)
        >>> tuple(r.top_ids.shape), u.d_vocab
        ((2, 3, 4), 50)
    """

    W: torch.Tensor
    b: Optional[torch.Tensor]
    final_norm: FinalNorm
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    @property
    def d_model(self) -> int:
        return int(self.W.shape[0])

    @property
    def d_vocab(self) -> int:
        return int(self.W.shape[1])


def read_rows(
    unembed: Unembedding,
    vectors: torch.Tensor,
    *,
    norm: str,
    top_k: int,
    target_ids: Optional[torch.Tensor] = None,
    reference: Optional[torch.Tensor] = None,
    reference_entry: Optional[int] = None,
    next_tokens: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    return_logits: bool = False,
    token_groups: Optional[List[List[int]]] = None,
) -> Readout:
    """The kernel, on flat shapes: ``vectors [outer, rows, d_model]`` read through ``unembed``.

    ``norm``: ``"recompute"``, ``"cached"`` or ``"none"`` (:mod:`tl_logitlens.kernel.norm`).
    ``reference [rows, d_model]`` (read the same way as the vectors) gives KL and, with
    ``norm="cached"``, the scale; ``reference_entry``: the index of the entry of
    ``vectors`` that *is* the reference (the logit lens's final stream), which is then
    unembedded once, not twice; ``target_ids [rows, t]``; ``next_tokens [rows]`` with
    ``-1`` for none; ``token_groups``: lists of token ids (validated by the caller), whose
    summed probability and log-sum-exp logit are read. Results are shaped ``[outer, rows, ...]``
    on the CPU.

    How it runs: rows are taken ``c`` at a time for every entry at once (the reference
    first), so one matrix product ``[entries * c, d_model] @ W_U`` has enough rows for full
    BLAS speed; :func:`tl_logitlens.kernel.tiles.read_product` computes it a tile of vocabulary
    columns at a time and keeps only running statistics (the shape from
    :func:`tl_logitlens.kernel.tuning.tile_shape`; on CUDA :func:`~tl_logitlens.kernel.tiles.read_whole`).
    """
    outer, rows, _ = vectors.shape
    if norm == "cached" and reference is None:
        raise LensInputError("norm='cached' takes the scale from reference=, the final residual stream at each row")
    dtype = compute_dtype(unembed.W.dtype)
    plan = _plan(unembed, vectors, reference, reference_entry, chunk_size, dtype)
    results = _allocate(
        outer, rows, top_k, unembed.d_vocab, target_ids, reference, next_tokens, token_groups, return_logits
    )
    reader = _Reader(unembed, plan, norm, top_k, dtype, results, token_groups)
    try:
        # With workers, this thread only prepares products and waits: on one thread it leaves the cores
        # to them (beside a busy neighbour the GPT-2 shape's lens 1.15-1.30 x the product -> 1.03).
        with torch.no_grad(), workers.caller_single_threaded(plan.lanes > 1):
            for start in range(0, rows, plan.step):
                reader.chunk(start, min(rows, start + plan.step), reference, target_ids, next_tokens)
    finally:
        _workspace.give_back(reader.buffers)
    n_targets = 0 if target_ids is None else target_ids.shape[1]
    return Readout(
        **results,
        target_ids=None if target_ids is None else target_ids.expand(outer, rows, n_targets).clone(),
    )


@dataclass
class _Plan:
    """How :func:`read_rows` cuts its work.

    ``sources``: ``(rows [rows, d_model], output entry or None)`` per entry to unembed (the
    reference last when it is not one of the entries); ``groups``: the sources read by each
    product, the reference leading every one (each entry's KL needs its exponentials, tile by
    tile); ``step`` rows per chunk; ``read`` the tile reader and ``width`` its columns per tile;
    ``half``: products in the unembedding's own half precision; ``piece_rows``: with ``lanes``
    workers taking tiles in turn (:mod:`tl_logitlens.kernel.workers`), the rows of each one's piece.
    """

    sources: List[Tuple[torch.Tensor, Optional[int]]]
    ref_source: Optional[int]
    groups: List[List[int]]
    step: int
    read: Callable[..., Any]
    width: int
    half: bool
    lanes: int = 1
    piece_rows: Optional[int] = None


def _plan(
    unembed: Unembedding,
    vectors: torch.Tensor,
    reference: Optional[torch.Tensor],
    reference_entry: Optional[int],
    chunk_size: Optional[int],
    dtype: torch.dtype,
) -> _Plan:
    outer, rows, _ = vectors.shape
    if reference_entry is not None and (reference is None or not 0 <= reference_entry < outer):
        raise ValueError(f"reference_entry {reference_entry} needs reference= and must index one of {outer} entries")
    sources: List[Tuple[torch.Tensor, Optional[int]]] = [(vectors[o], o) for o in range(outer)]
    ref_source = reference_entry
    if reference is not None and reference_entry is None:
        sources.append((reference, None))
        ref_source = len(sources) - 1
    others = [i for i in range(len(sources)) if i != ref_source]
    lead = [] if ref_source is None else [ref_source]

    check_chunk_size(chunk_size)
    shape = tuning.tile_shape(unembed.W, dtype, whole_rows=needs_whole_rows(unembed.transform), chunk_size=chunk_size)
    whole = shape.strategy == "whole"
    width = unembed.d_vocab if whole else tile_width(unembed.d_vocab, unembed.transform, shape.width)
    lanes = 1 if whole or width >= unembed.d_vocab else shape.lanes
    product_rows = shape.rows
    if lanes > 1:
        # Workers read pieces of shape.rows rows; a product spans what the budget allows the vectors'
        # copies (stacked, normalised, cut into pieces): fewer products, fewer waits for the last piece.
        budget = tuning.chunk_budget() or DEFAULT_CHUNK_BUDGET_BYTES
        product_rows = max(shape.rows, budget // (3 * unembed.d_model * torch.empty((), dtype=dtype).element_size()))
    step = max(1, min(rows, product_rows // len(sources)))
    per_group = max(1, product_rows // step - len(lead))
    groups = [lead + others[i : i + per_group] for i in range(0, len(others), per_group)] or [lead]
    read = read_whole if whole else read_product
    pieces = shape.rows if lanes > 1 else None
    return _Plan(sources, ref_source, groups, step, read, width, tuning.half_products(unembed.W), lanes, pieces)


def _allocate(
    outer: int,
    rows: int,
    top_k: int,
    d_vocab: int,
    target_ids: Optional[torch.Tensor],
    reference: Optional[torch.Tensor],
    next_tokens: Optional[torch.Tensor],
    token_groups: Optional[List[List[int]]],
    return_logits: bool,
) -> Dict[str, Optional[torch.Tensor]]:
    """Where each statistic lands, by its :class:`Readout` field: ``[outer, rows, ...]`` on the CPU."""

    def empty(*tail: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.empty(outer, rows, *tail, dtype=dtype)

    n_targets = None if target_ids is None else target_ids.shape[1]
    n_groups = None if token_groups is None else len(token_groups)
    return {
        "top_ids": empty(top_k, dtype=torch.long),
        "top_logits": empty(top_k),
        "top_probs": empty(top_k),
        "entropy": empty(),
        "kl_to_reference": None if reference is None else empty(),
        "next_token_loss": None if next_tokens is None else empty(),
        "target_logits": None if n_targets is None else empty(n_targets),
        "target_probs": None if n_targets is None else empty(n_targets),
        "target_ranks": None if n_targets is None else empty(n_targets, dtype=torch.long),
        "group_logits": None if n_groups is None else empty(n_groups),
        "group_probs": None if n_groups is None else empty(n_groups),
        "logits": empty(d_vocab) if return_logits else None,
    }


class _Reader:
    """The state of one :func:`read_rows` call: the unembedding on its device, the reused buffers,
    and where results land; :meth:`chunk` reads every entry of a range of rows."""

    def __init__(
        self,
        unembed: Unembedding,
        plan: _Plan,
        norm: str,
        top_k: int,
        dtype: torch.dtype,
        results: Dict[str, Optional[torch.Tensor]],
        token_groups: Optional[List[List[int]]],
    ) -> None:
        W = unembed.W
        self.plan, self.norm, self.top_k, self.dtype, self.results = plan, norm, top_k, dtype, results
        self.W, self.device = W, W.device
        b = unembed.b
        # A zero bias (GPT-2 and most folded models): skip a pass over every logit.
        self.b = None if b is None or not bool(b.any()) else b.to(device=W.device, dtype=dtype)
        self.transform = unembed.transform
        self.fnorm = unembed.final_norm.to(dtype, W.device)
        entries = max(map(len, plan.groups))
        if plan.lanes > 1:  # each worker: a piece of the evened blocks of positions, its reference rows
            self.buffers = _workspace.take((plan.piece_rows + entries) * plan.width, dtype, W.device, 2 * plan.lanes)
        else:
            self.buffers = _workspace.take(entries * plan.step * plan.width, dtype, W.device)
        # The tiled kernel casts a half-precision W a tile at a time into this buffer (a slice per worker).
        self.w_tile = (
            torch.empty(unembed.d_model * plan.width * plan.lanes, dtype=dtype, device=W.device)
            if W.dtype != dtype and plan.read is read_product
            else None
        )
        self.members = None if token_groups is None else GroupMembers(token_groups)
        self.member_ids = None if self.members is None else self.members.ids.to(W.device)

    def chunk(
        self,
        start: int,
        stop: int,
        reference: Optional[torch.Tensor],
        target_ids: Optional[torch.Tensor],
        next_tokens: Optional[torch.Tensor],
    ) -> None:
        """Read rows ``start:stop`` of every entry, one product per group of entries."""
        scale = None
        if self.norm == "cached":
            scale = self.fnorm.scale(reference[start:stop].to(device=self.device, dtype=self.dtype))
        tid = None if target_ids is None else target_ids[start:stop].to(self.device)
        nxt = None if next_tokens is None else next_tokens[start:stop].to(self.device)
        for number, group in enumerate(self.plan.groups):
            # Outputs of this product: the reference's own entry only from the first.
            outs = [self.plan.sources[i][1] if (number == 0 or i != self.plan.ref_source) else None for i in group]
            self._product(group, outs, start, stop, scale, tid, nxt)

    def _product(
        self,
        group: List[int],
        outs: List[Optional[int]],
        start: int,
        stop: int,
        scale: Optional[torch.Tensor],
        tid: Optional[torch.Tensor],
        nxt: Optional[torch.Tensor],
    ) -> None:
        plan, all_logits = self.plan, self.results["logits"]

        def keep(a: int, z: int, logits: torch.Tensor, first: int) -> None:
            rows = slice(start + first, start + first + logits.shape[1])
            for j, o in enumerate(outs):
                if o is not None:
                    all_logits[o, rows, a:z] = logits[j].float().cpu()

        # Each slice moves to W's device alone: the reference may live elsewhere.
        x = torch.stack([plan.sources[i][0][start:stop].to(device=self.device, dtype=self.dtype) for i in group])
        x = self.fnorm.apply(x, self.norm, scale).reshape(len(group) * (stop - start), -1)
        if plan.half:  # rounded to W's dtype; the tiles read it back in float32: the same products
            x = x.to(self.W.dtype) if plan.read is read_whole else x.to(self.W.dtype).to(self.dtype)
        st = plan.read(
            x,
            len(group),
            self.W,
            self.b,
            self.transform,
            self.buffers,
            top_k=self.top_k,
            with_reference=plan.ref_source is not None,
            next_tokens=nxt,
            target_ids=tid,
            keep_logits=keep if all_logits is not None else None,
            member_ids=self.member_ids,
            **({} if plan.read is read_whole else {"width": plan.width, "w_tile": self.w_tile}),
            **({"piece_rows": plan.piece_rows} if plan.lanes > 1 else {}),
        )
        kept = [j for j, o in enumerate(outs) if o is not None]
        if not kept:
            return
        rows_at = ([outs[j] for j in kept], slice(start, stop))
        for name, value in _entries_to_host(st, kept, nxt, self.members).items():
            self.results[name][rows_at] = value


class _Workspace:
    """The CPU kernel's working buffers, kept from one :func:`read_rows` call for the next.

    A fresh 32 MiB tile costs tens of milliseconds of page faults on its first touch (more in a
    virtual machine), about 4 % of a GPT-2-sized lens; kept, the next call finds it in memory.
    At most one set per dtype is kept, and only within :data:`DEFAULT_CHUNK_BUDGET_BYTES` (or the
    budget set by :func:`~tl_logitlens.kernel.tuning.set_chunk_budget`), so what stays resident
    between calls is bounded by the budget (the fused path touches about a third of it). A call
    takes the kept set out while it runs: concurrent calls never share buffers. On CUDA the
    caching allocator already does this.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: Dict[torch.dtype, List[torch.Tensor]] = {}

    def take(self, numel: int, dtype: torch.dtype, device: torch.device, count: int = BUFFERS) -> List[torch.Tensor]:
        """``count`` (at least :data:`~.tiles.BUFFERS`) flat buffers of at least ``numel`` elements."""
        count = max(count, BUFFERS)
        if device.type == "cpu":
            with self._lock:
                kept = self._kept.pop(dtype, None)
            if kept is not None and len(kept) >= count and kept[0].numel() >= numel and self._within_budget(kept):
                return kept
        return [torch.empty(numel, dtype=dtype, device=device) for _ in range(count)]

    def give_back(self, buffers: List[torch.Tensor]) -> None:
        if buffers[0].device.type == "cpu" and self._within_budget(buffers):
            with self._lock:
                self._kept[buffers[0].dtype] = buffers

    @staticmethod
    def _within_budget(buffers: List[torch.Tensor]) -> bool:
        size = sum(b.numel() * b.element_size() for b in buffers)
        return size <= (tuning.chunk_budget() or DEFAULT_CHUNK_BUDGET_BYTES)

    def clear(self) -> None:
        """Let go of the kept buffers."""
        with self._lock:
            self._kept.clear()


_workspace = _Workspace()


def _entries_to_host(
    st: Any, kept: List[int], next_tokens: Optional[torch.Tensor], members: Optional[GroupMembers]
) -> Dict[str, torch.Tensor]:
    """The statistics of entries ``kept`` of one product (:class:`tl_logitlens.kernel.tiles.ProductStats`),
    finished where the product ran and brought to the CPU in two copies, one of floats and one
    of integers: on a GPU each copy waits for the device, and one per statistic and entry
    would cost more than a GPT-2-sized product."""
    index = torch.tensor(kept, device=st.log_z.device)

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.index_select(0, index)

    log_z = pick(st.log_z)
    top_logits = pick(st.top_logits)
    floats = {
        "entropy": pick(st.entropy),
        "top_logits": top_logits,
        "top_probs": torch.exp(top_logits - log_z.unsqueeze(-1)),
    }
    ints = {"top_ids": pick(st.top_ids)}
    if st.kl_to_reference is not None:
        floats["kl_to_reference"] = pick(st.kl_to_reference)
    if st.next_logit is not None:
        value = log_z - pick(st.next_logit)
        floats["next_token_loss"] = torch.where(next_tokens >= 0, value, torch.full_like(value, float("nan")))
    if st.target_logits is not None:
        t_logits = pick(st.target_logits)
        floats["target_logits"] = t_logits
        floats["target_probs"] = torch.exp(t_logits - log_z.unsqueeze(-1))
        ints["target_ranks"] = pick(st.target_ranks)
    if st.member_logits is not None:
        floats["group_logits"], floats["group_probs"] = group_statistics(pick(st.member_logits), log_z, members)
    return {**_packed_to_host(floats, torch.float32), **_packed_to_host(ints, torch.long)}


def _packed_to_host(fields: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """``fields`` (each ``[k, n]`` or ``[k, n, c]``) on the CPU in ``dtype`` through one copy."""
    k, n = next(iter(fields.values())).shape[:2]
    flat = torch.cat([t.reshape(k, n, -1).to(dtype) for t in fields.values()], -1).cpu()
    out, at = {}, 0
    for name, t in fields.items():
        width = t.shape[2] if t.dim() == 3 else 1
        out[name] = flat[..., at : at + width].reshape(t.shape)
        at += width
    return out


def reshape_readout(result: Readout, lead: Tuple[int, ...]) -> Readout:
    """Give every field of a flat ``[outer, rows, ...]`` readout the leading shape ``lead``."""

    def fix(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if t is None:
            return None
        return t.reshape(*lead, *t.shape[2:])

    return Readout(**{name: fix(getattr(result, name)) for name in result.__dataclass_fields__})
