"""A differentiable lens loss that reads the unembedding a tile of vocabulary columns at a time.

Training a lens costs ``d_vocab``-wide products for every layer and token. The textbook
route builds ``[rows, d_vocab]`` logits and log-probabilities per layer and backpropagates
through them; here the loss and its gradient come out of one tiled pass that never holds
more than one ``[rows, width]`` tile of logits.

For lens vectors ``x`` (already normalised, ``[..., rows, d_model]``), ``l = x @ W + b`` and
``q = softmax(l)``, and the final layer's distribution ``p = softmax(x_final @ W + b)``:

- ``KL(p || q) = sum p log p - (x . (p @ W^T) + p . b) + log Z_x``;
- ``d KL / d x = q @ W^T - p @ W^T``;
- ``CE(t) = log Z_x - (x . W[:, t] + b[t])``, ``d CE / d x = q @ W^T - W[:, t]^T``.

``log Z_x`` and ``q @ W^T`` are accumulated with an online softmax, as flash attention
does with its values: per tile, ``e = exp(l - m)`` for the running row maximum ``m``,
``Z += sum e`` and ``S += e @ W_tile^T``, both rescaled by ``exp(m - m')`` whenever the
maximum rises to ``m'``; at the end ``q @ W^T = S / Z``. So a step costs two products per
layer (the logits and ``e @ W_tile^T``) and the backward pass is a scaling of the gradient
saved by the forward pass. The final distribution's statistics (``sum p log p``,
``p @ W^T``, ``p . b``) depend only on the final layer: :func:`final_stats` computes them
once per batch and every layer shares them.

No gradient flows to ``W`` or ``b`` (the model is frozen), nor to the final layer.
A ``W`` stored in bfloat16 or float16 is cast a tile of columns at a time into a reused
float32 buffer, never whole; the arithmetic is float32 (float64 for float64 vectors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from ..errors import LensInputError
from . import native, tuning
from .precision import compute_dtype
from .tiles import BUFFERS, tile_width

__all__ = ["FinalStats", "final_stats", "lens_loss"]

# Rows per chunk are chosen so that one [rows, width] tile stays below this many bytes (what the
# forward kernel's CPU budget gives one of its tiles, or tuning.set_chunk_budget's).
_TILE_BYTES = tuning.CPU_BUDGET_BYTES // BUFFERS


@dataclass
class FinalStats:
    """The final layer's distribution ``p`` over ``rows`` positions, as the loss needs it.

    ``neg_entropy [rows]``: ``sum p log p``; ``p_w [rows, d_model]``: ``p @ W^T``;
    ``p_b [rows]``: ``p . b`` (zeros without a bias); ``log_z [rows]``: ``log sum exp`` of
    the final logits. All in the compute dtype, no gradient.
    """

    neg_entropy: torch.Tensor
    p_w: torch.Tensor
    p_b: torch.Tensor
    log_z: torch.Tensor


def _check_unembedding(W: torch.Tensor, b: Optional[torch.Tensor], d_model: int, what: str) -> None:
    if not isinstance(W, torch.Tensor) or W.ndim != 2:
        raise LensInputError(
            f"W must be the unembedding as a [d_model, d_vocab] tensor; got {getattr(W, 'shape', type(W))}."
        )
    if W.shape[0] != d_model:
        raise LensInputError(
            f"{what} has d_model {d_model} but W is {tuple(W.shape)} ([d_model, d_vocab] expected); "
            "pass model.W_U, not its transpose."
        )
    if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (W.shape[1],)):
        raise LensInputError(
            f"b must be [d_vocab] = [{W.shape[1]}]; got {getattr(b, 'shape', type(b))}. Pass model.b_U or None."
        )


def _width(width: Optional[int], W: torch.Tensor, dtype: torch.dtype) -> int:
    """Columns per tile: ``width`` if given, else the forward kernel's rule (:func:`~.tiles.tile_width`
    over the width :mod:`~.tuning` measured for this machine and matrix, always tiled)."""
    if width is None:
        with tuning.force(workers=1):  # the loss reads one stream of products: its tiles, not the workers' pieces
            return tile_width(W.shape[1], None, tuning.tile_shape(W, dtype, strategy="tiled").width)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise LensInputError(f"width must be a positive int (vocabulary columns per tile); got {width!r}.")
    return min(W.shape[1], width)


def _chunk_rows(rows: int, width: int, itemsize: int) -> int:
    """Rows per ``[rows, width]`` tile within the budget (:func:`tuning.set_chunk_budget` when set)."""
    return max(1, min(rows, (tuning.chunk_budget() or _TILE_BYTES) // (width * itemsize)))


def _online_pass(
    x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], width: int, *, with_s: bool
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One tiled pass over ``x [m, d]`` (compute dtype): per row the running maximum ``m``,
    ``Z = sum e`` and, if ``with_s``, ``S = e @ W^T`` ``[m, d]`` and ``B = e . b`` (``None``
    without a bias), with ``e = exp(l - m)`` for the final ``m``.

    Each tile of ``W`` is copied (and cast) once into ``ext = [W_tile^T | 1 | b_tile]``, so a
    single product ``e @ ext`` accumulates ``S``, ``Z`` and ``B`` together. Between the two
    products the tile becomes ``e``: with the fused kernel (:func:`tl_logitlens.kernel.native.shift_exp`)
    in one pass per row while it is in cache, else as tensor operations (:func:`_shift_exp_eager`).
    """
    rows, d = x.shape
    d_vocab = W.shape[1]
    n_ext = d + 1 + (1 if b is not None else 0)
    peak = x.new_empty(rows)
    acc = x.new_zeros(rows, n_ext if with_s else 1)  # [S | Z | B], or [Z]
    chunk = _chunk_rows(rows, width, x.element_size())
    tile_buf = x.new_empty(chunk * width)
    ext_buf = x.new_empty(width * n_ext)
    fused = native.fused(x)
    # With a bias, the fused path reads x as [x | 0 | 1] against ext^T = [W_tile; 1; b_tile]: the bias is added
    # inside the product (an addmm that broadcasts it cost 40 % more than the product on a 2-core Xeon).
    x_ext = torch.cat([x, x.new_zeros(rows, 1), x.new_ones(rows, 1)], 1) if fused and b is not None else None
    for a in range(0, d_vocab, width):
        z = min(d_vocab, a + width)
        w = z - a
        ext = ext_buf[: w * n_ext].view(w, n_ext)
        ext[:, :d].copy_(W[:, a:z].t())  # the tile in the compute dtype: never a whole copy of W
        ext[:, d] = 1
        b_c = None
        if b is not None:
            ext[:, d + 1].copy_(b[a:z])
            b_c = ext[:, d + 1]
        cols = ext[:, :d].t()  # [d, w]
        for r0 in range(0, rows, chunk):
            r1 = min(rows, r0 + chunk)
            tile = tile_buf[: (r1 - r0) * w].view(r1 - r0, w)
            if fused:
                if x_ext is None:
                    torch.mm(x[r0:r1], cols, out=tile)
                else:
                    torch.mm(x_ext[r0:r1], ext.t(), out=tile)
                native.shift_exp(tile, peak[r0:r1], acc[r0:r1], first=a == 0)
            else:
                _shift_exp_eager(tile, x[r0:r1], cols, b_c, peak[r0:r1], acc[r0:r1], first=a == 0)
            if with_s:
                acc[r0:r1].addmm_(tile, ext)
            else:
                acc[r0:r1, 0] += tile.sum(1)
    if not with_s:
        return peak, acc[:, 0], None, None
    return peak, acc[:, d], acc[:, :d], (acc[:, d + 1] if b is not None else None)


def _shift_exp_eager(
    tile: torch.Tensor,
    x: torch.Tensor,
    cols: torch.Tensor,
    b_c: Optional[torch.Tensor],
    m: torch.Tensor,
    acc: torch.Tensor,
    first: bool,
) -> None:
    """``tile = exp(x @ cols + b_c - m')`` with ``m'`` the new running row maximum (``m`` updated in
    place, ``acc`` rescaled where it rose), as tensor operations: the logits are shifted by the maximum
    so far while they are made (``addmm``), and only rows whose maximum rises are shifted again."""
    if first:
        torch.mm(x, cols, out=tile)
        if b_c is not None:
            tile += b_c
        m.copy_(tile.amax(1))
        tile -= m[:, None]
    else:
        if b_c is None:
            torch.addmm(-m[:, None], x, cols, out=tile)
        else:
            torch.addmm(b_c, x, cols, out=tile)
            tile -= m[:, None]
        rise = tile.amax(1)
        if bool((rise > 0).any()):  # the maximum rose: shift, and rescale the sums so far
            rise.clamp_(min=0)
            tile -= rise[:, None]
            acc *= torch.exp(-rise)[:, None]
            m += rise
    tile.exp_()


def final_stats(
    x_final: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor] = None, *, width: Optional[int] = None
) -> FinalStats:
    """The final layer's distribution's statistics, computed once per batch and shared by every layer.

    ``x_final [rows, d_model]``: the normalised final residual stream (what the model
    unembeds); ``W [d_model, d_vocab]``, ``b [d_vocab]`` or ``None``. No gradient.

    >>> W = torch.randn(4, 11); xf = torch.randn(3, 4)
    >>> fs = final_stats(xf, W, width=5)
    >>> p = torch.softmax(xf @ W, -1)
    >>> torch.allclose(fs.p_w, p @ W.T, atol=1e-5), torch.allclose(fs.neg_entropy, (p * p.log()).sum(-1), atol=1e-5)
    (True, True)
    """
    if not isinstance(x_final, torch.Tensor) or x_final.ndim != 2:
        raise LensInputError(
            "x_final must be [rows, d_model] normalised final-stream vectors; "
            f"got {getattr(x_final, 'shape', type(x_final))}."
        )
    _check_unembedding(W, b, x_final.shape[1], "x_final")
    dtype = compute_dtype(x_final.dtype)
    width = _width(width, W, dtype)
    with torch.no_grad():
        xf = x_final.detach().to(dtype)
        peak, total, S, B = _online_pass(xf, W, b, width, with_s=True)
        p_w = S / total[:, None]
        p_b = B / total if B is not None else torch.zeros_like(total)
        log_z = peak + total.log()
        # sum p log p = sum p l - log Z, with sum p l = x . (p @ W^T) + p . b
        return FinalStats(neg_entropy=(xf * p_w).sum(1) + p_b - log_z, p_w=p_w, p_b=p_b, log_z=log_z)


class _LensLoss(torch.autograd.Function):
    """Per-row loss of ``x [m, d]``; the gradient ``q @ W^T - target`` is accumulated in the forward pass."""

    @staticmethod
    def forward(ctx, x, W, b, target_w, target_const, valid, width):  # type: ignore[override]
        xc = x.detach().to(target_w.dtype)
        want_grad = ctx.needs_input_grad[0]
        peak, total, S, _ = _online_pass(xc, W, b, width, with_s=want_grad)
        log_z = peak + total.log()
        # loss = log Z_x - (x . target_w + target_const); KL adds sum p log p to target_const.
        loss = log_z - ((xc * target_w).sum(1) + target_const)
        if valid is not None:
            loss = torch.where(valid, loss, torch.zeros_like(loss))
        if want_grad:
            grad = S / total[:, None] - target_w
            if valid is not None:
                grad[~valid] = 0
            ctx.save_for_backward(grad)
        ctx.x_dtype = x.dtype
        return loss.to(x.dtype) if x.dtype in (torch.float32, torch.float64) else loss

    @staticmethod
    @torch.autograd.function.once_differentiable  # the saved gradient is a constant: no double backward
    def backward(ctx, grad_out):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        grad_x = (grad * grad_out.to(grad.dtype)[:, None]).to(ctx.x_dtype)
        return grad_x, None, None, None, None, None, None


def lens_loss(
    x: torch.Tensor,
    W: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    *,
    final: Union[FinalStats, torch.Tensor, None] = None,
    next_tokens: Optional[torch.Tensor] = None,
    loss: str = "kl",
    width: Optional[int] = None,
) -> torch.Tensor:
    """Per-row lens loss in nats, differentiable in ``x``, never holding ``[rows, d_vocab]`` logits.

    ``x [..., rows, d_model]``: normalised lens vectors (e.g. ``[layers, rows, d_model]``);
    ``W [d_model, d_vocab]`` (any dtype, read a tile of ``width`` columns at a time),
    ``b [d_vocab]`` or ``None``.
    ``loss="kl"``: ``KL(p_final || softmax(x @ W + b))`` with ``final`` the final layer's
    :func:`final_stats`, or its normalised final-stream vectors ``[rows, d_model]`` (then
    computed here). ``loss="ce"``: cross-entropy of ``next_tokens [rows]`` (``-1``: ignored,
    loss and gradient 0). Returns ``[..., rows]``; the gradient flows to ``x`` only.

    >>> torch.manual_seed(0) and None
    >>> W = torch.randn(4, 11); xf = torch.randn(3, 4); x = torch.randn(2, 3, 4, requires_grad=True)
    >>> kl = lens_loss(x, W, final=final_stats(xf, W), width=5)
    >>> ref = torch.nn.functional.kl_div((x @ W).log_softmax(-1), (xf @ W).log_softmax(-1), log_target=True,
    ...                                  reduction="none").sum(-1)
    >>> torch.allclose(kl, ref, atol=1e-5)
    True
    >>> kl.sum().backward(); x.grad.shape
    torch.Size([2, 3, 4])
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise LensInputError(
            f"x must be [..., rows, d_model] normalised lens vectors; got {getattr(x, 'shape', type(x))}."
        )
    if not x.is_floating_point():
        raise LensInputError(f"x must be a floating-point tensor; got {x.dtype}.")
    _check_unembedding(W, b, x.shape[-1], "x")
    if W.device != x.device:
        raise LensInputError(f"x is on {x.device} but W is on {W.device}; move them to one device.")
    rows, d_model, d_vocab = x.shape[-2], x.shape[-1], W.shape[1]
    dtype = compute_dtype(x.dtype)
    width = _width(width, W, dtype)
    lead = x.shape[:-2]
    entries = 1
    for n in lead:
        entries *= n
    valid = None
    if loss == "kl":
        if next_tokens is not None:
            raise LensInputError('next_tokens is for loss="ce"; loss="kl" reads the final distribution (pass final=).')
        if final is None:
            raise LensInputError(
                'loss="kl" needs final=: final_stats(x_final, W, b) or the final-stream vectors [rows, d_model].'
            )
        if isinstance(final, torch.Tensor):  # read in the lens vectors' precision
            final = final_stats(final.to(dtype) if final.is_floating_point() else final, W, b, width=width)
        if not isinstance(final, FinalStats) or tuple(final.p_w.shape) != (rows, d_model):
            got = tuple(final.p_w.shape) if isinstance(final, FinalStats) else type(final)
            raise LensInputError(f"final must describe the same {rows} rows of d_model {d_model} as x; got {got}.")
        target_w = final.p_w.to(dtype)
        target_const = (final.p_b - final.neg_entropy).to(dtype)
    elif loss == "ce":
        if final is not None:
            raise LensInputError('final= is for loss="kl"; loss="ce" reads next_tokens.')
        if (
            not isinstance(next_tokens, torch.Tensor)
            or next_tokens.dtype not in (torch.int64, torch.int32)
            or tuple(next_tokens.shape) != (rows,)
        ):
            raise LensInputError(
                f'loss="ce" needs next_tokens as an integer tensor [rows] = [{rows}] (-1: ignored); '
                f"got {getattr(next_tokens, 'shape', type(next_tokens))}."
            )
        t = next_tokens.to(device=x.device, dtype=torch.long)
        bad = (t < -1) | (t >= d_vocab)
        if bad.any():
            raise LensInputError(
                f"next_tokens must lie in [0, {d_vocab}) or be -1 (ignored); got {t[bad][:5].tolist()}."
            )
        valid = t >= 0
        safe = t.clamp(min=0)
        target_w = W[:, safe].t().to(dtype)  # [rows, d_model]: only the rows' own columns
        target_const = b[safe].to(dtype) if b is not None else torch.zeros(rows, dtype=dtype, device=x.device)
    else:
        raise LensInputError(f'loss must be "kl" or "ce"; got {loss!r}.')

    if entries * rows == 0:  # nothing to read: an empty loss, still connected to x
        return (x.sum(-1) * 0).to(dtype)
    flat = x.reshape(entries * rows, d_model)
    target_w = target_w.repeat(entries, 1)
    target_const = target_const.repeat(entries)
    if valid is not None:
        valid = valid.repeat(entries)
    out = _LensLoss.apply(flat, W.detach(), None if b is None else b.detach(), target_w, target_const, valid, width)
    return out.reshape(*lead, rows)
