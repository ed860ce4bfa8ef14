"""Exceptions raised by tl_logitlens.

Every error names what was wrong and how to mend it, and is raised before any
expensive work where the problem can be seen that early. The classes subclass
the built-in exception a caller would expect (``ValueError`` for bad input,
``NotImplementedError`` for an architecture the package cannot read exactly),
so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class LensInputError(ValueError):
    """An argument is malformed or out of range (tokens, positions, targets, layers)."""


class MissingHooksError(LensInputError):
    """A user-supplied ``ActivationCache`` lacks hooks that an analysis reads."""


class ModelStateError(ValueError):
    """The model is in a state the analysis cannot read exactly (training mode)."""


class NonFiniteActivationError(ValueError):
    """An activation the analysis reads holds NaN or inf."""


class UnsupportedModelError(NotImplementedError):
    """The architecture cannot be read exactly by this package (and it will not guess)."""


class RankFailedError(RuntimeError):
    """Another rank of a ``torch.distributed`` job failed; the message names the rank and its error."""
