"""Files written atomically, into places the package owns, and JSON read back with errors that name the file.

Everything the package writes (lenses, checkpoints, evaluations, pages, the command line's
outputs) goes through :func:`atomic_write`: a temporary file in the same folder, then
``os.replace``, so a reader (or a job killed mid-write) sees the old file or the new one,
never half of one.

**Writers own their files.** A writer replaces only files the package wrote:

- A folder writer (``TunedLens.save``, training checkpoints, the command line's ``--out``)
  claims its folder with :class:`OwnedFolder`: the folder may be new, empty, or hold only
  files the package wrote there, which it records in the folder's ``.tl_logitlens_files.json``
  (a page, JSON result or plotly.js carrying the package's mark counts as its own too).
  Any other file (a model's ``config.json``, your notes) makes it refuse, naming the files,
  before anything is written.
- A single-file writer (``LensEvaluation.save``, ``to_html``) replaces an existing file only
  if the package wrote it: the file carries the writer's mark (a JSON result's ``format``
  tag, a page's ``generator`` tag) or its folder records it.

``overwrite=True`` writes anyway: files of the same names are replaced, and no other file is
touched. Missing folders, folders where a file is expected (and the reverse) and folders that
cannot be written are refused with a :class:`~tl_logitlens.errors.LensInputError` before any
work.

Example::

    >>> import os, tempfile
    >>> from tl_logitlens.files import OwnedFolder, read_json
    >>> folder = OwnedFolder(os.path.join(tempfile.mkdtemp(), "out"), what="a test")
    >>> path = folder.write_json("x.json", {"a": 1})
    >>> read_json(path, "a test file")
    {'a': 1}
    >>> _ = open(os.path.join(folder.path, "notes.txt"), "w").write("mine")
    >>> OwnedFolder(folder.path, what="a test")
    Traceback (most recent call last):
    ...
    tl_logitlens.errors.LensInputError: a test: the folder ... holds a file tl_logitlens did not write (notes.txt); ...
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Set, Type, TypeVar, Union

from .errors import LensInputError

__all__ = [
    "MANIFEST",
    "JSON_MARK",
    "HTML_MARK",
    "JS_MARK",
    "OwnedFolder",
    "check_folder",
    "check_file",
    "write_owned_file",
    "atomic_write",
    "write_text",
    "write_json",
    "read_json",
    "SavedAsJson",
]

PathLike = Union[str, "os.PathLike[str]"]

#: The record, inside a folder, of the files the package wrote there.
MANIFEST = ".tl_logitlens_files.json"
_MANIFEST_FORMAT = "tl_logitlens.files/1"
#: The mark of a JSON result the package wrote (its first key is the ``format`` tag).
JSON_MARK = b'"format": "tl_logitlens.'
#: The mark of an HTML page the package wrote (in its ``<head>``).
HTML_MARK = b'<meta name="generator" content="tl_logitlens">'
#: The mark of the plotly.js the package writes beside its pages (its first line).
JS_MARK = b"/* tl_logitlens: plotly.js"
_MARKS = (JSON_MARK, HTML_MARK, JS_MARK)
_MARK_BYTES = 4096  # marks sit at the start of a file
_MEND = "pass overwrite=True"
# What file browsers leave in any folder: never a user's data.
_CLUTTER = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


def _as_path(path: Any, what: str, kind: str) -> Path:
    if not isinstance(path, (str, os.PathLike)) or (isinstance(path, str) and not path):
        raise LensInputError(f"{what}: the {kind} must be a path (a str or pathlib.Path), got {type(path).__name__}")
    return Path(path).expanduser()


def _nearest_existing(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path(".")


def _check_writable(folder: Path, what: str, shown: Path) -> None:
    """Refuse ``folder`` (which exists) when files cannot be created in it (permissions, a read-only disk)."""
    if not folder.is_dir():
        raise LensInputError(f"{what}: {str(shown)!r} cannot be created: {str(folder)!r} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LensInputError(
            f"{what}: cannot write in {str(folder)!r} (no permission, or a read-only file system); "
            "name a folder you can write to"
        )


def _recorded(folder: Path) -> Set[str]:
    """The names the package recorded writing in ``folder`` (none if it has no readable record)."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return set()
    if not isinstance(data, dict) or data.get("format") != _MANIFEST_FORMAT or not isinstance(data.get("files"), list):
        return set()
    return {name for name in data["files"] if isinstance(name, str)}


def _ours(name: str, recorded: Set[str]) -> bool:
    """Whether a folder entry is the package's: recorded, the record itself, or a temporary file of a recorded one."""
    if name in recorded or name == MANIFEST or name in _CLUTTER:
        return True
    # atomic_write's temporary files are ".<name>.<random>.tmp": one a killed job left behind is ours too.
    return name.startswith(".") and name.endswith(".tmp") and any(name.startswith(f".{r}.") for r in recorded)


def _listed(names: List[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_folder(path: Any, *, overwrite: bool = False, what: str = "writing", mend: str = _MEND) -> Path:
    """Check, without writing anything, that ``path`` can be the package's folder; returns it as a ``Path``.

    Refused: ``path`` is a file; it (or, when it is missing, its nearest existing parent) cannot
    be written; it holds a file the package did not write there (unless ``overwrite``). ``what``
    opens every message; ``mend`` says how to write anyway (the command line's ``--overwrite``).
    """
    path = _as_path(path, what, "folder")
    if path.exists() and not path.is_dir():
        raise LensInputError(f"{what}: {str(path)!r} is a file, not a folder; name a folder (it is created if missing)")
    _check_writable(_nearest_existing(path), what, path)
    if path.is_dir() and not overwrite:
        recorded = _recorded(path)
        foreign = sorted(
            entry.name for entry in path.iterdir() if not _ours(entry.name, recorded) and not _marked(entry, _MARKS)
        )
        if foreign:
            raise LensInputError(
                f"{what}: the folder {str(path)!r} holds {'a file' if len(foreign) == 1 else 'files'} tl_logitlens "
                f"did not write ({_listed(foreign)}); a writer replaces only its own files. Name a new or empty "
                f"folder, or {mend} to write beside them (files of the same names are replaced, no other file is "
                "touched)"
            )
    return path


class OwnedFolder:
    """A folder the package writes into, claimed once (see :func:`check_folder`); every file it
    writes is recorded in the folder's :data:`MANIFEST` before it is written, then written
    atomically. The folder (and its parents) are created at the first write, so a claim that
    is never used leaves nothing behind."""

    def __init__(self, path: Any, *, overwrite: bool = False, what: str = "writing", mend: str = _MEND) -> None:
        self.what = what
        self.path = check_folder(path, overwrite=overwrite, what=what, mend=mend)

    def write(self, name: str, write: Callable[[str], None]) -> Path:
        """Record ``name``, then call ``write(tmp)`` on a temporary path and move it to ``folder/name``."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LensInputError(f"{self.what}: cannot create the folder {str(self.path)!r} ({err.strerror})") from None
        recorded = _recorded(self.path)
        if name not in recorded:
            files = sorted(recorded | {name})
            write_text(self.path / MANIFEST, json.dumps({"format": _MANIFEST_FORMAT, "files": files}, indent=1))
        target = self.path / name
        atomic_write(target, write)
        return target

    def write_text(self, name: str, text: str) -> Path:
        """Write ``text`` (UTF-8) as ``folder/name``."""
        return self.write(name, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def write_json(self, name: str, data: Any, indent: Any = None) -> Path:
        """Write ``data`` as JSON as ``folder/name``."""
        return self.write_text(name, json.dumps(data, indent=indent))


def check_file(
    path: Any, *, overwrite: bool = False, what: str = "writing", mark: Optional[bytes] = None, mend: str = _MEND
) -> Path:
    """Check, without writing anything, that ``path`` can be (re)written; returns it as a ``Path``.

    Refused: its folder does not exist or cannot be written; ``path`` is a folder; it is an
    existing file the package did not write (neither carrying ``mark`` in its first bytes nor
    recorded by its folder), unless ``overwrite``.
    """
    path = _as_path(path, what, "path")
    if path.is_dir():
        raise LensInputError(f"{what}: {str(path)!r} is a folder; name the file to write, e.g. {str(path / 'x')!r}")
    folder = path.parent
    if not folder.is_dir():
        kind = "is a file, not a folder" if folder.exists() else "does not exist"
        raise LensInputError(f"{what}: cannot write {str(path)!r}: the folder {str(folder)!r} {kind}; create it first")
    _check_writable(folder, what, path)
    if path.exists() and not overwrite and not _is_ours(path, mark):
        raise LensInputError(
            f"{what}: {str(path)!r} exists and was not written by tl_logitlens; name another file, or {mend} to "
            "replace it"
        )
    return path


def _is_ours(path: Path, mark: Optional[bytes]) -> bool:
    return path.name in _recorded(path.parent) or (mark is not None and _marked(path, (mark,)))


def _marked(path: Path, marks: Sequence[bytes]) -> bool:
    """Whether the file ``path`` carries one of ``marks`` in its first bytes (a page or result the package wrote)."""
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as handle:
            start = handle.read(_MARK_BYTES)
    except OSError:
        return False
    return any(mark in start for mark in marks)


def write_owned_file(
    path: Any,
    write: Callable[[str], None],
    *,
    overwrite: bool = False,
    what: str = "writing",
    mark: Optional[bytes] = None,
) -> Path:
    """:func:`check_file`, then ``write(tmp)`` moved into place atomically; returns the path."""
    path = check_file(path, overwrite=overwrite, what=what, mark=mark)
    atomic_write(path, write)
    return path


def write_owned_text(
    path: Any, text: str, *, overwrite: bool = False, what: str = "writing", mark: Optional[bytes] = None
) -> Path:
    """:func:`write_owned_file` of ``text`` (UTF-8): a page, a JSON result, a script."""
    return write_owned_file(
        path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=overwrite, what=what, mark=mark
    )


def atomic_write(path: Union[str, Path], write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then move it into place.

    The file gets the permissions a plain ``open(path, "w")`` would: ``0o666`` less the
    process's umask (``0o644`` under the usual ``022``), so a lens or page shared with
    colleagues, or copied into a container running as another user, can be read.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file 0o600 whatever the umask; writers that replace the path (torch.save,
        # savefig) keep that mode, so it is set here, once the content is in place.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # the only portable way to read it: set it, then put it back at once
    os.umask(mask)
    return mask


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
    """For result classes with ``to_dict()`` (whose first key is a ``"format": "tl_logitlens...."`` tag)
    and ``from_dict(data)``: ``save`` and ``load`` as JSON files."""

    def save(self, path: Union[str, Path], *, overwrite: bool = False) -> None:
        """Write this result to ``path`` as JSON, atomically; :meth:`load` reads it back unchanged.

        An existing file is replaced only if tl_logitlens wrote it (or with ``overwrite=True``);
        the folder must exist.
        """
        text = json.dumps(self.to_dict())  # type: ignore[attr-defined]
        what = f"{type(self).__name__}.save"
        write_owned_text(
            path,
            text,
            overwrite=overwrite,
            what=what,
            mark=JSON_MARK,
        )

    @classmethod
    def load(cls: Type[_Saved], path: Union[str, Path]) -> _Saved:
        """Read a result written by :meth:`save`; anything else is refused naming the file and field."""
        data = read_json(path, f"a saved {cls.__name__}")
        try:
            return cls.from_dict(data)  # type: ignore[attr-defined]
        except LensInputError as err:
            raise LensInputError(f"{path}: {err}") from None
