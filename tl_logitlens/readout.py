"""The one kernel under everything: read ``d_model`` vectors into vocabulary statistics.

``logits = norm(x) @ W_U + b_U`` for every vector, in float32, with only statistics kept:
top-k, entropy, KL to a reference distribution, loss on a true next token, chosen tokens'
logits, probabilities and ranks. Rows are taken a chunk at a time, every stack entry of
those rows in one matrix product (:func:`read_rows`), and each product is read a tile of
vocabulary columns at a time (:mod:`tl_logitlens.tiles`), so ``[rows, d_vocab]`` logits
never exist unless the caller asks for them with ``return_logits=True``. The tile shape
(rows per product, columns per tile) is measured for the processor at hand at first use
(:mod:`tl_logitlens.tuning`); on CUDA one product spans the vocabulary
(:func:`tl_logitlens.tiles.read_whole`). Memory is bounded by a budget
(:data:`DEFAULT_CHUNK_BUDGET_BYTES` on the CPU), not by how many vectors are read.

Precision and devices: statistics are float32 (float64 for a float64 model) whatever the
model's dtype. On the CPU a bfloat16 or float16 unembedding is cast a tile of columns at a
time into a reused buffer, never copied whole, and read in float32; on CUDA it is read in its
own dtype by the tensor cores, the normalised vectors rounded to it, with float32
accumulation and logits (:func:`tl_logitlens.tuning.half_products`, which also says how to
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

from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Dict, List, Optional, Tuple

import torch

from .errors import LensInputError, NonFiniteActivationError
from .model_access import ModelView, view as view_model
from .norm import NORM_MODES
from . import tuning
from .tiles import BUFFERS, needs_whole_rows, read_product, read_whole, tile_width
from .tokens import token_list

UNEMBED_MODES = ("W_U", "W_E")

#: The most memory the kernel's working buffers take on the CPU when ``chunk_size=None``
#: (three tiles of ``[rows, width]`` logits, :mod:`tl_logitlens.tiles`). The shape within it
#: is measured for the processor at hand (:mod:`tl_logitlens.tuning`); set a budget with
#: ``tuning.set_chunk_budget(bytes)``, or rows per product with ``chunk_size=``. Memory does
#: not grow with the number of vectors read.
DEFAULT_CHUNK_BUDGET_BYTES = tuning.CPU_BUDGET_BYTES


def check_chunk_size(chunk_size: Optional[int]) -> None:
    """Refuse a ``chunk_size`` (rows per product, or ``None``) that is not a positive int; the
    entry points call this before any forward pass (:mod:`tl_logitlens.tuning` sizes products)."""
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


def unembedding(view: ModelView, unembed: str, dtype: torch.dtype) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(W [d_model, d_vocab], b [d_vocab] or None)`` for ``"W_U"`` or ``"W_E"`` (transposed, no bias).

    ``W`` stays in the model's own dtype and on its own device (the kernel casts it a tile
    at a time: a float32 copy of a 7B model's unembedding is 0.5 GB); the small bias is
    returned in ``dtype``.
    """
    if unembed == "W_U":
        b_U = view.b_U
        return view.W_U, (None if b_U is None else b_U.to(dtype))
    if unembed == "W_E":
        W_E = view.W_E
        if W_E.shape[0] != view.d_vocab:
            raise LensInputError(
                f"unembed='W_E' needs an embedding with one row per output token, but W_E has "
                f"{W_E.shape[0]} rows and W_U {view.d_vocab} columns; use unembed='W_U'."
            )
        return W_E.T, None
    raise LensInputError(f"unembed must be one of {UNEMBED_MODES}, got {unembed!r}")


def check_modes(norm: str, unembed: str, top_k: int, d_vocab: int) -> None:
    """Validate the cheap arguments shared by every entry point."""
    if norm not in NORM_MODES:
        raise LensInputError(f"norm must be one of {NORM_MODES}, got {norm!r}")
    if unembed not in UNEMBED_MODES:
        raise LensInputError(f"unembed must be one of {UNEMBED_MODES}, got {unembed!r}")
    # Any integer type (NumPy's included) is an int here; bool is not a count.
    if isinstance(top_k, bool) or not isinstance(top_k, Integral) or not 1 <= int(top_k) <= d_vocab:
        raise LensInputError(f"top_k must be an int in [1, {d_vocab}], got {top_k!r}")


def require_finite(x: torch.Tensor, name: str) -> None:
    """Raise :class:`NonFiniteActivationError` naming ``name`` if ``x`` holds NaN or inf."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteActivationError(
            f"{name} holds {bad} NaN or inf values; the model's forward pass overflowed or the "
            "input was corrupted (try float32 weights, or check the prompt and the weights)."
        )


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


def group_statistics(member_logits: torch.Tensor, log_z: torch.Tensor, members: GroupMembers) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(group_logits, group_probs)`` ``[..., group]`` from the members' logits ``[..., members]``
    and ``log Z [...]``: ``logit_G = logsumexp(l[G])``, ``p_G = exp(logit_G - log Z)``."""
    logits = torch.stack([torch.logsumexp(member_logits[..., s.to(member_logits.device)], -1) for s in members.slots], -1)
    return logits, torch.exp(logits - log_z.unsqueeze(-1))


def compute_dtype(view: ModelView) -> torch.dtype:
    """float64 for float64 models, float32 otherwise (half precision is upcast)."""
    return torch.float64 if view.W_U.dtype == torch.float64 else torch.float32


def read_rows(
    view: ModelView,
    vectors: torch.Tensor,
    *,
    norm: str,
    unembed: str,
    top_k: int,
    target_ids: Optional[torch.Tensor] = None,
    reference: Optional[torch.Tensor] = None,
    reference_entry: Optional[int] = None,
    next_tokens: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    return_logits: bool = False,
    token_groups: Optional[List[List[int]]] = None,
) -> Readout:
    """The kernel, on flat shapes: ``vectors [outer, rows, d_model]``.

    ``reference [rows, d_model]`` (read the same way as the vectors) gives KL and, with
    ``norm="cached"``, the scale; ``reference_entry``: the index of the entry of
    ``vectors`` that *is* the reference (the logit lens's final stream), which is then
    unembedded once, not twice; ``target_ids [rows, t]``; ``next_tokens [rows]`` with
    ``-1`` for none; ``token_groups``: lists of token ids, validated (each non-empty, ids in
    range), whose summed probability and log-sum-exp logit are read. Results are shaped
    ``[outer, rows, ...]``.

    How it runs: rows are taken ``c`` at a time for every entry at once (the reference
    first), so one matrix product ``[entries * c, d_model] @ W_U`` has enough rows for full
    BLAS speed; :func:`tl_logitlens.tiles.read_product` computes it a tile of vocabulary
    columns at a time and keeps only running statistics (the shape from
    :func:`tl_logitlens.tuning.tile_shape`; on CUDA :func:`tl_logitlens.tiles.read_whole`).
    """
    outer, rows, d_model = vectors.shape
    dtype = compute_dtype(view)
    W, b = unembedding(view, unembed, dtype)
    device = W.device
    d_vocab = view.d_vocab
    fnorm = view.final_norm.to(dtype, device)
    transform = view.output_transform if unembed == "W_U" else None
    if norm == "cached" and reference is None:
        raise LensInputError("norm='cached' takes the scale from reference=, the final residual stream at each row")
    if b is not None and not bool(b.any()):
        b = None  # a zero bias (GPT-2 and most folded models): skip a pass over every logit

    # Entries to unembed: (source rows [rows, d_model], output entry or None). The reference
    # leads every product: each entry's KL needs its exponentials, tile by tile.
    if reference_entry is not None and (reference is None or not 0 <= reference_entry < outer):
        raise ValueError(f"reference_entry {reference_entry} needs reference= and must index one of {outer} entries")
    ref_entry = reference_entry
    sources: list = [(vectors[o], o) for o in range(outer)]
    ref_source: Optional[int] = ref_entry
    if reference is not None and ref_entry is None:
        sources.append((reference, None))
        ref_source = len(sources) - 1
    others = [i for i in range(len(sources)) if i != ref_source]
    lead = [] if ref_source is None else [ref_source]

    check_chunk_size(chunk_size)
    shape = tuning.tile_shape(W, dtype, whole_rows=needs_whole_rows(transform), chunk_size=chunk_size)
    read = read_whole if shape.strategy == "whole" else read_product
    width = d_vocab if shape.strategy == "whole" else tile_width(d_vocab, transform, shape.width)
    half = tuning.half_products(W)  # on CUDA: tensor-core products of a half-precision W_U
    product_rows = shape.rows
    step = max(1, min(rows, product_rows // len(sources)))
    per_group = max(1, product_rows // step - len(lead))
    groups = [lead + others[i : i + per_group] for i in range(0, len(others), per_group)] or [lead]
    buffers = [torch.empty(max(map(len, groups)) * step * width, dtype=dtype, device=device) for _ in range(BUFFERS)]
    # The tiled kernel casts a half-precision W a tile at a time into this one buffer.
    w_tile = torch.empty(d_model * width, dtype=dtype, device=device) if W.dtype != dtype and read is read_product else None

    top_ids = torch.empty(outer, rows, top_k, dtype=torch.long)
    top_logits = torch.empty(outer, rows, top_k, dtype=torch.float32)
    top_probs = torch.empty_like(top_logits)
    entropy = torch.empty(outer, rows, dtype=torch.float32)
    kl = torch.empty(outer, rows) if reference is not None else None
    loss = torch.empty(outer, rows) if next_tokens is not None else None
    n_targets = 0 if target_ids is None else target_ids.shape[1]
    t_logits = torch.empty(outer, rows, n_targets) if target_ids is not None else None
    t_probs = torch.empty_like(t_logits) if t_logits is not None else None
    t_ranks = torch.empty(outer, rows, n_targets, dtype=torch.long) if target_ids is not None else None
    all_logits = torch.empty(outer, rows, d_vocab) if return_logits else None
    members = None if token_groups is None else GroupMembers(token_groups)
    member_ids = None if members is None else members.ids.to(device)
    g_logits = torch.empty(outer, rows, len(token_groups)) if token_groups is not None else None
    g_probs = torch.empty_like(g_logits) if g_logits is not None else None

    # Where each statistic lands, by its Readout field (the names _entries_to_host gives them).
    results = {"entropy": entropy, "top_ids": top_ids, "top_logits": top_logits, "top_probs": top_probs,
               "kl_to_reference": kl, "next_token_loss": loss, "target_logits": t_logits, "target_probs": t_probs,
               "target_ranks": t_ranks, "group_logits": g_logits, "group_probs": g_probs}

    with torch.no_grad():
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            scale = None
            if norm == "cached":
                scale = fnorm.scale(reference[start:stop].to(device=device, dtype=dtype))
            tid = None if target_ids is None else target_ids[start:stop].to(device)
            nxt = None if next_tokens is None else next_tokens[start:stop].to(device)
            for number, group in enumerate(groups):
                # Outputs of this product: the reference's own entry only from the first.
                outs = [sources[i][1] if (number == 0 or i != ref_source) else None for i in group]

                def keep(a: int, z: int, logits: torch.Tensor) -> None:
                    for j, o in enumerate(outs):
                        if o is not None:
                            all_logits[o, start:stop, a:z] = logits[j].float().cpu()

                # Each slice moves to W's device alone: the reference may live elsewhere.
                x = torch.stack([sources[i][0][start:stop].to(device=device, dtype=dtype) for i in group])
                x = fnorm.apply(x, norm, scale).reshape(len(group) * (stop - start), d_model)
                if half:  # rounded to W's dtype; the tiles read it back in float32: the same products
                    x = x.to(W.dtype) if read is read_whole else x.to(W.dtype).to(dtype)
                st = read(
                    x, len(group), W, b, transform, buffers, top_k=top_k, with_reference=ref_source is not None,
                    next_tokens=nxt, target_ids=tid, keep_logits=keep if all_logits is not None else None,
                    member_ids=member_ids,
                    **({} if read is read_whole else {"width": width, "w_tile": w_tile}),
                )
                kept = [j for j, o in enumerate(outs) if o is not None]
                if not kept:
                    continue
                host = _entries_to_host(st, kept, nxt, members)
                rows_at = ([outs[j] for j in kept], slice(start, stop))
                for name, value in host.items():
                    results[name][rows_at] = value
    return Readout(
        **results,
        target_ids=None if target_ids is None else target_ids.expand(outer, rows, n_targets).clone(),
        logits=all_logits,
    )


def _entries_to_host(st: Any, kept: List[int], next_tokens: Optional[torch.Tensor],
                     members: Optional[GroupMembers]) -> Dict[str, torch.Tensor]:
    """The statistics of entries ``kept`` of one product (:class:`tl_logitlens.tiles.ProductStats`),
    finished where the product ran and brought to the CPU in two copies, one of floats and one
    of integers: on a GPU each copy waits for the device, and one per statistic and entry
    would cost more than a GPT-2-sized product."""
    index = torch.tensor(kept, device=st.log_z.device)

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.index_select(0, index)

    log_z = pick(st.log_z)
    top_logits = pick(st.top_logits)
    floats = {"entropy": pick(st.entropy), "top_logits": top_logits,
              "top_probs": torch.exp(top_logits - log_z.unsqueeze(-1))}
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


def _per_row(arg: Optional[torch.Tensor], lead: Tuple[int, ...], name: str) -> Optional[int]:
    if arg is None:
        return None
    n = arg.ndim
    if n > len(lead) or tuple(arg.shape) != lead[len(lead) - n :]:
        raise LensInputError(
            f"{name} has shape {tuple(arg.shape)}, which does not match the trailing dims of the "
            f"vectors' leading shape {lead}; per-row arguments are right-aligned with the vectors."
        )
    return n


def readout(
    model: Any,
    vectors: torch.Tensor,
    *,
    norm: str = "recompute",
    unembed: str = "W_U",
    top_k: int = 5,
    targets: Any = None,
    reference: Optional[torch.Tensor] = None,
    next_tokens: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    return_logits: bool = False,
    lens: Any = None,
    labels: Any = None,
) -> Readout:
    """Read any residual-stream vectors ``[..., d_model]`` into vocabulary statistics.

    The kernel under the logit lens, usable on its own for any vector that lives in the
    residual stream (a head's output, a steering direction, a dictionary feature): each
    vector goes through the final norm (``norm``) and the unembedding (``unembed``) a
    chunk of rows at a time, and only statistics are kept.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` in eval mode.
        vectors: ``[..., d_model]`` floating-point vectors; ``lead`` is their leading shape.
        norm: ``"recompute"`` (own statistics), ``"cached"`` (the scale of ``reference``
            at each row) or ``"none"``.
        unembed: ``"W_U"`` (with ``b_U``) or ``"W_E"`` (embedding transposed, no bias).
        top_k: how many top tokens to keep per vector.
        targets: tokens to track: a string or id, or a list of them shared by all rows;
            or an integer tensor with one id per row, shaped like trailing dims of ``lead``.
        reference: ``[*tail, d_model]`` vectors (``tail`` trailing dims of ``lead``) whose
            distribution the KL is measured from (e.g. the final residual stream); it is read
            exactly as ``vectors`` are, and supplies the scale for ``norm="cached"``.
        next_tokens: integer ``[*tail]`` true next-token ids (``-1`` for none) for the loss.
        chunk_size: rows per matrix product; ``None``: the shape measured for this
            machine (:mod:`tl_logitlens.tuning`).
        return_logits: also return the full ``[*lead, d_vocab]`` logits (memory heavy).
        lens: a :class:`~tl_logitlens.lenses.Lens` or callable ``(h, label) -> h`` applied
            to ``vectors`` before the norm (``reference`` is read untransformed). Needs
            ``labels``.
        labels: the stack entry the vectors sit at: one label (``"3_pre"``) for all of
            them, or a list with one label per leading entry ``vectors[i]``.

    Returns:
        A :class:`Readout` with fields shaped ``[*lead, ...]``.

    Example::

        >>> import tl_logitlens as tll
        >>> model = tll.demo_model()
        >>> logits, cache = model.run_with_cache(tll.demo.induction_prompt(model))
        >>> final = cache["blocks.1.hook_resid_post"]          # [1, pos, d_model]
        >>> r = tll.readout(model, final, top_k=3)
        >>> r.top_ids.shape[-1], bool((r.top_ids[..., 0] == logits.argmax(-1)).all())
        (3, True)
    """
    v = model if isinstance(model, ModelView) else view_model(model)
    check_modes(norm, unembed, top_k, v.d_vocab)
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point():
        raise LensInputError("vectors must be a floating-point tensor [..., d_model]")
    if vectors.ndim < 1 or vectors.shape[-1] != v.d_model or vectors.numel() == 0:
        raise LensInputError(
            f"vectors must be non-empty and end in d_model={v.d_model}, got shape {tuple(vectors.shape)}"
        )
    lead = tuple(vectors.shape[:-1])
    if reference is not None and (not isinstance(reference, torch.Tensor) or reference.shape[-1] != v.d_model):
        raise LensInputError(f"reference must be a tensor [..., {v.d_model}]")
    per_row_targets = isinstance(targets, torch.Tensor) and targets.ndim >= 1
    if per_row_targets and targets.dtype.is_floating_point:
        raise LensInputError(f"targets must hold integer token ids, got dtype {targets.dtype}")
    ndims = [
        n
        for n in (
            _per_row(None if reference is None else reference[..., 0], lead, "reference"),
            _per_row(targets if per_row_targets else None, lead, "targets"),
            _per_row(next_tokens, lead, "next_tokens"),
        )
        if n is not None
    ]
    if len(set(ndims)) > 1:
        raise LensInputError("reference, per-row targets and next_tokens must index the same trailing dims")
    tail = len(lead) if not ndims else ndims[0]
    rows = 1
    for n in lead[len(lead) - tail :]:
        rows *= n
    outer = max(1, vectors.numel() // (rows * v.d_model))
    target_ids = None
    if per_row_targets:
        target_ids = targets.reshape(rows, 1).long()
        if int(target_ids.min()) < 0 or int(target_ids.max()) >= v.d_vocab:
            raise LensInputError(f"targets ids must lie in [0, {v.d_vocab})")
    elif targets is not None:
        target_ids = torch.tensor(token_list(v, targets, "target")).expand(rows, -1)
    if next_tokens is not None:
        next_tokens = next_tokens.reshape(rows).long()
        if int(next_tokens.max()) >= v.d_vocab:
            raise LensInputError(f"next_tokens ids must lie in [-1, {v.d_vocab})")
    require_finite(vectors, "vectors")
    if lens is not None:
        vectors = _lens_vectors(lens, labels, vectors)
    elif labels is not None:
        raise LensInputError("labels= names the entries a lens reads; it needs lens= as well")
    flat = read_rows(
        v,
        vectors.reshape(outer, rows, v.d_model),
        norm=norm,
        unembed=unembed,
        top_k=top_k,
        target_ids=target_ids,
        reference=None if reference is None else reference.reshape(rows, v.d_model),
        next_tokens=next_tokens,
        chunk_size=chunk_size,
        return_logits=return_logits,
    )
    return reshape_readout(flat, lead)


def _lens_vectors(lens: Any, labels: Any, vectors: torch.Tensor) -> torch.Tensor:
    """``vectors`` through ``lens`` at ``labels`` (one label, or one per leading entry)."""
    from .lens import _apply_lens
    from .lenses import check_lens, is_identity

    check_lens(lens)
    if isinstance(labels, str):
        return vectors if is_identity(lens) else _apply_lens(lens, vectors, labels)
    if not isinstance(labels, (list, tuple)) or vectors.ndim < 2 or len(labels) != vectors.shape[0] \
            or not all(isinstance(x, str) for x in labels):
        raise LensInputError(
            "with lens=, labels= must be one stack entry label (e.g. '3_pre') or a list of labels, one per "
            f"leading entry of vectors (shape {tuple(vectors.shape)}); got {labels!r}"
        )
    if is_identity(lens):
        return vectors
    return torch.stack([_apply_lens(lens, vectors[i], label) for i, label in enumerate(labels)])
