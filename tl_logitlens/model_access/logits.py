"""What a model does to its logits after the unembedding, read as a :class:`LogitTransform`.

Families differ here. Granite divides its logits by ``logits_scaling``, Cohere multiplies them by
``logit_scale`` (both linear), Gemma 2 caps them softly, ``cap * tanh(logit / cap)`` (not linear).
TransformerLens describes each with a config field (``output_logits_soft_cap``) or with the
architecture adapter's ``apply_output_logits_transform``. This module reads the adapter's transform
on a probe and recognises it as ``cap * tanh(scale * logit / cap)`` (``cap`` absent: ``scale *
logit``): the linear scale is then folded exactly into every reading, and only the cap stays a
transform. A transform of any other shape is kept as an opaque function: the lens applies it to
whole rows of logits, and direct logit attribution refuses it, naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

# The probe: logits from -80 to 80 in float64; a transform is recognised when it matches the
# candidate to this relative precision everywhere on it.
_PROBE_RTOL = 1e-9


@dataclass(frozen=True)
class LogitTransform:
    """``logits -> cap * tanh(scale * logits / cap)``, or ``scale * logits`` without a cap.

    Attributes:
        scale: a linear factor (Granite: ``1 / logits_scaling``; Cohere: ``logit_scale``), 1.0 for most.
        soft_cap: the soft cap's ``cap``, or ``None``.
        opaque: an adapter transform of another shape, applied as given (``scale`` and
            ``soft_cap`` are then unused); ``None`` for a recognised one.
        source: where it was read (the config field or the adapter's method), for messages.

    Example::

        >>> import torch
        >>> t = LogitTransform(scale=0.5, soft_cap=2.0)
        >>> t.describe()
        'logit -> 2 * tanh(0.5 * logit / 2) (a soft cap)'
        >>> bool(torch.allclose(t(torch.tensor([0.0, 40.0])), torch.tensor([0.0, 2.0])))
        True
    """

    scale: float = 1.0
    soft_cap: Optional[float] = None
    opaque: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    source: str = ""

    @property
    def is_identity(self) -> bool:
        """No transform at all."""
        return self.opaque is None and self.soft_cap is None and self.scale == 1.0

    @property
    def is_linear(self) -> bool:
        """A plain scale (or nothing): a logit is still a sum of per-piece terms."""
        return self.opaque is None and self.soft_cap is None

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        """The soft cap alone, on logits that already carry the scale (identity without a cap)."""
        if self.soft_cap is None:
            return logits
        return self.soft_cap * torch.tanh(logits / self.soft_cap)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.opaque is not None:
            return self.opaque(logits)
        return self.cap(logits * self.scale if self.scale != 1.0 else logits)

    def kernel_transform(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """The callable the kernel applies to each tile of logits (``None`` for the identity).

        A recognised transform acts on each logit alone (``elementwise = True``: the kernel may
        apply it to a few vocabulary columns at a time); an opaque one is given whole rows.
        """
        if self.is_identity:
            return None
        if self.opaque is not None:
            return self.opaque

        def transform(logits: torch.Tensor) -> torch.Tensor:
            return self(logits)

        transform.elementwise = True
        return transform

    def describe(self) -> str:
        """The transform in words and symbols, for results and messages."""
        if self.opaque is not None:
            return f"{self.source or 'an adapter transform'} (neither a linear scale nor a soft cap)"
        scaled = "logit" if self.scale == 1.0 else f"{self.scale:g} * logit"
        if self.soft_cap is None:
            return f"logit -> {scaled} (a linear scale)" if self.scale != 1.0 else "none"
        cap = f"{self.soft_cap:g}"
        return f"logit -> {cap} * tanh({scaled} / {cap}) (a soft cap)"


def _config_cap(model: Any) -> Optional[float]:
    cap = float(getattr(model.cfg, "output_logits_soft_cap", 0.0) or 0.0)
    return cap if cap > 0 else None


def _adapter_transform(model: Any) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The adapter's ``apply_output_logits_transform`` when its class overrides the base one."""
    adapter = getattr(model, "adapter", None)
    transform = getattr(type(adapter), "apply_output_logits_transform", None) if adapter else None
    if transform is None:
        return None
    base = None
    for klass in type(adapter).__mro__[1:]:
        base = klass.__dict__.get("apply_output_logits_transform", base)
    if transform is base or base is None:
        return None
    return adapter.apply_output_logits_transform


def read_logit_transform(model: Any) -> LogitTransform:
    """The model's :class:`LogitTransform`: the config's soft cap, and the adapter's transform recognised on a probe.

    Example::

        >>> from tl_logitlens.demo import demo_model
        >>> read_logit_transform(demo_model()).is_identity
        True
    """
    cap = _config_cap(model)
    fn = _adapter_transform(model)
    if fn is None:
        return LogitTransform(soft_cap=cap, source="cfg.output_logits_soft_cap" if cap else "")
    source = f"{type(model.adapter).__name__}.apply_output_logits_transform"
    probe = torch.linspace(-80.0, 80.0, 321, dtype=torch.float64)
    tiny = torch.tensor([1e-6], dtype=torch.float64)
    with torch.no_grad():
        out = fn(probe.clone()).to(torch.float64)
        scale = float(fn(tiny.clone()).to(torch.float64)[0] / tiny[0])  # tanh is linear at 0: the slope is the scale
    for soft_cap in ((cap,) if cap else ()) + (None,):
        candidate = LogitTransform(scale=scale, soft_cap=soft_cap, source=source)
        if torch.allclose(out, candidate(probe), rtol=_PROBE_RTOL, atol=_PROBE_RTOL):
            return candidate
    return LogitTransform(opaque=fn, source=source)
