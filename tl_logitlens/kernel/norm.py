"""The model's final norm, as plain parameters, in the three modes the package reads through.

``ln_final`` maps a residual vector ``x [..., d_model]`` to
``centre(x) / scale(x) * weight + bias`` (LayerNorm: ``centre`` subtracts the mean and
``scale`` is ``sqrt(var + eps)``; RMSNorm: no centring, ``scale = sqrt(mean(x**2) + eps)``,
no bias). Folded models carry no weight or bias (``LNPre``); models without a final norm
carry kind ``None``.

Three ways to apply it:

- ``"recompute"``: every vector normalised with its own statistics. This is the logit
  lens, and on the final residual stream it is exactly what the model computes.
- ``"cached"``: the scale is taken from another vector (the final residual stream at the
  same position, as in the forward pass). Centring and dividing by a fixed scale are
  linear, so the pieces of a decomposed stream still add up: this is the reading behind
  direct logit attribution.
- ``"none"``: the raw vector, the original formulation of the logit lens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

NORM_MODES = ("recompute", "cached", "none")


@dataclass(frozen=True)
class FinalNorm:
    """A final norm reduced to its parameters.

    Attributes:
        kind: ``"LN"`` (centre and scale), ``"RMS"`` (scale only) or ``None`` (no norm).
        weight: ``[d_model]`` elementwise gain, or ``None`` (unit, e.g. a folded model).
        bias: ``[d_model]`` additive bias, or ``None`` (zero).
        eps: the epsilon added to the variance.

    Example::

        >>> import torch
        >>> norm = FinalNorm("LN", weight=None, bias=None, eps=1e-5)
        >>> x = torch.randn(2, 8)
        >>> y = norm.apply(x, "recompute")
        >>> torch.allclose(y.mean(-1), torch.zeros(2), atol=1e-6)
        True
    """

    kind: Optional[str]
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    eps: float

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """The norm's divisor for each vector: ``[..., d_model] -> [..., 1]``."""
        if self.kind is None:
            return torch.ones_like(x[..., :1])
        if self.kind == "LN":
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def linear(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The bias-free part of the norm with a given scale: linear in ``x``."""
        if self.kind is None:
            return x
        if self.kind == "LN":
            x = x - x.mean(-1, keepdim=True)
        x = x / scale
        if self.weight is not None:
            x = x * self.weight.to(x.dtype)
        return x

    def apply(self, x: torch.Tensor, mode: str, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Normalise ``x [..., d_model]`` in ``mode``; ``"cached"`` needs ``scale [..., 1]``."""
        if mode == "none" or self.kind is None:
            return x
        if mode == "recompute":
            scale = self.scale(x)
        elif scale is None:
            raise ValueError("norm mode 'cached' needs the scale of the reference vector")
        y = self.linear(x, scale)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def readout_direction(self, u: torch.Tensor) -> torch.Tensor:
        """Pull an unembedding direction ``u [..., d_model]`` back through the linear part.

        For any vector ``p`` and scale ``s``: ``linear(p, s) @ u == p @ readout_direction(u) / s``.
        Direct logit attribution uses this to contract activations with one vector per
        prompt instead of materialising every piece of the residual stream.
        """
        if self.kind is None:
            return u
        if self.weight is not None:
            u = u * self.weight.to(u.dtype)
        if self.kind == "LN":
            u = u - u.mean(-1, keepdim=True)
        return u

    def bias_term(self, u: torch.Tensor) -> torch.Tensor:
        """What the norm's bias adds along ``u [..., d_model]``: ``[...]`` (zeros without a bias)."""
        if self.kind is None or self.bias is None:
            return torch.zeros(u.shape[:-1], dtype=u.dtype, device=u.device)
        return u @ self.bias.to(u.dtype)

    def to(self, dtype: torch.dtype, device: Optional[torch.device] = None) -> FinalNorm:
        """The same norm with parameters in ``dtype`` (and on ``device`` when given)."""
        cast = lambda t: None if t is None else t.detach().to(device=device or t.device, dtype=dtype)  # noqa: E731
        return FinalNorm(self.kind, cast(self.weight), cast(self.bias), self.eps)
