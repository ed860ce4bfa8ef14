"""Read any residual-stream vectors into vocabulary statistics: the kernel as an analysis.

:func:`readout` takes ``[..., d_model]`` vectors (a head's output, a steering direction, a
dictionary feature, a stream you cached), checks every argument before any work, applies a
``lens=`` at the entries named by ``labels=``, and hands the vectors to the kernel
(:func:`tl_logitlens.kernel.read_rows`); :class:`~tl_logitlens.kernel.Readout` holds the
statistics, shaped like the vectors' leading dims.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from .errors import LensInputError
from .inputs import check_modes, token_list
from .kernel import Readout, read_rows, require_finite, reshape_readout
from .lenses import apply_lens, check_lens, is_identity
from .model_access import ModelView
from .model_access import view as view_model

__all__ = ["Readout", "readout"]


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
        next_tokens: integer ``[*tail]`` true next-token ids (``-1`` for none) for the loss: a
            tensor or a list of ints; floats and ids below ``-1`` are refused.
        chunk_size: rows per matrix product; ``None``: the shape measured for this
            machine (:mod:`tl_logitlens.kernel.tuning`).
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
    next_tokens = _check_next_tokens(next_tokens, v.d_vocab)
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
    require_finite(vectors, "vectors")
    if lens is not None:
        vectors = _lens_vectors(lens, labels, vectors, v)
    elif labels is not None:
        raise LensInputError("labels= names the entries a lens reads; it needs lens= as well")
    flat = read_rows(
        v.unembedding(unembed),
        vectors.reshape(outer, rows, v.d_model),
        norm=norm,
        top_k=top_k,
        target_ids=target_ids,
        reference=None if reference is None else reference.reshape(rows, v.d_model),
        next_tokens=next_tokens,
        chunk_size=chunk_size,
        return_logits=return_logits,
    )
    return reshape_readout(flat, lead)


def _check_next_tokens(next_tokens: Any, d_vocab: int) -> Optional[torch.Tensor]:
    """``next_tokens`` as an integer tensor of ids in ``[0, d_vocab)`` or ``-1`` (no next token), or a clear error.

    Floats are refused, not truncated (``3.9`` is no token id), and so are negative ids other
    than ``-1``: only ``-1`` means "no next token", so ``-5`` is a mistake, not a padding mark.
    """
    if next_tokens is None:
        return None
    if isinstance(next_tokens, (list, tuple)):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in next_tokens):
            bad = next(t for t in next_tokens if not isinstance(t, int) or isinstance(t, bool))
            raise LensInputError(f"next_tokens must be integer token ids (-1 for none), got {bad!r} in the list")
        next_tokens = torch.tensor(next_tokens, dtype=torch.long)
    if not isinstance(next_tokens, torch.Tensor):
        raise LensInputError(
            f"next_tokens must be an integer tensor of token ids (-1 for none), got {type(next_tokens).__name__}"
        )
    if next_tokens.dtype.is_floating_point or next_tokens.dtype.is_complex or next_tokens.dtype == torch.bool:
        raise LensInputError(
            f"next_tokens must hold integer token ids (-1 for none), got dtype {next_tokens.dtype}; floats are not "
            "truncated to ids. Pass e.g. torch.tensor([3, 5, 7]) (or .long() ids you know to be whole)."
        )
    if next_tokens.numel():
        low, high = int(next_tokens.min()), int(next_tokens.max())
        if low < -1:
            raise LensInputError(
                f"next_tokens holds {low}: ids must lie in [0, {d_vocab}), and only -1 means 'no next token'"
            )
        if high >= d_vocab:
            raise LensInputError(f"next_tokens holds {high}: ids must lie in [-1, {d_vocab}) (the vocabulary size)")
    return next_tokens


def _lens_vectors(lens: Any, labels: Any, vectors: torch.Tensor, view: ModelView) -> torch.Tensor:
    """``vectors`` through ``lens`` at ``labels`` (one label, or one per leading entry)."""
    check_lens(lens, view, [labels] if isinstance(labels, str) else None)
    if isinstance(labels, str):
        return vectors if is_identity(lens) else apply_lens(lens, vectors, labels)
    if (
        not isinstance(labels, (list, tuple))
        or vectors.ndim < 2
        or len(labels) != vectors.shape[0]
        or not all(isinstance(x, str) for x in labels)
    ):
        raise LensInputError(
            "with lens=, labels= must be one stack entry label (e.g. '3_pre') or a list of labels, one per "
            f"leading entry of vectors (shape {tuple(vectors.shape)}); got {labels!r}"
        )
    check_lens(lens, view, labels)
    if is_identity(lens):
        return vectors
    return torch.stack([apply_lens(lens, vectors[i], label) for i, label in enumerate(labels)])
