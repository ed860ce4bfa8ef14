"""Layout and text helpers shared by every figure: sizes, fonts, elision, tick labels, decoding.

Nothing here draws a figure of its own; the drawers in :mod:`.lens`, :mod:`.lines` and
:mod:`.attribution` call these so that every figure sizes, elides and labels text the same way.
Text is measured with the figure's own renderer, so "fits" means fits as drawn.

Example::

    >>> import matplotlib.pyplot as plt
    >>> from tl_logitlens.plots.layout import elide, text_width
    >>> fig = plt.figure()
    >>> label = elide("High Pressure Die Casting", 0.5, 8.0, fig)
    >>> label.endswith("\u2026") and text_width(label, 8.0, fig) <= 0.5
    True
    >>> plt.close(fig)
"""

from __future__ import annotations

import math
import textwrap
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import LensInputError
from ..tokentext import LITERAL_TEXT, display_token, token_text
from .style import ELLIPSIS, MAX_HEIGHT, MIN_FONT, resolve_width


# -- small helpers ---------------------------------------------------------------------------
def _new_axes(ax: Any, figsize: Tuple[float, float], width: Any = "page") -> Tuple[Any, Any]:
    """``(figure, axes)``: the given axes and its figure, or a new constrained-layout figure.

    A new figure is ``figsize`` clamped to ``width`` (a preset or inches) and the page height.
    """
    if ax is not None:
        return ax.figure, ax
    fig = _new_figure((min(figsize[0], resolve_width(width)), min(figsize[1], MAX_HEIGHT)))
    return fig, fig.add_subplot()


def _new_figure(figsize: Tuple[float, float]) -> Any:
    """A constrained-layout ``pyplot`` figure (so notebooks display it and ``plt.show()`` works)."""
    import matplotlib.pyplot as plt

    return plt.figure(figsize=figsize, layout="constrained")


def _axes_inches(ax: Any) -> Tuple[float, float]:
    """The current size of an axes in inches."""
    box = ax.get_window_extent()
    dpi = ax.figure.dpi
    return box.width / dpi, box.height / dpi


def _clamp(x: float, lo: float, hi: float) -> float:
    return max(lo, min(hi, x))


def _text_color(cmap: Any, norm: Any, value: float) -> str:
    """Black or white, whichever reads better on the cell colour of ``value``."""
    if not np.isfinite(value):
        return "black"
    r, g, b, _ = cmap(norm(value))
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"


def _literal(texts: Any) -> None:
    for text in texts:
        text.set_parse_math(False)
        text.set_usetex(False)


def _set_ticklabels(axis: Any, labels: Sequence[str], rotation: float = 0, fontsize: Optional[float] = None) -> None:
    """Fixed ticks at ``0..n-1`` with literal labels."""
    axis.set_ticks(range(len(labels)))
    kwargs: Dict[str, Any] = dict(LITERAL_TEXT)
    if fontsize is not None:
        kwargs["fontsize"] = fontsize
    if rotation:
        kwargs.update(
            rotation=rotation,
            ha="right" if rotation < 90 else "center",
            rotation_mode="anchor" if rotation < 90 else "default",
        )
    axis.set_ticklabels(list(labels), **kwargs)


def _decoder(tokenizer: Any) -> Any:
    """A caching ``id -> display text`` function (``#id`` without a tokenizer)."""
    cache: Dict[int, str] = {}

    def decode(token_id: int) -> str:
        token_id = int(token_id)
        if token_id not in cache:
            cache[token_id] = display_token(token_text(tokenizer, token_id))  # the vocabulary's spelling, ▁ kept
        return cache[token_id]

    return decode


def _answer_words(att: Any, prompt: Optional[int] = None) -> str:
    """``logit(␣Paris) − logit(␣Rome)``: the tokens all prompts share (or those of ``prompt``), else generic."""
    decode = _decoder(att.tokenizer)

    def one(ids: Optional[torch.Tensor], generic: str) -> str:
        if ids is None:
            return ""
        ids = ids.reshape(-1) if prompt is None else ids.reshape(-1)[prompt : prompt + 1]
        return decode(int(ids[0])) if bool((ids == ids[0]).all()) else generic

    text = f"logit({one(att.answer_ids, 'answer')})"
    if att.wrong_ids is not None:
        text += f" \u2212 logit({one(att.wrong_ids, 'wrong')})"
    return text


def _shared_answers(att: Any) -> bool:
    """Whether every prompt attributes the same answer (and wrong) token."""
    return all(
        ids is None or bool((ids.reshape(-1) == ids.reshape(-1)[0]).all()) for ids in (att.answer_ids, att.wrong_ids)
    )


def _np(t: Any) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=float)


def _with_pos(t: Optional[torch.Tensor], has_pos: bool, dim: int) -> Optional[torch.Tensor]:
    """Insert a length-1 position axis at ``dim`` for results read at one int position."""
    if t is None or has_pos:
        return t
    return t.unsqueeze(dim)


def _check_batch(prompt: Any, n_batch: int, what: str) -> None:
    """Refuse anything but an int index of one of the ``n_batch`` prompts (negative from the end)."""
    if isinstance(prompt, bool) or not isinstance(prompt, (int, np.integer)):
        raise LensInputError(f"prompt must be an int prompt index (or a list of them), got {prompt!r}")
    if not -n_batch <= int(prompt) < n_batch:
        raise LensInputError(
            f"prompt={prompt} is out of range: the {what} holds {n_batch} prompt(s) (0..{n_batch - 1})"
        )


def _batch_rows(prompt: Any, n_batch: int) -> List[int]:
    """Prompts to draw: every one for ``None``, else an index or a list of them (negative allowed)."""
    if prompt is None:
        return list(range(n_batch))
    if isinstance(prompt, (str, bytes)) or not isinstance(prompt, (int, np.integer, list, tuple, range)):
        raise LensInputError(f"prompt must be None, an int prompt index or a list of them, got {prompt!r}")
    rows = [prompt] if isinstance(prompt, (int, np.integer)) else list(prompt)
    for b in rows:
        _check_batch(b, n_batch, "result")
    return [int(b) % n_batch for b in rows]


def _select_columns(positions: Any, n_cols: int) -> List[int]:
    """``positions`` of :func:`plot_lens` (None, int, slice or list of column indices) as a list."""
    if positions is None:
        return list(range(n_cols))
    if isinstance(positions, slice):
        cols = list(range(n_cols))[positions]
    else:
        if isinstance(positions, torch.Tensor):
            positions = positions.reshape(-1).tolist()
        if isinstance(positions, (int, np.integer)) and not isinstance(positions, bool):
            positions = [int(positions)]
        if not isinstance(positions, (list, tuple, range)) or not all(
            isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in positions
        ):
            raise LensInputError(f"positions must be None, a slice or a list of column indices, got {positions!r}")
        bad = [p for p in positions if not -n_cols <= p < n_cols]
        if bad:
            raise LensInputError(
                f"positions {bad} are out of range: the result has {n_cols} position column(s) "
                f"(0..{n_cols - 1}); positions= indexes the result's columns, not the input"
            )
        cols = [int(p) % n_cols for p in positions]
    if not cols:
        raise LensInputError(f"positions={positions!r} selects no column of the {n_cols} in the result")
    return cols


# -- the logit lens heatmap ------------------------------------------------------------------
def _targets_are_next(result: Any) -> bool:
    """Whether the lens ran with ``targets="next"`` (one target, the true next token)."""
    if result.target_ids is None:
        return False
    has_pos = result.has_pos_axis
    ids = _with_pos(result.target_ids, has_pos, 2)  # [layer, batch, pos, t]
    nxt = _with_pos(result.next_ids, has_pos, 1)  # [batch, pos]
    return ids.shape[-1] == 1 and bool((ids[..., 0] == nxt.unsqueeze(0)).all())  # -1 where no next token


def _rank_from_next(result: Any) -> torch.Tensor:
    """``target_ranks[..., 0]`` when the lens ran with ``targets="next"``, else LensInputError."""
    mend = 'run tll.logit_lens(model, input, targets="next") to get the rank of the true next token'
    if result.target_ranks is None:
        raise LensInputError(f"metric='rank' needs target ranks, but this result has no targets; {mend}")
    if not _targets_are_next(result):
        raise LensInputError(
            f"metric='rank' shows the rank of the true next token, but this result's targets are "
            f"other tokens; {mend} (use plot_trajectory(result, metric='rank') for chosen targets)"
        )
    return result.target_ranks[..., 0]


def rank_ticks(top: float) -> List[int]:
    """Ticks of a 0-based rank scale up to ``top``: 0, 1, 10, 100, ..."""
    return [0] + [10**e for e in range(int(np.floor(np.log10(max(top, 10.0)))) + 1)]


def rank_axis(axis: Any, top: float) -> None:
    """A 0-based rank y axis: symmetric-log (linear below 1, so rank 0 shows), ticks 0, 1, 10, ..."""
    from matplotlib.ticker import NullLocator

    axis.axes.set_yscale("symlog", linthresh=1.0, linscale=0.5)
    ticks = rank_ticks(top)
    axis.set_ticks(ticks, labels=[str(t) for t in ticks])
    axis.set_minor_locator(NullLocator())


def plain_log_ticks(axis: Any) -> None:
    """Log-axis tick labels as plain numbers (1, 10, 100, 20, 50) instead of mathtext powers."""
    from matplotlib.ticker import LogFormatter

    axis.set_major_formatter(LogFormatter())
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _get_cmap(name: Any) -> Any:
    import matplotlib

    return matplotlib.colormaps[name] if isinstance(name, str) else name


def _lens_words(result: Any) -> str:
    """``"Logit lens"``, or the lens's name (``"Tuned lens"``) for a result read with another lens."""
    name = getattr(result, "lens_name", "logit") or "logit"
    return f"{name[:1].upper()}{name[1:]} lens"


# -- text that fits ---------------------------------------------------------------------------
def _renderer(fig: Any) -> Any:
    """The figure's renderer (Agg for a new figure), to measure text as it will be drawn."""
    return fig.canvas.get_renderer()


def text_width(text: str, fontsize: float, fig: Any, weight: str = "normal") -> float:
    """The drawn width of ``text`` at ``fontsize`` points in ``fig``, in inches."""
    from matplotlib.font_manager import FontProperties

    if not text:
        return 0.0
    prop = FontProperties(size=fontsize, weight=weight)
    w, _, _ = _renderer(fig).get_text_width_height_descent(text, prop, ismath=False)
    return w / fig.dpi


def elide(text: str, width: float, fontsize: float, fig: Any, weight: str = "normal") -> str:
    """``text`` cut to its longest prefix that, with ``…``, fits ``width`` inches ("" if not even one).

    The full text is kept by the caller (in ``fig.tll_data``); only the drawn label is shortened.
    """
    if text_width(text, fontsize, fig, weight) <= width:
        return text
    lo, hi = 0, len(text)  # the longest prefix that fits: binary search
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text_width(text[:mid].rstrip() + ELLIPSIS, fontsize, fig, weight) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + ELLIPSIS if lo > 0 else ""


def thin_every(n_labels: int, slot: float, needed: float) -> int:
    """Label every ``k``-th of ``n_labels`` ticks ``slot`` inches apart so each has ``needed`` inches."""
    return max(1, int(np.ceil(needed / max(slot, 1e-9)))) if n_labels > 1 else 1


def wrap_lines(lines: Sequence[str], width: float, fontsize: float) -> str:
    """``lines`` joined by newlines, each wrapped to about ``width`` inches at ``fontsize`` points."""
    chars = max(20, int(width * 72 / (0.52 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in lines if line)


def add_caption(fig: Any, lines: Sequence[str], owned: bool) -> None:
    """Explanations under a figure we made (``fig.supxlabel``, wrapped to the figure width).

    Figures drawn into a caller's ``ax`` get no caption: the caller owns the layout. The
    lines are also kept in ``fig.tll_captions`` for tests and callers.
    """
    lines = [line for line in lines if line]
    fig.tll_captions = list(getattr(fig, "tll_captions", [])) + lines
    if not owned or not lines:
        return
    fig.supxlabel(
        wrap_lines(lines, fig.get_figwidth() - 0.1, MIN_FONT + 0.5),
        fontsize=MIN_FONT + 0.5,
        color="0.3",
        ha="center",
        **LITERAL_TEXT,
    )


def save_figure(fig: Any, path: Any, *, dpi: float = 300, format: Optional[str] = None) -> None:
    """Write ``fig`` at print resolution: ``dpi`` 300 by default, ``format`` from the path's suffix.

    Sizes are set when drawing (``width="column"`` / ``"page"`` / inches on every drawer), so the
    file has the figure's own size in inches; the bounding box is tight, with no text cut off.

    Example::

        >>> import os, tempfile
        >>> import tl_logitlens as tll
        >>> from tl_logitlens.plots import plot_lens, save_figure
        >>> model = tll.demo_model()
        >>> fig = plot_lens(tll.logit_lens(model, tll.demo.induction_prompt(model)), width="column")
        >>> path = os.path.join(tempfile.mkdtemp(), "lens.png")
        >>> save_figure(fig, path, dpi=200)
        >>> os.path.getsize(path) > 0
        True
    """
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not math.isfinite(dpi) or dpi <= 0:
        raise LensInputError(f"dpi must be a positive finite number, got {dpi!r}")
    fig.savefig(path, dpi=dpi, format=format, bbox_inches="tight", pad_inches=0.03)
