"""The one kernel under everything: read ``d_model`` vectors into vocabulary statistics.

``logits = norm(x) @ W_U + b_U`` for every vector, computed a block of rows at a time in
float32; from each block the statistics are taken (top-k, entropy, KL to a reference
distribution, loss on a true next token, chosen tokens' logits, probabilities and ranks)
and the block's logits are thrown away. ``[rows, d_vocab]`` logits exist only for one
block (:data:`DEFAULT_CHUNK_BUDGET_BYTES`), unless the caller asks for all of them with
``return_logits=True``.

The statistics are taken from the logits shifted by their row maximum ``s = l - max(l)``,
with ``Z = sum(exp(s))``:

- ``log p = s - log Z``; ``entropy = log Z - sum(exp(s) * s) / Z``
- ``KL(ref || x) = sum p_ref (log p_ref - log p_x) = -H_ref - sum(p_ref * s_x) + log Z_x``

so each statistic is one pass over a block that is still in cache, and the only
full-vocabulary buffers besides the logits are ``exp(s)`` and the reference's
probabilities. The cost is the unembedding product: on GPT-2 shapes everything else
adds about 13% to it (see ``bench/bench_lens.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

import torch

from .errors import LensInputError, NonFiniteActivationError
from .model_access import ModelView, view as view_model
from .norm import NORM_MODES
from .tokens import token_list

UNEMBED_MODES = ("W_U", "W_E")

#: Memory the kernel may use for its full-vocabulary buffers (one block of logits for
#: every stack entry at once, the reference's probabilities and two small scratch blocks)
#: when ``chunk_size=None``. 256 MiB holds ~1300 GPT-2 rows (d_vocab 50257): enough that
#: the unembedding product runs at full BLAS speed (64 to 256 MiB measure the same;
#: 1 GiB is ~4% slower, its logits no longer come back from cache), small enough that
#: the logit lens on 8 x 512 tokens adds well under 1 GiB in all. Override it per call
#: with ``chunk_size=`` (rows of logits held at once).
DEFAULT_CHUNK_BUDGET_BYTES = 256 * 2**20
# Rows per statistics pass: [_SUB_ROWS, d_vocab] blocks stay in cache across the passes.
_SUB_ROWS = 32
# Top-k by block maxima (block size, and the smallest vocabulary it is used for).
_TOPK_BLOCK = 128
_TOPK_MIN_VOCAB = 16 * _TOPK_BLOCK
# exp(x) = 2 ** (x * log2(e)): torch's exp2 costs half its exp, and the scaling rides on
# the in-place shift by the row maximum, so the shifted logits are kept in log2 units.
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def chunk_rows(d_vocab: int, chunk_size: Optional[int] = None, budget: int = DEFAULT_CHUNK_BUDGET_BYTES) -> int:
    """Rows of ``d_vocab`` float32 logits held at once: ``chunk_size`` if given, else as many as fit ``budget`` bytes."""
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise LensInputError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        return chunk_size
    return max(1, budget // (4 * d_vocab))


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
        logits: ``[*lead, d_vocab]`` only with ``return_logits=True``.
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
    logits: Optional[torch.Tensor] = field(default=None, repr=False)


def unembedding(view: ModelView, unembed: str, dtype: torch.dtype) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(W [d_model, d_vocab], b [d_vocab] or None)`` for ``"W_U"`` or ``"W_E"`` (transposed, no bias)."""
    if unembed == "W_U":
        b_U = view.b_U
        return view.W_U.to(dtype), (None if b_U is None else b_U.to(dtype))
    if unembed == "W_E":
        W_E = view.W_E
        if W_E.shape[0] != view.d_vocab:
            raise LensInputError(
                f"unembed='W_E' needs an embedding with one row per output token, but W_E has "
                f"{W_E.shape[0]} rows and W_U {view.d_vocab} columns; use unembed='W_U'."
            )
        return W_E.T.to(dtype), None
    raise LensInputError(f"unembed must be one of {UNEMBED_MODES}, got {unembed!r}")


def check_modes(norm: str, unembed: str, top_k: int, d_vocab: int) -> None:
    """Validate the cheap arguments shared by every entry point."""
    if norm not in NORM_MODES:
        raise LensInputError(f"norm must be one of {NORM_MODES}, got {norm!r}")
    if unembed not in UNEMBED_MODES:
        raise LensInputError(f"unembed must be one of {UNEMBED_MODES}, got {unembed!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= d_vocab:
        raise LensInputError(f"top_k must be an int in [1, {d_vocab}], got {top_k!r}")


def require_finite(x: torch.Tensor, name: str) -> None:
    """Raise :class:`NonFiniteActivationError` naming ``name`` if ``x`` holds NaN or inf."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteActivationError(
            f"{name} holds {bad} NaN or inf values; the model's forward pass overflowed or the "
            "input was corrupted (try float32 weights, or check the prompt and the weights)."
        )


def compute_dtype(view: ModelView) -> torch.dtype:
    """float64 for float64 models, float32 otherwise (half precision is upcast)."""
    return torch.float64 if view.W_U.dtype == torch.float64 else torch.float32


def _top_k(logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(logits, k)`` over ``[n, d_vocab]`` rows: ``(values, ids)``, each ``[n, k]``.

    For a large vocabulary the row is cut into blocks of ``_TOPK_BLOCK`` tokens: one cheap
    max pass gives each block's maximum, and the top k are searched only inside the k
    blocks with the largest maxima (plus the short tail block). That is exact: a token in
    a block outside those k is beaten by k block maxima, so it is not in the top k. The
    values equal ``torch.topk``'s; ids can differ only in the order of exactly tied logits.
    It costs about a fifth of a full ``torch.topk``, which copies and partially sorts
    every row.
    """
    n, d_vocab = logits.shape
    size = _TOPK_BLOCK
    n_blocks = d_vocab // size
    if d_vocab < _TOPK_MIN_VOCAB or 4 * k > n_blocks:
        top = torch.topk(logits, k, dim=-1)
        return top.values, top.indices
    main = n_blocks * size
    block_max = logits[:, :main].view(n, n_blocks, size).amax(-1)  # [n, n_blocks]
    best = block_max.topk(k, dim=-1).indices  # [n, k]
    offsets = torch.arange(size, device=logits.device)
    candidates = (best.unsqueeze(-1) * size + offsets).reshape(n, k * size)
    if main < d_vocab:
        tail = torch.arange(main, d_vocab, device=logits.device).expand(n, d_vocab - main)
        candidates = torch.cat([candidates, tail], dim=1)
    top = logits.gather(1, candidates).topk(k, dim=-1)
    return top.values, candidates.gather(1, top.indices)


def _reference_entry(vectors: torch.Tensor, reference: Optional[torch.Tensor]) -> Optional[int]:
    """The index of an entry of ``vectors [outer, rows, d]`` equal to ``reference [rows, d]``, else ``None``.

    The logit lens reads the final stream both as its last entry and as the KL reference;
    finding it here saves one full unembedding of every row.
    """
    if reference is None or reference.shape != vectors.shape[1:] or reference.dtype != vectors.dtype:
        return None
    if reference.device != vectors.device:
        return None
    for o in reversed(range(vectors.shape[0])):
        if torch.equal(vectors[o], reference):
            return o
    return None


def read_rows(
    view: ModelView,
    vectors: torch.Tensor,
    *,
    norm: str,
    unembed: str,
    top_k: int,
    target_ids: Optional[torch.Tensor] = None,
    reference: Optional[torch.Tensor] = None,
    next_tokens: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    return_logits: bool = False,
) -> Readout:
    """The kernel, on flat shapes: ``vectors [outer, rows, d_model]``.

    ``reference [rows, d_model]`` (read the same way as the vectors) gives KL and, with
    ``norm="cached"``, the scale; ``target_ids [rows, t]``; ``next_tokens [rows]`` with
    ``-1`` for none. Results are shaped ``[outer, rows, ...]``.

    How it runs: rows are taken ``c`` at a time for every entry at once, so one matrix
    product ``[entries * c, d_model] @ W_U`` fills a buffer of ``chunk_size`` logit rows
    (large enough for full BLAS speed). The statistics are then taken ``_SUB_ROWS`` rows
    at a time, reference entry first, so each block of logits, its exponentials and the
    reference's probabilities stay in cache across the passes: top-k (by block maxima),
    targets and ranks on the raw logits, then one in-place shift by the row maximum, one
    ``exp``, one sum and one or two row dot products. When the reference equals one of
    the entries (the logit lens's final stream) it is unembedded once, not twice.
    """
    outer, rows, d_model = vectors.shape
    dtype = compute_dtype(view)
    W, b = unembedding(view, unembed, dtype)
    device = W.device
    d_vocab = view.d_vocab
    fnorm = view.final_norm.to(dtype)
    transform = view.output_transform if unembed == "W_U" else None
    if norm == "cached" and reference is None:
        raise LensInputError("norm='cached' takes the scale from reference=, the final residual stream at each row")

    # Entries to unembed: (source rows [rows, d_model], output entry or None). The reference
    # is read first: its probabilities are needed by every other entry's KL.
    ref_entry = _reference_entry(vectors, reference)
    sources: list = [(vectors[o], o) for o in range(outer)]
    ref_source: Optional[int] = ref_entry
    if reference is not None and ref_entry is None:
        sources.insert(0, (reference, None))
        ref_source = 0
    order = list(range(len(sources)))
    if ref_source is not None:
        order.remove(ref_source)
        order.insert(0, ref_source)

    itemsize = torch.finfo(dtype).bits // 8
    held = chunk_rows(d_vocab, chunk_size, budget=DEFAULT_CHUNK_BUDGET_BYTES * 4 // itemsize)
    per_row = len(sources) + (1 if reference is not None else 0)  # logit rows + reference probs
    step = max(1, min(rows, held // (per_row + 1)))
    per_group = max(1, min(len(sources), held // step - (1 if reference is not None else 0)))
    groups = [order[i : i + per_group] for i in range(0, len(order), per_group)]
    sub = min(_SUB_ROWS, step)

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

    def buffer(n: int) -> torch.Tensor:
        return torch.empty(n, d_vocab, dtype=dtype, device=device)

    logits_buf = buffer(per_group * step)
    probs_ref = buffer(step) if reference is not None else None
    neg_h_ref = torch.empty(step, dtype=dtype, device=device)
    exps = buffer(sub)
    scratch = buffer(sub)  # rank marks, then elementwise products for the row dot products
    if b is not None and not bool(b.any()):
        b = None  # a zero bias (GPT-2 and most folded models): skip a pass over every logit

    def dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Row-wise dot products of ``[n, d_vocab]`` blocks, through the scratch buffer (no allocation)."""
        return torch.mul(u, v, out=scratch[: u.shape[0]]).sum(-1)

    def read_block(s: torch.Tensor, o: Optional[int], is_ref: bool, a: int, lo: int) -> None:
        """Statistics of raw logits ``s [n, d_vocab]`` (rows ``a:a+n``; ``lo`` within the chunk); ``s`` is overwritten."""
        n = s.shape[0]
        z = a + n
        if b is not None:
            s.add_(b)
        if transform is not None:
            s.copy_(transform(s))
        if o is None:  # the reference alone: only its probabilities are needed
            peak = s.amax(-1, keepdim=True)
        else:
            if all_logits is not None:
                all_logits[o, a:z] = s.float().cpu()
            values, ids = _top_k(s, top_k)
            peak = values[:, :1]
            if tid is not None:
                picked_t = s.gather(1, tid[lo : lo + n])  # raw logits, [n, t]
                for j in range(n_targets):  # ties do not count against the target
                    t_ranks[o, a:z, j] = torch.gt(s, picked_t[:, j : j + 1], out=scratch[:n]).sum(-1).long().cpu()
            if nxt is not None:
                picked_n = s.gather(1, nxt[lo : lo + n].clamp_min(0).unsqueeze(1)).squeeze(1)
        torch.add(peak * -_LOG2E, s, alpha=_LOG2E, out=s)  # s = (logits - max) * log2(e), in place
        e = exps[:n]
        torch.exp2(s, out=e)  # exp(logits - max)
        total = e.sum(-1)
        logz = torch.log(total)
        p_dot = None  # sum(p_ref * (logits - max))
        if is_ref:
            p = probs_ref[lo : lo + n]
            torch.div(e, total.unsqueeze(1), out=p)
            p_dot = dot(p, s) * _LN2
            neg_h_ref[lo : lo + n] = p_dot - logz
            if o is None:
                return
            ent = logz - p_dot
        else:
            ent = logz - dot(e, s) * _LN2 / total
        entropy[o, a:z] = ent.float().cpu()
        top_ids[o, a:z] = ids.cpu()
        top_logits[o, a:z] = values.float().cpu()
        top_probs[o, a:z] = torch.exp(values - peak - logz.unsqueeze(-1)).float().cpu()
        if kl is not None:
            if p_dot is None:
                p_dot = dot(probs_ref[lo : lo + n], s) * _LN2
            kl[o, a:z] = (neg_h_ref[lo : lo + n] - p_dot + logz).clamp_min(0.0).float().cpu()
        if nxt is not None:
            value = logz - (picked_n - peak[:, 0])
            has = nxt[lo : lo + n] >= 0
            loss[o, a:z] = torch.where(has, value, torch.full_like(value, float("nan"))).float().cpu()
        if tid is not None:
            t_logits[o, a:z] = picked_t.float().cpu()
            t_probs[o, a:z] = torch.exp(picked_t - peak - logz.unsqueeze(-1)).float().cpu()

    with torch.no_grad():
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            n_rows = stop - start
            scale = None
            if norm == "cached":
                scale = fnorm.scale(reference[start:stop].to(device=device, dtype=dtype))
            tid = None if target_ids is None else target_ids[start:stop].to(device)
            nxt = None if next_tokens is None else next_tokens[start:stop].to(device)
            for group in groups:
                x = torch.stack([sources[i][0][start:stop] for i in group]).to(device=device, dtype=dtype)
                x = fnorm.apply(x, norm, scale).reshape(len(group) * n_rows, d_model)
                out = logits_buf[: x.shape[0]]
                torch.mm(x, W, out=out)  # the bias is added per block, while it is in cache
                block = out.view(len(group), n_rows, d_vocab)
                for lo in range(0, n_rows, sub):
                    hi = min(n_rows, lo + sub)
                    for j, i in enumerate(group):
                        read_block(block[j, lo:hi], sources[i][1], i == ref_source, start + lo, lo)
    return Readout(
        top_ids=top_ids,
        top_logits=top_logits,
        top_probs=top_probs,
        entropy=entropy,
        kl_to_reference=kl,
        next_token_loss=loss,
        target_ids=None if target_ids is None else target_ids.expand(outer, rows, n_targets).clone(),
        target_logits=t_logits,
        target_probs=t_probs,
        target_ranks=t_ranks,
        logits=all_logits,
    )


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
        chunk_size: rows per chunk; ``None`` picks it from
            :data:`DEFAULT_CHUNK_BUDGET_BYTES`.
        return_logits: also return the full ``[*lead, d_vocab]`` logits (memory heavy).

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
