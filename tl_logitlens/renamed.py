"""Keyword arguments renamed for one vocabulary across the package, with the old spellings still accepted.

The package says ``prompt`` for one row of a batch wherever a caller picks one (figures, pages),
``top_k`` for "how many of the largest", ``targets`` for tokens a lens follows and ``answers`` /
``wrong`` for the logit (difference) an attribution splits. Names that were public under another
spelling keep working: :func:`renamed_keywords` maps the old keyword to the new one with a
``DeprecationWarning`` naming the new spelling, and refuses a call that gives both.

Example::

    >>> import warnings
    >>> @renamed_keywords(batch="prompt")
    ... def draw(*, prompt=0):
    ...     return prompt
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     value = draw(batch=2)
    >>> value, str(caught[0].message).split(";")[0]
    (2, 'draw(batch=...) is now spelt draw(prompt=...)')
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, TypeVar

from .errors import LensInputError

__all__ = ["renamed_keywords"]

_F = TypeVar("_F", bound=Callable[..., Any])


def renamed_keywords(**renames: str) -> Callable[[_F], _F]:
    """A decorator: each ``old=new`` pair lets callers pass ``old=`` for ``new=`` (with a DeprecationWarning)."""

    def wrap(func: _F) -> _F:
        name = func.__qualname__

        @functools.wraps(func)
        def call(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise LensInputError(
                        f"{name}() got both {old}= and {new}=; {old}= is the old spelling of {new}=: pass only {new}="
                    )
                warnings.warn(
                    f"{name}({old}=...) is now spelt {name}({new}=...); the old keyword still works but will be "
                    "removed",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap
