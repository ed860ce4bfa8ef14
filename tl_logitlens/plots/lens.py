"""The logit-lens heatmap: every layer's top-1 token at every position, readable at any size.

The figure is as wide as its grid needs, up to a page (``width=``); cells then shrink, cell text
and tick labels are elided with ``…`` (the full text stays in ``fig.tll_data``), labels are
thinned when they cannot all fit, and the figure says what it left out. Several prompts are drawn
as small multiples sharing one colour scale.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib.colors as mcolors
import numpy as np
import torch

from ..errors import LensInputError
from ..tokentext import LITERAL_TEXT
from .layout import (
    _axes_inches,
    _batch_rows,
    _check_batch,
    _clamp,
    _decoder,
    _get_cmap,
    _lens_words,
    _new_figure,
    _np,
    _rank_from_next,
    _select_columns,
    _text_color,
    _with_pos,
    add_caption,
    elide,
    rank_ticks,
    text_width,
    thin_every,
    wrap_lines,
)
from .style import BASE_FONT, LENS_METRICS, MARK_COLOR, MAX_HEIGHT, MIN_FONT, NAN_COLOR, STACK_CAPTION, resolve_width

_CELL_PAD = 0.012  # inches of a cell left free around its text
_TEXT_CELL = 0.42  # inches: a comfortable cell for a short token at the base font
_ROW_H = 0.24  # inches per stack entry
_ROTATED = 0.75  # inches: the longest a rotated tick label may be
_LABEL_GAP = 0.06  # inches between neighbouring horizontal tick labels
_SIDE = 1.55  # inches beside the grid: y tick labels and title, the colour bar


def plot_lens(
    result: Any,
    *,
    ax: Any = None,
    metric: str = "prob",
    batch: Any = 0,
    positions: Any = None,
    annotate: bool = True,
    mark_next: bool = True,
    fontsize: Optional[float] = None,
    cmap: Optional[str] = None,
    width: Any = "page",
) -> Any:
    """The logit-lens heatmap: every layer's top-1 token at every position of one or more prompts.

    Rows are the stack entries (``result.labels``, ``0_pre`` at the bottom, ``final_post``
    at the top); columns are the positions read, labelled with the input tokens below (the
    position index without input tokens) and with the true next tokens above. Each cell
    shows that layer's top-1 token, and its colour is ``metric``:

    - ``"prob"``: the top-1 probability, ``top_probs[layer, batch, pos, 0]`` (0..1)
    - ``"logit"``: the top-1 logit, ``top_logits[..., 0]``
    - ``"rank"``: the 0-based rank of the true next token (0 = top-1), on a symmetric-log
      scale; needs a result from ``logit_lens(..., targets="next")``
    - ``"entropy"``, ``"kl"`` (``kl_to_final``), ``"loss"`` (``next_token_loss``), nats

    Cells whose top-1 token is the true next token (``result.next_ids``) are boxed and
    their text is bold. Grey cells have no value (no next token). Padding positions of the
    prompt (beyond ``result.lengths[batch]``) are left out.

    Size: a new figure is as wide as the grid needs, at most ``width`` (``"page"`` = 6.9 in,
    ``"column"`` = 3.3 in, or inches). Text that does not fit its cell is elided with ``…``;
    when cells are too narrow for even a short prefix the cell text is left out, and when
    tick labels cannot all fit every k-th is drawn: the title then says so (pass
    ``positions=slice(a, b)`` for a readable window). The full text is in ``fig.tll_data``.

    Args:
        result: a :class:`~tl_logitlens.LensResult`; ``[layer, batch, pos, ...]`` or, after
            an int ``positions`` in ``logit_lens``, ``[layer, batch, ...]`` (one column).
        metric: one of :data:`LENS_METRICS`.
        batch: which prompt to show; a list of prompt indices (or ``None`` for all) draws one
            panel per prompt (small multiples, new figure only) on one colour scale.
        positions: a window of columns: a slice or a list of column indices into the
            result's position axis (``slice(-20, None)``: the last 20).
        ax: a matplotlib ``Axes`` to draw into (one prompt); the colour bar is added next to it.
        annotate: write the top-1 token in each cell.
        mark_next: box the cells whose top-1 token is the true next token.
        fontsize: cell text size in points (default: fitted to the cell, at least 6).
        cmap: a colour map name to use instead of the metric's default.
        width: the widest a new figure may be: ``"page"``, ``"column"`` or inches.

    Returns:
        The ``Figure``. ``fig.axes[0]`` holds the heatmap (an ``AxesImage`` of shape
        ``[layer, shown positions]``; with several prompts, ``fig.axes[:n]`` one per prompt),
        the last axes the colour bar. ``fig.tll_data`` is a list with one dict per panel:
        ``prompt``, ``positions`` (absolute), ``values [layer, col]``, and the full, unelided
        ``cell_text [layer][col]``, ``input_tokens``, ``next_tokens``.

    Example::

        >>> import tl_logitlens as tll
        >>> from tl_logitlens.plots import plot_lens
        >>> model = tll.demo_model()
        >>> result = tll.logit_lens(model, tll.demo.induction_prompt(model), targets="next")
        >>> fig = plot_lens(result, metric="prob", positions=slice(-8, None))
        >>> fig.axes[0].images[0].get_array().shape
        (3, 8)
        >>> bool(fig.get_figwidth() <= 6.9)
        True
    """
    if metric not in LENS_METRICS:
        raise LensInputError(f"unknown metric {metric!r}; choose one of {list(LENS_METRICS)}")
    max_w = resolve_width(width)
    n_batch = int(result.lengths.shape[0])
    several = batch is None or isinstance(batch, (list, tuple, range))
    if several and ax is not None:
        raise LensInputError(
            "batch=<list> draws one panel per prompt in a new figure; leave ax=None, "
            "or pass one prompt index to draw into ax"
        )
    if several:
        prompts = _batch_rows(batch, n_batch)
        if not prompts:
            raise LensInputError("batch=[] selects no prompt; give at least one prompt index")
    else:
        _check_batch(batch, n_batch, "result")
        prompts = [int(batch) % n_batch]
    cols = _select_columns(positions, int(result.positions.shape[1]))
    panels = [_panel_data(result, metric, b, cols) for b in prompts]
    colormap, norm = _color_scale(metric, np.concatenate([p["values"].ravel() for p in panels]), cmap)

    owned = ax is None
    if owned:
        fig, axes = _panel_figure(panels, max_w)
    else:
        fig, axes = ax.figure, [ax]
    images = [
        ax_.imshow(
            np.ma.masked_invalid(p["values"]),
            origin="lower",
            aspect="auto",
            cmap=colormap,
            norm=norm,
            interpolation="nearest",
        )
        for ax_, p in zip(axes, panels)
    ]
    _color_bar(fig, images[0], axes, metric)
    for ax_ in axes:
        _set_row_labels(ax_, result.labels)
    if owned:
        fig.get_layout_engine().execute(fig)  # settle the grid's size before fitting text to it
    notes: List[str] = []
    for ax_, p in zip(axes, panels):
        notes += _annotate_panel(ax_, p, annotate, mark_next, fontsize, colormap, norm)
        notes += _column_labels(ax_, p, fontsize)
    _titles(fig, axes, panels, result, mark_next, sorted(set(notes)), n_batch, owned)
    add_caption(fig, [STACK_CAPTION], owned)
    fig.tll_data = list(getattr(fig, "tll_data", [])) + [
        {k: p[k] for k in ("prompt", "positions", "values", "cell_text", "input_tokens", "next_tokens")} for p in panels
    ]
    return fig


def _field(result: Any, metric: str) -> torch.Tensor:
    """The coloured statistic, ``[layer, batch, pos]`` (rank: 0-based)."""
    if metric == "rank":
        field = _rank_from_next(result).float()
    else:
        field = {
            "prob": lambda: result.top_probs[..., 0],
            "logit": lambda: result.top_logits[..., 0],
            "entropy": lambda: result.entropy,
            "kl": lambda: result.kl_to_final,
            "loss": lambda: result.next_token_loss,
        }[metric]()
    return _with_pos(field, result.has_pos_axis, 2)


def _panel_data(result: Any, metric: str, batch: int, cols: List[int]) -> Dict[str, Any]:
    """What one prompt's panel shows: values, hits and the full (unelided) texts."""
    length = int(result.lengths[batch])
    cols = [j for j in cols if int(result.positions[batch, j]) < length]
    if not cols:
        raise LensInputError(f"the positions selected are all padding for prompt {batch}, which has {length} tokens")
    has_pos = result.has_pos_axis
    index = torch.tensor(cols)
    values = _np(_field(result, metric)[:, batch, index])  # [layer, col]
    nxt = _with_pos(result.next_ids, has_pos, 1)[batch, index]  # [col]
    if metric == "rank":
        values[:, (nxt < 0).numpy()] = np.nan
    top1 = _with_pos(result.top_ids, has_pos, 2)[:, batch, index, 0]  # [layer, col]
    decode = _decoder(result.tokenizer)
    abs_pos = result.positions[batch, index]
    if result.input_ids is not None:
        x_labels, x_title = [decode(t) for t in result.input_ids[batch, abs_pos].tolist()], "input token"
    else:
        x_labels, x_title = [str(int(p)) for p in abs_pos], "position (no input tokens given)"
    return {
        "prompt": batch,
        "positions": [int(p) for p in abs_pos],
        "values": values,
        "hits": ((top1 == nxt.unsqueeze(0)) & (nxt >= 0).unsqueeze(0)).numpy(),
        "cell_text": [[decode(t) for t in row] for row in top1.tolist()],
        "input_tokens": x_labels,
        "x_title": x_title,
        "next_tokens": [decode(t) if t >= 0 else "" for t in nxt.tolist()],
    }


def _color_scale(metric: str, values: np.ndarray, cmap: Optional[str]) -> Tuple[Any, Any]:
    """The colour map (grey for missing values) and the normalisation shared by every panel."""
    colormap = _get_cmap(cmap or LENS_METRICS[metric][1]).with_extremes(bad=NAN_COLOR)
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size else 1.0
    if metric == "prob":
        norm = mcolors.Normalize(0.0, 1.0)
    elif metric == "rank":  # 0-based: linear below 1, logarithmic above, so rank 0 has a colour
        norm = mcolors.SymLogNorm(linthresh=1.0, linscale=0.5, vmin=0.0, vmax=max(top, 10.0), base=10)
    elif metric in ("entropy", "kl", "loss"):
        norm = mcolors.Normalize(0.0, max(top, 1e-6))
    else:
        norm = mcolors.Normalize(*(float(finite.min()), top) if finite.size else (0.0, 1.0))
    return colormap, norm


def _panel_figure(panels: List[Dict[str, Any]], max_w: float) -> Tuple[Any, List[Any]]:
    """A new figure sized to the grid (at most ``max_w`` wide, a page high), one axes per panel."""
    n_rows, n_cols = panels[0]["values"].shape[0], max(p["values"].shape[1] for p in panels)
    # Cells wide enough for the longest token up to 12 characters, while the page has room.
    chars = min(
        12, max(len(s) for p in panels for s in [*p["input_tokens"], *(c for row in p["cell_text"] for c in row)])
    )
    cell = _clamp(0.58 * BASE_FONT / 72 * chars + 2 * _CELL_PAD + 0.04, _TEXT_CELL, 1.0)
    grid_w = min(cell * n_cols, max_w - _SIDE)
    grid_w = max(grid_w, min(1.0, max_w / 2))
    longest = max(len(s) for p in panels for s in [*p["input_tokens"], *p["next_tokens"]])
    rotated = min(_ROTATED, 0.6 * BASE_FONT / 72 * longest)  # a rotated label is as tall as it is long
    label_h = rotated + 0.3 if grid_w / n_cols < 0.45 else 0.3
    panel_h = n_rows * _ROW_H + 2 * label_h + 0.35
    height = len(panels) * panel_h + 0.8
    if height > MAX_HEIGHT:  # shrink the rows first, down to one small line of text each
        row_h = max(0.13, _ROW_H - (height - MAX_HEIGHT) / (len(panels) * n_rows))
        height = len(panels) * (n_rows * row_h + 2 * label_h + 0.35) + 0.8
    fig = _new_figure((grid_w + _SIDE, max(2.0, height)))
    axes = [fig.add_subplot(len(panels), 1, i + 1) for i in range(len(panels))]
    return fig, axes


def _color_bar(fig: Any, image: Any, axes: List[Any], metric: str) -> None:
    bar = fig.colorbar(image, ax=axes if len(axes) > 1 else axes[0], pad=0.02, fraction=0.05, aspect=25)
    bar.set_label(LENS_METRICS[metric][0], fontsize=BASE_FONT - 1)
    bar.ax.tick_params(labelsize=BASE_FONT - 1)
    if metric == "rank":
        ticks = rank_ticks(image.norm.vmax)
        bar.set_ticks(ticks, labels=[str(t) for t in ticks])
        bar.ax.minorticks_off()


def _set_row_labels(ax: Any, labels: Sequence[str]) -> None:
    """Stack-entry labels on the y axis, thinned when rows are lower than a line of text."""
    ax.set_ylabel("stack entry", fontsize=BASE_FONT)
    row_h = _axes_inches(ax)[1] / max(len(labels), 1)
    font = _clamp(row_h * 72 / 1.25, MIN_FONT, BASE_FONT)
    step = thin_every(len(labels), row_h, font * 1.2 / 72)
    ticks = list(range(len(labels) - 1, -1, -step))[::-1]  # always label final_post (the top row)
    ax.set_yticks(ticks)
    ax.set_yticklabels([labels[i] for i in ticks], fontsize=font, **LITERAL_TEXT)
    ax.tick_params(length=0)


def _annotate_panel(
    ax: Any, p: Dict[str, Any], annotate: bool, mark_next: bool, fontsize: Optional[float], colormap: Any, norm: Any
) -> List[str]:
    """Top-1 text (elided to its cell) and next-token boxes; returns notes on what was left out."""
    from matplotlib.patches import Rectangle

    fig, values, hits = ax.figure, p["values"], p["hits"]
    n_rows, n_cols = values.shape
    width, height = _axes_inches(ax)
    cell_w, cell_h = width / n_cols, height / n_rows
    room = cell_w - 2 * _CELL_PAD
    font = fontsize or _cell_font(fig, p["cell_text"], room, cell_h)
    notes: List[str] = []
    shown = [[""] * n_cols for _ in range(n_rows)]
    if annotate:
        shown = [
            [
                elide(text, room, font, fig, "bold" if (mark_next and hits[i, j]) else "normal")
                for j, text in enumerate(row)
            ]
            for i, row in enumerate(p["cell_text"])
        ]
        full = [(s, t) for r_s, r_t in zip(shown, p["cell_text"]) for s, t in zip(r_s, r_t)]
        # Text only where it says something: hide it all when most cells could show no more than "x…".
        if sum(s == t or len(s) >= 3 for s, t in full) < len(full) / 2:
            annotate = False
            notes.append(f"cells too narrow for text ({n_cols} positions): pass positions=slice(a, b) for a window")
        elif any(s != t for s, t in full):
            notes.append("long tokens elided (\u2026)")
    for i in range(n_rows):
        for j in range(n_cols):
            hit = bool(mark_next and hits[i, j])
            if annotate:
                ax.text(
                    j,
                    i,
                    shown[i][j],
                    ha="center",
                    va="center",
                    fontsize=font,
                    fontweight="bold" if hit else "normal",
                    color=_text_color(colormap, norm, values[i, j]),
                    clip_on=True,
                    gid="tll-top1",
                    **LITERAL_TEXT,
                )
            if hit:
                ax.add_patch(
                    Rectangle(
                        (j - 0.46, i - 0.44),
                        0.92,
                        0.88,
                        fill=False,
                        edgecolor=MARK_COLOR,
                        linewidth=1.2 if n_cols < 40 else 0.6,
                        gid="tll-next-marker",
                    )
                )
    return notes


def _cell_font(fig: Any, cell_text: List[List[str]], room: float, cell_h: float) -> float:
    """The largest size (6..8 pt, within the row height) at which the median cell text fits its cell."""
    font = _clamp(cell_h * 72 / 1.45, MIN_FONT, BASE_FONT)
    texts = sorted((t for row in cell_text for t in row), key=len)
    typical = texts[len(texts) // 2] if texts else ""
    while font > MIN_FONT and text_width(typical, font, fig, "bold") > room:
        font = max(MIN_FONT, font - 0.5)
    return font


def _column_labels(ax: Any, p: Dict[str, Any], fontsize: Optional[float]) -> List[str]:
    """Input tokens below and next tokens above: horizontal and elided to the cell, else rotated,
    elided to an inch and thinned to one per line of text."""
    fig, n_cols = ax.figure, len(p["input_tokens"])
    cell_w = _axes_inches(ax)[0] / n_cols
    font = _clamp(fontsize or BASE_FONT - 0.5, MIN_FONT, BASE_FONT)
    show_next = any(p["next_tokens"])
    texts = p["input_tokens"] + (p["next_tokens"] if show_next else [])
    room = cell_w - _LABEL_GAP  # neighbouring flat labels keep a visible gap
    flat = max(text_width(t, font, fig) for t in texts) <= room or cell_w >= 0.45
    if flat:
        rotation, step = 0, 1
    else:
        font = _clamp(cell_w * 72 / 1.25, MIN_FONT, font)
        rotation, step, room = 90, thin_every(n_cols, cell_w, font * 1.5 / 72), _ROTATED
    ticks = list(range(0, n_cols, step))
    kwargs: Dict[str, Any] = dict(LITERAL_TEXT, fontsize=font, rotation=rotation)
    ax.set_xticks(ticks)
    ax.set_xticklabels([elide(p["input_tokens"][j], room, font, fig) for j in ticks], **kwargs)
    ax.set_xlabel(p["x_title"], fontsize=BASE_FONT)
    if show_next:
        top = ax.secondary_xaxis("top")
        top.set_xticks(ticks)
        top.set_xticklabels([elide(p["next_tokens"][j], room, font, fig) for j in ticks], **kwargs)
        top.set_xlabel("true next token", fontsize=BASE_FONT)
        top.tick_params(length=0)
    ax.tick_params(length=0)
    elided = any(elide(texts[j], room, font, fig) != texts[j] for j in range(len(texts)) if j % n_cols in ticks)
    notes = ["long tokens elided (\u2026)"] if elided else []
    if step > 1:
        notes.append(f"labels thinned: one per {step} positions")
    return notes


def _titles(
    fig: Any,
    axes: List[Any],
    panels: List[Dict[str, Any]],
    result: Any,
    mark_next: bool,
    notes: List[str],
    n_batch: int,
    owned: bool,
) -> None:
    """The figure's title (what is shown), per-panel prompt titles, and the notes on what was left out."""
    head = f"{_lens_words(result)}: top-1 token per layer (norm={result.norm!r})"
    lines = []
    if mark_next and any(p["hits"].any() for p in panels):
        lines.append("boxed, bold: top-1 is the true next token")
    lines += notes
    if len(panels) == 1:
        if n_batch > 1:
            head = head[:-1] + f", prompt {panels[0]['prompt']})"
        room = _axes_inches(axes[0])[0] + (0.8 if owned else 0.0)
        axes[0].set_title(wrap_lines([head] + lines, room, BASE_FONT + 1), fontsize=BASE_FONT + 1, **LITERAL_TEXT)
        return
    for ax, p in zip(axes, panels):
        ax.set_title(f"prompt {p['prompt']}", fontsize=BASE_FONT, loc="left")
    fig.suptitle(wrap_lines([head] + lines, fig.get_figwidth(), BASE_FONT + 1), fontsize=BASE_FONT + 1, **LITERAL_TEXT)
