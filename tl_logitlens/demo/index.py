"""The demo run's ``index.html``: one page that shows or links every figure, table and interactive page.

Figures (png, svg) are shown inline, other files (pdf, CSV, JSON, interactive pages) are
linked; links are relative, so the folder can be moved or zipped as a whole.

Example::

    >>> import tempfile
    >>> from pathlib import Path
    >>> from tl_logitlens.demo.index import write_index
    >>> out = Path(tempfile.mkdtemp())
    >>> page = write_index(out, ["lens_heatmap.png", "lens.csv", "lens.html"], title="demo")
    >>> 'src="lens_heatmap.png"' in page.read_text(), 'href="lens.html"' in page.read_text()
    (True, True)
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Dict, Sequence, Union

from ..files import HTML_MARK, write_owned_text

__all__ = ["index_html", "write_index"]

_SHOWN = (".png", ".svg")
_KINDS = {".html": "interactive pages (open in a browser; hover for values)", ".csv": "tables", ".json": "summary"}


def write_index(
    out: Union[str, Path],
    files: Sequence[Union[str, Path]],
    title: str = "tl_logitlens demo",
    notes: Sequence[str] = (),
    overwrite: bool = False,
) -> Path:
    """Write ``out/index.html`` listing ``files`` (paths inside ``out``); returns its path. An existing
    ``index.html`` is replaced only if this package wrote it (or with ``overwrite=True``)."""
    text = index_html(files, title, notes)
    path = Path(out) / "index.html"
    return write_owned_text(
        path,
        text,
        overwrite=overwrite,
        what="write_index",
        mark=HTML_MARK,
    )


def index_html(files: Sequence[Union[str, Path]], title: str = "tl_logitlens demo", notes: Sequence[str] = ()) -> str:
    """The text of the index page listing ``files``: figures shown, everything else linked."""
    names = [Path(f).name for f in files if Path(f).name != "index.html"]
    groups: Dict[str, list] = {}
    for name in names:
        suffix = Path(name).suffix.lower()
        kind = "figures" if suffix in _SHOWN or suffix == ".pdf" else _KINDS.get(suffix, "other files")
        groups.setdefault(kind, []).append(name)
    parts = [
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8">{HTML_MARK.decode()}<title>{html.escape(title)}</title>',
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{max-width:100%;"
        "border:1px solid #ddd}figure{margin:1.5em 0}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    parts += [f"<p>{html.escape(note)}</p>" for note in notes]
    order = [_KINDS[".html"], "figures", _KINDS[".csv"], _KINDS[".json"], "other files"]
    for kind in order:
        if kind not in groups:
            continue
        parts.append(f"<h2>{html.escape(kind)}</h2>")
        if kind == "figures":
            for name in groups[kind]:
                link = html.escape(name, quote=True)
                shown = f'<img src="{link}" alt="{link}">' if Path(name).suffix.lower() in _SHOWN else ""
                parts.append(
                    f'<figure>{shown}<figcaption><a href="{link}">{html.escape(name)}</a></figcaption></figure>'
                )
        else:
            items = "".join(
                f'<li><a href="{html.escape(n, quote=True)}">{html.escape(n)}</a></li>' for n in groups[kind]
            )
            parts.append(f"<ul>{items}</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
