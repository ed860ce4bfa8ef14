"""The package's own progress bar: tokens counted, tokens per second shown.

Work a user waits for (evaluating, training, fitting a lens over a corpus) shows it; ``progress=False``
gives a silent stand-in with the same methods, and so does a missing tqdm.

Example::

    >>> bar = progress_bar(100, progress=False, desc="demo")
    >>> bar.update(10); bar.close()
"""

from __future__ import annotations

from typing import Any, Optional


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: Optional[int], progress: bool, desc: str, initial: int = 0) -> Any:
    """A tqdm bar counting tokens (it shows tokens per second), or a silent stand-in."""
    if not progress:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm ships with transformers; without it, no bar
        return _NoBar()
    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc=desc)
