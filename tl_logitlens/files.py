"""Files written atomically and JSON read back with errors that name the file.

Everything the package writes (lenses, checkpoints, evaluations, pages, caches) goes through
:func:`atomic_write`: a temporary file in the same folder, then ``os.replace``, so a reader (or a
job killed mid-write) sees the old file or the new one, never half of one.

Example::

    >>> import os, tempfile
    >>> from tl_logitlens.files import read_json, write_json
    >>> path = os.path.join(tempfile.mkdtemp(), "x.json")
    >>> write_json(path, {"a": 1})
    >>> read_json(path, "a test file")
    {'a': 1}
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Type, TypeVar, Union

from .errors import LensInputError

__all__ = ["atomic_write", "write_text", "write_json", "read_json", "SavedAsJson"]


def atomic_write(path: Union[str, Path], write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then move it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: Union[str, Path], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: Union[str, Path], data: Any, indent: Any = None) -> None:
    """Write ``data`` as JSON to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=indent))


def read_json(path: Union[str, Path], what: str) -> Any:
    """The JSON value in ``path``; a binary or malformed file is refused naming the file and ``what`` it should be."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LensInputError(f"{path}: not {what} (a binary file, not JSON text)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise LensInputError(f"{path}: not {what} (not valid JSON: {err})") from None


_Saved = TypeVar("_Saved", bound="SavedAsJson")


class SavedAsJson:
    """For result classes with ``to_dict()`` and ``from_dict(data)``: ``save`` and ``load`` as JSON files."""

    def save(self, path: Union[str, Path]) -> None:
        """Write this result to ``path`` as JSON, atomically; :meth:`load` reads it back unchanged."""
        write_json(path, self.to_dict())  # type: ignore[attr-defined]

    @classmethod
    def load(cls: Type[_Saved], path: Union[str, Path]) -> _Saved:
        """Read a result written by :meth:`save`; anything else is refused naming the file and field."""
        data = read_json(path, f"a saved {cls.__name__}")
        try:
            return cls.from_dict(data)  # type: ignore[attr-defined]
        except LensInputError as err:
            raise LensInputError(f"{path}: {err}") from None
