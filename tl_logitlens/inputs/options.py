"""The cheap checks of the options every entry point shares, run before any forward pass.

Example::

    >>> check_modes("recompute", "W_U", 5, d_vocab=100)
    >>> check_modes("recompute", "W_U", 0, d_vocab=100)
    Traceback (most recent call last):
    ...
    tl_logitlens.errors.LensInputError: top_k must be an int in [1, 100], got 0
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, Optional, Tuple

from ..errors import LensInputError
from ..kernel import NORM_MODES
from ..model_access import UNEMBED_MODES


def check_norm(norm: Any) -> None:
    """Refuse a final-norm mode that is not one of :data:`~tl_logitlens.kernel.NORM_MODES`."""
    if norm not in NORM_MODES:
        raise LensInputError(f"norm must be one of {NORM_MODES}, got {norm!r}")


def check_modes(norm: str, unembed: str, top_k: int, d_vocab: int) -> None:
    """Validate the norm and unembedding modes and ``top_k``, shared by every reading entry point."""
    check_norm(norm)
    if unembed not in UNEMBED_MODES:
        raise LensInputError(f"unembed must be one of {UNEMBED_MODES}, got {unembed!r}")
    # Any integer type (NumPy's included) is an int here; bool is not a count.
    if isinstance(top_k, bool) or not isinstance(top_k, Integral) or not 1 <= int(top_k) <= d_vocab:
        raise LensInputError(f"top_k must be an int in [1, {d_vocab}], got {top_k!r}")


def check_stream_args(norm: str, batch_size: Any, max_tokens: Any) -> Tuple[int, Optional[int]]:
    """The cheap checks of a streaming run's options (before any forward pass); returns them as ints."""
    check_norm(norm)
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        raise LensInputError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, Integral) or max_tokens < 1
    ):
        raise LensInputError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
    return int(batch_size), None if max_tokens is None else int(max_tokens)
