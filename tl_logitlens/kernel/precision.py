"""The one rule for the precision the package computes in, and the check that inputs are finite.

Statistics are float32 whatever the model's dtype (bfloat16 and float16 are upcast), except
for a float64 model, which stays float64. Half precision is named here once (:func:`is_half`),
since a half-precision model rounds its stream after every addition and several checks widen
their tolerances for it.

Example::

    >>> import torch
    >>> compute_dtype(torch.bfloat16), compute_dtype(torch.float64)
    (torch.float32, torch.float64)
    >>> is_half(torch.float16), is_half(torch.float32)
    (True, False)
"""

from __future__ import annotations

import math

import torch

from ..errors import NonFiniteActivationError

#: The half-precision dtypes: a model stored in one rounds its stream after every addition.
HALF_DTYPES = (torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the package computes in for values stored in ``dtype``: float64 stays, the rest is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_half(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is bfloat16 or float16: a model that rounds its stream after every addition."""
    return dtype in HALF_DTYPES


def require_finite(x: torch.Tensor, name: str) -> None:
    """Raise :class:`~tl_logitlens.errors.NonFiniteActivationError` naming ``name`` if ``x`` holds NaN or inf."""
    # One summed read first (inf and NaN survive a sum): five elementwise passes only where it is not finite.
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    total = x.detach().sum(dtype=wide) if x.is_floating_point() else 0
    if not math.isfinite(float(total)) and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteActivationError(
            f"{name} holds {bad} NaN or inf values; the model's forward pass overflowed or the "
            "input was corrupted (try float32 weights, or check the prompt and the weights)."
        )
