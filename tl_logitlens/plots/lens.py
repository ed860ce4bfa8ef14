"""The logit-lens heatmap: every layer's top-1 token at every position, readable at any length.

A new figure is laid out by one rule (see :func:`plot_lens`): cells wide enough for their text,
the figure as wide as its cells need up to ``width=``, and a prompt longer than one strip split
into windows of consecutive positions, stacked top to bottom, while the figure stays within
:data:`MAX_TALL`. Past that the cells narrow, their text is elided with ``…`` or left out (the
full text stays in ``fig.tll_data``), and the title says so, naming ``positions=`` and ``width=``.
Several prompts are drawn as small multiples sharing one colour scale.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib.colors as mcolors
import numpy as np
import torch

from ..errors import LensInputError
from ..renamed import renamed_keywords
from ..tokentext import LITERAL_TEXT
from .layout import (
    _axes_inches,
    _batch_rows,
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
_CELL_CHARS = (4, 7)  # a cell is wide enough for its longest text, counted in characters within these bounds
_CELL_GAP = 0.05  # inches between the text of neighbouring cells (and neighbouring flat labels)
_ROW_H = 0.24  # inches per stack entry
_MIN_ROW_H = 0.13  # inches: one small line of text
_ROTATED = 0.75  # inches: the longest a rotated tick label may be
_LABEL_GAP = 0.06  # inches between neighbouring horizontal tick labels
_SIDE = 1.55  # inches beside the grid: y tick labels and title, the colour bar
_HEAD = 0.8  # inches above and below the panels: the title and the caption
#: Inches: the tallest a heatmap split into windows grows (two page heights); past it the cells narrow.
MAX_TALL = 2 * MAX_HEIGHT
_WAY_OUT = "for readable cells pass positions=slice(a, b) (fewer positions) or a larger width= (inches)"


@renamed_keywords(batch="prompt")
def plot_lens(
    result: Any,
    *,
    ax: Any = None,
    metric: str = "prob",
    prompt: Any = None,
    positions: Any = None,
    annotate: bool = True,
    mark_next: bool = True,
    fontsize: Optional[float] = None,
    cmap: Optional[str] = None,
    width: Any = "page",
    windows: Optional[int] = None,
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
    their text is bold. Grey cells have no value (no next token). Padding positions of a
    prompt (beyond its ``result.lengths``) are left out. A result read at one position per
    prompt (an int ``positions`` in ``logit_lens``) draws its prompts side by side, one
    column each.

    Size, by one rule. Each cell is wide enough for its text: the longest top-1 token or
    label, counted up to 7 characters and never fewer than 4 (longer tokens are elided with
    ``…``). A new figure is as wide as its cells need, at most ``width`` (``"page"`` = 6.9 in,
    ``"column"`` = 3.3 in, or inches). When the positions do not fit one strip, they are split
    into windows of consecutive positions, as many as needed, stacked top to bottom at the full
    ``width``, each titled with its positions, while the figure stays within :data:`MAX_TALL`
    (18 in, two page heights). Past that (or with ``windows=`` fixed), the cells narrow: text
    that does not fit is elided, when most cells could show no more than a letter it is left
    out, and tick labels that cannot all fit are thinned; the title then says so and names the
    way out: ``positions=slice(a, b)`` for fewer positions, a larger ``width=`` for wider cells.
    The full text is in ``fig.tll_data``.

    Args:
        result: a :class:`~tl_logitlens.LensResult`; ``[layer, batch, pos, ...]`` or, after
            an int ``positions`` in ``logit_lens``, ``[layer, batch, ...]`` (one column per prompt).
        metric: one of :data:`LENS_METRICS`.
        prompt: which prompts: ``None`` (every prompt; drawing into ``ax``: prompt 0), an index,
            or a list of indices. Several prompts are drawn as small multiples (one panel
            each, new figure only) on one colour scale; a result read at one position per prompt
            puts them side by side in one panel. (``batch=`` is the old spelling.)
        positions: a window of columns: a slice or a list of column indices into the
            result's position axis (``slice(-20, None)``: the last 20).
        ax: a matplotlib ``Axes`` to draw into (one prompt, one strip); the colour bar is added next to it.
        annotate: write the top-1 token in each cell.
        mark_next: box the cells whose top-1 token is the true next token.
        fontsize: cell text size in points (default: fitted to the cell, at least 6).
        cmap: a colour map name to use instead of the metric's default.
        width: the widest a new figure may be: ``"page"``, ``"column"`` or inches.
        windows: how many windows each prompt's positions are split into; ``None``: by the
            rule above (``windows=1`` keeps one strip).

    Returns:
        The ``Figure``. ``fig.axes[0]`` holds the heatmap of the first window (an ``AxesImage``
        of shape ``[layer, positions in the window]``), one axes per window and prompt, top to
        bottom; the last axes is the colour bar. ``fig.tll_data`` is a list with one dict per
        prompt (one for prompts side by side): ``prompt``, ``positions`` (absolute),
        ``values [layer, col]``, the full, unelided ``cell_text [layer][col]``,
        ``input_tokens``, ``next_tokens``, and ``windows``: ``(first, end)`` column ranges.

    Example::

        >>> import tl_logitlens as tll
        >>> from tl_logitlens.plots import plot_lens
        >>> model = tll.demo_model()
        >>> result = tll.logit_lens(model, tll.demo.induction_prompt(model), targets="next")
        >>> fig = plot_lens(result, metric="prob", positions=slice(-8, None))
        >>> fig.axes[0].images[0].get_array().shape
        (3, 8)
        >>> fig = plot_lens(result)                       # 25 positions: windows of 9, 9 and 7
        >>> fig.tll_data[0]["windows"], bool(fig.get_figwidth() <= 6.9)
        ([(0, 9), (9, 18), (18, 25)], True)
    """
    if metric not in LENS_METRICS:
        raise LensInputError(f"unknown metric {metric!r}; choose one of {list(LENS_METRICS)}")
    max_w = resolve_width(width)
    if windows is not None and (isinstance(windows, bool) or not isinstance(windows, (int, np.integer)) or windows < 1):
        raise LensInputError(f"windows must be None (by the size rule) or a positive int, got {windows!r}")
    if windows is not None and windows > 1 and ax is not None:
        raise LensInputError("windows= splits the positions over several axes of a new figure; leave ax=None")
    panels = _panels(result, metric, prompt, positions, ax)
    colormap, norm = _color_scale(metric, np.concatenate([p["values"].ravel() for p in panels]), cmap)
    owned = ax is None
    notes: List[str] = []
    if owned:
        fig, plan, notes = _window_figure(panels, len(result.labels), max_w, windows, prompt is None)
    else:
        fig, plan = ax.figure, [(ax, panels[0], (0, len(panels[0]["positions"])))]
    images = [
        ax_.imshow(
            np.ma.masked_invalid(p["values"][:, a:z]),
            origin="lower",
            aspect="auto",
            cmap=colormap,
            norm=norm,
            interpolation="nearest",
        )
        for ax_, p, (a, z) in plan
    ]
    axes = [ax_ for ax_, _, _ in plan]
    _color_bar(fig, images[0], axes, metric)
    for ax_ in axes:
        _set_row_labels(ax_, result.labels)
    if owned:
        fig.get_layout_engine().execute(fig)  # settle the grid's size before fitting text to it
    slots = max(z - a for _, _, (a, z) in plan)  # every window's cells as wide as the first's
    for ax_, p, (a, z) in plan:
        if len(plan) > 1:
            ax_.set_xlim(-0.5, slots - 0.5)
        window = {**_window(p, a, z), "slots": slots if len(plan) > 1 else z - a}
        notes += _annotate_panel(ax_, window, annotate, mark_next, fontsize, colormap, norm)
        notes += _column_labels(ax_, window, fontsize, axis_titles=(a == 0, z == len(p["positions"])))
    drawn = list(dict.fromkeys(id(p) for _, p, _ in plan))
    panels = [p for p in panels if id(p) in drawn]
    notes = list(dict.fromkeys(notes))
    if any(n.startswith(("cells too narrow", "labels thinned")) for n in notes):
        notes.append(_WAY_OUT)
    _titles(fig, plan, result, mark_next, notes, owned)
    add_caption(fig, [STACK_CAPTION], owned)
    keys = ("prompt", "positions", "values", "cell_text", "input_tokens", "next_tokens")
    fig.tll_data = list(getattr(fig, "tll_data", [])) + [
        {**{k: p[k] for k in keys}, "windows": [w for _, q, w in plan if q is p]} for p in panels
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


def _panels(result: Any, metric: str, prompt: Any, positions: Any, ax: Any) -> List[Dict[str, Any]]:
    """One panel per prompt drawn, or one panel of the prompts side by side (a result read at one position)."""
    n_batch = int(result.lengths.shape[0])
    cols = _select_columns(positions, int(result.positions.shape[1]))
    if not result.has_pos_axis:
        prompts = _batch_rows(prompt, n_batch)
        if not prompts:
            raise LensInputError("prompt=[] selects no prompt; give at least one prompt index")
        return [_panel_data(result, metric, prompts, [(b, 0) for b in prompts])]
    if ax is not None:
        if prompt is None:
            prompt = 0  # one axes holds one prompt; the title says which of how many
        elif isinstance(prompt, (list, tuple, range)):
            raise LensInputError(
                "prompt=<list> draws one panel per prompt in a new figure; leave ax=None, "
                "or pass one prompt index to draw into ax"
            )
    prompts = _batch_rows(prompt, n_batch)
    if not prompts:
        raise LensInputError("prompt=[] selects no prompt; give at least one prompt index")
    return [_panel_data(result, metric, b, [(b, j) for j in cols]) for b in prompts]


def _panel_data(result: Any, metric: str, prompt: Any, cells: List[Tuple[int, int]]) -> Dict[str, Any]:
    """What one panel shows at its ``(prompt, column)`` cells: values, hits and the full (unelided) texts."""
    cells = [(b, j) for b, j in cells if int(result.positions[b, j]) < int(result.lengths[b])]
    if not cells:
        length = int(result.lengths[prompt])
        raise LensInputError(f"the positions selected are all padding for prompt {prompt}, which has {length} tokens")
    has_pos = result.has_pos_axis
    b_idx, j_idx = torch.tensor([b for b, _ in cells]), torch.tensor([j for _, j in cells])
    values = _np(_field(result, metric)[:, b_idx, j_idx])  # [layer, col]
    nxt = _with_pos(result.next_ids, has_pos, 1)[b_idx, j_idx]  # [col]
    if metric == "rank":
        values[:, (nxt < 0).numpy()] = np.nan
    top1 = _with_pos(result.top_ids, has_pos, 2)[:, b_idx, j_idx, 0]  # [layer, col]
    decode = _decoder(result.tokenizer)
    abs_pos = result.positions[b_idx, j_idx]
    if result.input_ids is not None:
        x_labels, x_title = [decode(t) for t in result.input_ids[b_idx, abs_pos].tolist()], "input token"
    else:
        x_labels, x_title = [str(int(p)) for p in abs_pos], "position (no input tokens given)"
    if isinstance(prompt, list):
        x_title += f" read in prompts {_span(prompt)}"
    return {
        "prompt": prompt,
        "positions": [int(p) for p in abs_pos],
        "values": values,
        "hits": ((top1 == nxt.unsqueeze(0)) & (nxt >= 0).unsqueeze(0)).numpy(),
        "cell_text": [[decode(t) for t in row] for row in top1.tolist()],
        "input_tokens": x_labels,
        "x_title": x_title,
        "next_tokens": [decode(t) if t >= 0 else "" for t in nxt.tolist()],
    }


def _span(prompts: List[int]) -> str:
    """``0–31`` for consecutive prompts, else the first few listed (``0, 2, 5, …``)."""
    if len(prompts) > 2 and prompts == list(range(prompts[0], prompts[-1] + 1)):
        return f"{prompts[0]}\u2013{prompts[-1]}"
    return ", ".join(map(str, prompts[:6])) + (", \u2026" if len(prompts) > 6 else "")


def _window(p: Dict[str, Any], a: int, z: int) -> Dict[str, Any]:
    """Columns ``a:z`` of a panel (every per-column field sliced); ``slots``: the columns its axes has room for."""
    return {
        **p,
        "slots": z - a,
        "positions": p["positions"][a:z],
        "values": p["values"][:, a:z],
        "hits": p["hits"][:, a:z],
        "cell_text": [row[a:z] for row in p["cell_text"]],
        "input_tokens": p["input_tokens"][a:z],
        "next_tokens": p["next_tokens"][a:z],
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


def _cell_width(fig: Any, panels: List[Dict[str, Any]]) -> float:
    """Inches a cell needs for its text: the widest top-1 token or label, counted up to 7 characters, at least 4."""
    lo, hi = _CELL_CHARS
    texts = {
        t[:hi]
        for p in panels
        for t in [*p["input_tokens"], *p["next_tokens"], *(c for row in p["cell_text"] for c in row)]
        if t
    }
    widest = max([text_width(t, BASE_FONT, fig, "bold") for t in texts] + [text_width("n" * lo, BASE_FONT, fig)])
    return widest + 2 * _CELL_PAD + _CELL_GAP


def _window_figure(
    panels: List[Dict[str, Any]], n_rows: int, max_w: float, windows: Optional[int], every_prompt: bool
) -> Tuple[Any, List[Tuple[Any, Dict[str, Any], Tuple[int, int]]], List[str]]:
    """A new figure laid out by the size rule (see :func:`plot_lens`): ``(figure, [(axes, panel, (a, z))],
    notes)``, one axes per window of each panel, top to bottom."""
    fig = _new_figure((max_w, 2.0))  # measured in first, sized below
    cell = _cell_width(fig, panels)
    n_cols = max(len(p["positions"]) for p in panels)
    notes: List[str] = []
    shortest = n_rows * _MIN_ROW_H + 2 * 0.3 + 0.35  # the lowest rows, flat labels, the panel's title
    if every_prompt and len(panels) * shortest + _HEAD > MAX_TALL:  # prompt=None on many prompts: what fits
        keep = max(1, int((MAX_TALL - _HEAD) // shortest))
        notes.append(f"prompts {keep}..{len(panels) - 1} not drawn (too tall): pass prompt=[...] to choose")
        panels = panels[:keep]
    longest = max(len(s) for p in panels for s in [*p["input_tokens"], *p["next_tokens"]])
    rotated = min(_ROTATED, 0.6 * BASE_FONT / 72 * longest)  # a rotated label is as tall as it is long
    flat = _flat_room(fig)

    def shape(n_win: int, row_h: float) -> Tuple[int, int, float, float]:
        """``(positions per window, windows, grid width, figure height)`` for ``n_win`` windows per panel."""
        per = math.ceil(n_cols / min(n_win, n_cols))
        n_win = math.ceil(n_cols / per)  # balanced: every window holds per or fewer, none is empty
        grid_w = max_w - _SIDE if n_win > 1 else max(min(cell * n_cols, max_w - _SIDE), min(1.0, max_w / 2))
        label_h = 0.3 if grid_w / per >= flat else rotated + 0.3  # narrow cells: rotated labels
        return per, n_win, grid_w, len(panels) * n_win * (n_rows * row_h + 2 * label_h + 0.35) + _HEAD

    if windows is None:  # as many as the cells' text needs, fewer when the figure would pass MAX_TALL
        need = math.ceil(n_cols / max(1, int((max_w - _SIDE) // cell)))
        windows = next((w for w in range(need, 1, -1) if shape(w, _ROW_H)[3] <= MAX_TALL), 1)
    per, n_win, grid_w, height = shape(windows, _ROW_H)
    if height > MAX_TALL:  # shrink the rows, down to one small line of text each
        over = (height - MAX_TALL) / (len(panels) * n_win * n_rows)
        per, n_win, grid_w, height = shape(windows, max(_MIN_ROW_H, _ROW_H - over))
    fig.set_size_inches(grid_w + _SIDE, max(2.0, height))
    plan = []
    for p in panels:
        n = len(p["positions"])
        for a in range(0, n, per):
            plan.append((fig.add_subplot(len(panels) * n_win, 1, len(plan) + 1), p, (a, min(a + per, n))))
    return fig, plan, notes


def _flat_room(fig: Any) -> float:
    """The narrowest cell whose labels are drawn flat: room for three characters and ``…``, and a gap."""
    return text_width("nnn\u2026", BASE_FONT - 0.5, fig) + _LABEL_GAP


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
    cell_w, cell_h = width / p["slots"], height / n_rows
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
            notes.append("cells too narrow for text")
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


def _column_labels(
    ax: Any, p: Dict[str, Any], fontsize: Optional[float], axis_titles: Tuple[bool, bool] = (True, True)
) -> List[str]:
    """Input tokens below and next tokens above: horizontal and elided to the cell, else rotated,
    elided to an inch and thinned to one per line of text. ``axis_titles``: whether to name the
    top and the bottom labels (a prompt's windows name them once: above the first, below the last)."""
    fig, n_cols = ax.figure, len(p["input_tokens"])
    cell_w = _axes_inches(ax)[0] / p["slots"]
    font = _clamp(fontsize or BASE_FONT - 0.5, MIN_FONT, BASE_FONT)
    show_next = any(p["next_tokens"])
    texts = p["input_tokens"] + (p["next_tokens"] if show_next else [])
    room = cell_w - _LABEL_GAP  # neighbouring flat labels keep a visible gap
    flat = max(text_width(t, font, fig) for t in texts) <= room or cell_w >= _flat_room(fig)
    if flat:
        rotation, step = 0, 1
    else:
        font = _clamp(cell_w * 72 / 1.25, MIN_FONT, font)
        rotation, step, room = 90, thin_every(n_cols, cell_w, font * 1.5 / 72), _ROTATED
    ticks = list(range(0, n_cols, step))
    kwargs: Dict[str, Any] = dict(LITERAL_TEXT, fontsize=font, rotation=rotation)
    ax.set_xticks(ticks)
    ax.set_xticklabels([elide(p["input_tokens"][j], room, font, fig) for j in ticks], **kwargs)
    if axis_titles[1]:
        ax.set_xlabel(p["x_title"], fontsize=BASE_FONT)
    if show_next:
        top = ax.secondary_xaxis("top")
        top.set_xticks(ticks)
        top.set_xticklabels([elide(p["next_tokens"][j], room, font, fig) for j in ticks], **kwargs)
        if axis_titles[0]:
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
    plan: List[Tuple[Any, Dict[str, Any], Tuple[int, int]]],
    result: Any,
    mark_next: bool,
    notes: List[str],
    owned: bool,
) -> None:
    """The figure's title (what is shown), per-window titles (prompt, positions), and the notes on what was left out."""
    n_batch = int(result.lengths.shape[0])
    head = f"{_lens_words(result)}: top-1 token per layer (norm={result.norm!r})"
    lines = []
    if mark_next and any(p["hits"].any() for _, p, _ in plan):
        lines.append("boxed, bold: top-1 is the true next token")
    lines += notes
    first = plan[0][1]
    if len(plan) == 1:
        if n_batch > 1 and not isinstance(first["prompt"], list):
            head = head[:-1] + f", prompt {first['prompt']} of {n_batch}: prompt= picks another)"
        room = _axes_inches(plan[0][0])[0] + (0.8 if owned else 0.0)
        plan[0][0].set_title(wrap_lines([head] + lines, room, BASE_FONT + 1), fontsize=BASE_FONT + 1, **LITERAL_TEXT)
        return
    several = len({id(p) for _, p, _ in plan}) > 1
    for ax, p, (a, z) in plan:
        where = []
        if several:
            where.append(f"prompt {p['prompt']}")
        if (a, z) != (0, len(p["positions"])):
            span = p["prompt"] if isinstance(p["prompt"], list) else p["positions"]
            what = "prompts" if isinstance(p["prompt"], list) else "positions"
            where.append(f"{what} {span[a]}\u2013{span[z - 1]}" if z - a > 1 else f"{what[:-1]} {span[a]}")
        ax.set_title(", ".join(where), fontsize=BASE_FONT, loc="left")
    fig.suptitle(wrap_lines([head] + lines, fig.get_figwidth(), BASE_FONT + 1), fontsize=BASE_FONT + 1, **LITERAL_TEXT)
