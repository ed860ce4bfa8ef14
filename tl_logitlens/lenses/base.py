"""The lens interface, and what every entry point does with a ``lens=`` argument.

A lens is a small interface, ``transform(h, label) -> h`` for vectors ``h [..., d_model]``
at a stack entry named by its TransformerLens label (``"0_pre"``, ``"3_mid"``,
``"final_post"``). :class:`LogitLens` is the identity (the plain logit lens). Any callable
``(h, label) -> h`` is accepted wherever ``lens=`` is; :func:`check_lens` refuses anything
else before any work, :func:`apply_lens` applies one and checks what it returns.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import LensInputError, NonFiniteActivationError


class Lens:
    """The lens interface: ``transform(h, label) -> h`` at one stack entry.

    ``h`` is ``[..., d_model]``; ``label`` is the entry's TransformerLens label such as
    ``"3_pre"``, ``"3_mid"`` or ``"final_post"``; the result has ``h``'s shape. ``name``
    labels results and figures. Subclass it, or pass any callable ``(h, label)``.

    Example::

        >>> import torch
        >>> class Doubling(Lens):
        ...     name = "double"
        ...     def transform(self, h, label):
        ...         return 2 * h
        >>> Doubling()(torch.ones(2), "0_pre").tolist()
        [2.0, 2.0]
    """

    name: str = "lens"
    #: True when ``transform`` returns ``final_post`` untouched: the final entry is then the
    #: model's own distribution, read once and shared as every lens's KL reference. It is
    #: trusted only on the class that defines ``transform`` (a subclass that overrides
    #: ``transform`` must declare it again).
    identity_at_final: bool = False

    def transform(self, h: torch.Tensor, label: str) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, h: torch.Tensor, label: str) -> torch.Tensor:
        return self.transform(h, label)


class LogitLens(Lens):
    """The identity: every entry read as it is (the logit lens of nostalgebraist, 2020).

    Passing it is exactly the same as passing no lens.

    Example::

        >>> import torch
        >>> h = torch.randn(3, 4)
        >>> bool(torch.equal(LogitLens().transform(h, "1_pre"), h))
        True
    """

    name = "logit"
    identity_at_final = True

    def transform(self, h: torch.Tensor, label: str) -> torch.Tensor:
        return h


def lens_name(lens: Any) -> str:
    """The name results record for ``lens``: ``"logit"`` for none, its ``name`` if it has one."""
    if lens is None:
        return "logit"
    name = getattr(lens, "name", None)
    if isinstance(name, str) and name:
        return name
    return "custom"


def check_lens(lens: Any) -> None:
    """Refuse a ``lens=`` that is neither ``None``, a :class:`Lens` nor a callable."""
    if lens is not None and not callable(lens):
        raise LensInputError(
            f"lens must be a callable (vectors, label) -> vectors, such as a tl_logitlens.Lens; got "
            f"{type(lens).__name__}"
        )


def is_identity(lens: Any) -> bool:
    """Whether ``lens`` reads the stream untouched (``None`` or a :class:`LogitLens`)."""
    return lens is None or type(lens) is LogitLens


def apply_lens(lens: Callable, vectors: torch.Tensor, label: str) -> torch.Tensor:
    """``lens(vectors, label)``, refused unless it is a finite tensor shaped like ``vectors``."""
    out = lens(vectors, label)
    if not isinstance(out, torch.Tensor) or out.shape != vectors.shape:
        raise LensInputError(
            f"lens must return a tensor shaped like its input {tuple(vectors.shape)}, "
            f"got {getattr(out, 'shape', type(out).__name__)} for stack entry {label!r}"
        )
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        raise NonFiniteActivationError(
            f"the lens returned {bad} NaN or inf values for stack entry {label!r} (its input was "
            f"{'finite' if bool(torch.isfinite(vectors).all()) else 'not finite either'}); a lens must "
            "map finite vectors to finite vectors. Check the lens's parameters."
        )
    return out


def reads_final_untouched(lens: Any) -> bool:
    """Whether ``lens`` reads ``final_post`` as the stream itself (``None``, or a lens whose class
    that defines ``transform`` declares ``identity_at_final``): its final entry is then the
    reference every KL is measured against. A subclass that overrides ``transform`` without
    declaring it again is read like any other callable."""
    if lens is None:
        return True
    owner = next((k for k in type(lens).__mro__ if "transform" in vars(k)), None)
    return owner is not None and bool(vars(owner).get("identity_at_final", False))
