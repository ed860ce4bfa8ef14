"""Direct logit attribution figures: who writes the answer, and where.

Signed values use the diverging ``RdBu`` map with limits symmetric about zero (blue: towards the
answer, red: against). Titles name the model value and the constant term, which a caption under
the figure explains; the accumulated stream is labelled as what it is (the stream's reading of the
answer after each layer), not as a direct effect.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import matplotlib.colors as mcolors
import numpy as np
import torch

from ..errors import LensInputError
from ..renamed import renamed_keywords
from ..tokentext import LITERAL_TEXT, display_token
from .layout import (
    _answer_words,
    _axes_inches,
    _check_batch,
    _clamp,
    _new_axes,
    _np,
    _set_ticklabels,
    _text_color,
    add_caption,
    elide,
    thin_every,
)
from .style import (
    ACCUMULATED_LABEL,
    ATTRIBUTION_KINDS,
    BASE_FONT,
    CHAR_WIDTH,
    CONSTANT_CAPTION,
    MIN_FONT,
    NEG_COLOR,
    NEURON,
    POS_COLOR,
    SIGNED_CMAP,
    STACK_CAPTION,
)

_DEFAULT_KIND = {"component": "bar", "accumulated": "line", "head": "heatmap", "neuron": "barh"}
_MAX_WIDTH, _MAX_HEIGHT = 16.0, 14.0  # natural sizes; a new figure is then clamped to width= and a page


def _pick_position(att: Any, position: int) -> Tuple[torch.Tensor, str]:
    """``values [component, batch]`` (one column of 3-D values) and words for the title."""
    if att.values.ndim == 2:
        return att.values, ""
    n_pos = att.values.shape[2]
    if not -n_pos <= position < n_pos:
        raise LensInputError(f"position={position} is out of range: the attribution has {n_pos} position column(s)")
    col = position % n_pos
    absolute = sorted({int(p) for p in att.positions[:, col]})
    where = f"position {absolute[0]}" if len(absolute) == 1 else f"column {col}"
    return att.values[:, :, col], f" at {where} (of {n_pos}; plot_attribution_positions shows all)"


def _model_value_words(att: Any, position: int) -> str:
    mv, const = att.model_value, att.constant
    if mv.ndim == 2:
        col = position % mv.shape[1]
        mv, const = mv[:, col], const[:, col]
    n = mv.shape[0]
    text = f"model value {float(mv.mean()):.3g}"
    if n > 1:
        text += f" (mean of {n} prompts)"
    return text + f", constant {float(const.mean()):.3g}"


def plot_attribution(
    att: Any,
    *,
    ax: Any = None,
    top_k: int = 20,
    kind: Optional[str] = None,
    position: int = -1,
    annotate: Optional[bool] = None,
    width: Any = "page",
) -> Any:
    """Direct logit attribution as a figure: who writes the answer, and how much.

    The values are averaged over the prompts (``att.values.mean(1)`` = ``att.mean()``),
    with error bars of one standard deviation across prompts (the spread of the effect
    between prompts; none for one prompt). ``kind`` defaults from ``att.by``:

    - ``"component"`` -> ``"bar"``: one bar per component (embed, pos_embed, each
      attention and MLP layer, bias terms), blue positive and red negative.
    - ``"accumulated"`` -> ``"line"``: the accumulated stream's reading of the answer after
      each layer (the logit lens on the logit difference; not a direct effect).
    - ``"head"`` -> ``"heatmap"``: ``att.by_head()`` averaged over prompts, ``[layer,
      head]`` (layer 0 at the bottom, as in the lens heatmap and the interactive page), diverging
      ``RdBu`` map with limits symmetric about zero and a colour bar. The non-head terms
      (embeddings, MLPs, biases) are not shown;
      ``kind="bar"`` shows every term.
    - ``"neuron"`` -> ``"barh"``: the ``top_k`` neurons with the largest ``|mean|``,
      strongest at the top, labelled ``L1N37``.

    The title names the answer (and wrong) token when all prompts share it, and the
    model's own value (mean over prompts) and the constant term (``b_U`` and the norm bias,
    which no component writes); a caption under a new figure says so in words. An attribution taken at several positions
    (``values [component, batch, pos]``) is shown at one position column, ``position``
    (default the last), which the title states; :func:`plot_attribution_positions` shows
    every position.

    Args:
        att: an :class:`~tl_logitlens.Attribution`, ``values [component, batch]`` or
            ``[component, batch, pos]``.
        ax: a matplotlib ``Axes`` to draw into.
        top_k: bars shown by ``"barh"``.
        kind: ``"bar"``, ``"line"``, ``"heatmap"`` (needs ``by="head"``) or ``"barh"``.
        position: the position column used for 3-D values.
        annotate: write the value in each heatmap cell (default: when there are at most
            256 cells).
        width: the widest a new figure may be: ``"page"``, ``"column"`` or inches.

    Returns:
        The ``Figure``.

    Example::

        >>> import tl_logitlens as tll
        >>> from tl_logitlens.plots import plot_attribution
        >>> model = tll.demo_model()
        >>> tokens = tll.demo.induction_prompt(model)
        >>> att = tll.direct_logit_attribution(model, tokens, answers=int(tokens[0, -11]), by="head")
        >>> fig = plot_attribution(att)
        >>> fig.axes[0].images[0].get_array().shape == tuple(att.by_head().shape[:2])
        True
    """
    kind = kind or _DEFAULT_KIND.get(att.by, "bar")
    _check_kind(att, kind, top_k)
    values, where = _pick_position(att, int(position))  # [component, batch]
    n_prompts = values.shape[1]
    mean = _np(values.mean(1))
    std = _np(values.std(1)) if n_prompts > 1 else None
    target = _answer_words(att)
    what = "Accumulated stream's reading of" if att.by == "accumulated" else "Direct logit attribution to"
    title = f"{what} {target}{where}\n{_model_value_words(att, int(position))}"
    value_label = f"{ACCUMULATED_LABEL} {target}" if att.by == "accumulated" else f"direct effect on {target}"
    owned = ax is None
    if kind == "heatmap":
        fig = _head_heatmap(att, ax, int(position), title, annotate, width)
    elif kind == "barh":
        fig = _top_bars(att, ax, mean, std, int(top_k), value_label, title, width)
    else:
        fig = _bars(att, ax, kind, mean, std, value_label, title, width)
    captions = [CONSTANT_CAPTION]
    if att.by == "accumulated":  # entries are readings of the whole stream, not pieces that add up
        captions = [
            CONSTANT_CAPTION.split(";")[0] + "; the last entry plus the constant is the model value",
            STACK_CAPTION,
        ]
    add_caption(fig, captions, owned)
    return fig


def _check_kind(att: Any, kind: str, top_k: Any) -> None:
    if kind not in ATTRIBUTION_KINDS:
        raise LensInputError(f"unknown kind {kind!r}; choose one of {list(ATTRIBUTION_KINDS)}")
    if kind == "heatmap" and att.by != "head":
        raise LensInputError(
            f"kind='heatmap' draws a layer x head grid and needs an attribution made with by='head'; "
            f"this one is by={att.by!r}: use kind='bar' or 'barh'"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise LensInputError(f"top_k must be a positive int, got {top_k!r}")


def _spread(std: Any) -> str:
    return "" if std is None else "\nerror bars: \u00b11 std across prompts"


def _head_heatmap(att: Any, ax: Any, position: int, title: str, annotate: Optional[bool], width: Any) -> Any:
    """``att.by_head()`` averaged over prompts, ``[layer, head]``, layer 0 at the bottom (layers go up, as in
    the lens heatmap and every interactive page)."""
    grid = att.by_head()  # [layer, head, batch(, pos)]
    if grid.ndim == 4:
        grid = grid[..., position % grid.shape[3]]
    n_prompts = grid.shape[2]
    data = _np(grid.mean(2))  # [layer, head]
    n_layers, n_heads = data.shape
    size = (_clamp(2.8 + 0.5 * n_heads, 4.5, _MAX_WIDTH), _clamp(2.1 + 0.36 * n_layers, 3.0, _MAX_HEIGHT))
    fig, ax = _new_axes(ax, size, width)
    limit = float(np.abs(data).max()) or 1.0
    image = ax.imshow(
        data,
        cmap=SIGNED_CMAP,
        norm=mcolors.Normalize(-limit, limit),
        aspect="auto",
        interpolation="nearest",
        origin="lower",
    )
    bar = fig.colorbar(image, ax=ax, pad=0.02)
    bar.set_label("direct effect (on the title's logit)", fontsize=BASE_FONT - 1)  # the target is in the title
    if annotate is None:
        annotate = data.size <= 256
    if annotate:
        fmt = ".2f" if limit >= 0.05 else ".2g"
        font = _clamp(BASE_FONT - 0.15 * max(n_heads - 8, 0), MIN_FONT, BASE_FONT)
        for i in range(n_layers):
            for j in range(n_heads):
                ax.text(
                    j,
                    i,
                    format(data[i, j], fmt),
                    ha="center",
                    va="center",
                    fontsize=font,
                    color=_text_color(image.cmap, image.norm, data[i, j]),
                    gid="tll-value",
                )
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers))
    ax.set_xlabel("Head")
    ax.set_ylabel("Layer")
    ax.tick_params(length=0)
    ax.set_title(f"{title}\nheads only" + (f", mean over {n_prompts} prompts" if n_prompts > 1 else ""), **LITERAL_TEXT)
    return fig


def _top_bars(att: Any, ax: Any, m: np.ndarray, s: Any, top_k: int, value_label: str, title: str, width: Any) -> Any:
    """The ``top_k`` terms (neurons for ``by="neuron"``) by ``|mean|``, strongest at the top."""
    labels = list(att.labels)
    order = (
        [i for i in range(len(labels)) if NEURON.match(labels[i])] if att.by == "neuron" else list(range(len(labels)))
    )
    if not order:
        raise LensInputError(f"this attribution (by={att.by!r}) has no neuron terms to rank")
    order = sorted(order, key=lambda i: -abs(m[i]))[:top_k]
    pool = "neurons" if att.by == "neuron" else "terms"
    total = sum(1 for lab in labels if NEURON.match(lab)) if att.by == "neuron" else len(labels)
    fig, ax = _new_axes(ax, (6.4, _clamp(1.8 + 0.22 * len(order), 3.0, _MAX_HEIGHT)), width)
    order = order[::-1]  # bottom to top: the strongest at the top
    y = np.arange(len(order))
    ax.barh(
        y,
        m[order],
        xerr=None if s is None else s[order],
        color=[POS_COLOR if m[i] >= 0 else NEG_COLOR for i in order],
        error_kw=dict(ecolor="0.3", capsize=2, elinewidth=0.8),
        gid="tll-bars",
    )
    ax.set_yticks(y)
    ax.set_yticklabels([labels[i] for i in order], **LITERAL_TEXT)
    ax.axvline(0, color="0.3", linewidth=0.8)
    ax.set_xlabel(value_label, **LITERAL_TEXT)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(
        f"{title}\ntop {len(order)} of {total} {pool} by |mean|{_spread(s)}".replace("\nerror", "; error"),
        **LITERAL_TEXT,
    )
    return fig


def _bars(att: Any, ax: Any, kind: str, m: np.ndarray, s: Any, value_label: str, title: str, width: Any) -> Any:
    """One bar (or point, ``kind="line"``) per term, in the attribution's own order."""
    labels = list(att.labels)
    fig, ax = _new_axes(ax, (_clamp(1.6 + 0.32 * len(labels), 6.4, _MAX_WIDTH), 4.0), width)
    x = np.arange(len(labels))
    if kind == "bar":
        ax.bar(
            x,
            m,
            yerr=s,
            color=[POS_COLOR if v >= 0 else NEG_COLOR for v in m],
            error_kw=dict(ecolor="0.3", capsize=2, elinewidth=0.8),
            gid="tll-bars",
        )
    else:
        ax.errorbar(x, m, yerr=s, marker="o", markersize=4, capsize=2, color=POS_COLOR, gid="tll-line")
    ax.axhline(0, color="0.3", linewidth=0.8)
    rotate = len(labels) > 6 or max(len(label) for label in labels) > 8
    _set_ticklabels(ax.xaxis, labels, (90 if len(labels) > 24 else 45) if rotate else 0)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylabel(value_label, **LITERAL_TEXT)
    ax.set_xlabel("accumulated stream at" if kind == "line" and att.by == "accumulated" else "component")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(f"{title}{_spread(s)}", **LITERAL_TEXT)
    return fig


@renamed_keywords(batch="prompt")
def plot_attribution_positions(
    att: Any,
    *,
    ax: Any = None,
    prompt: Optional[int] = 0,
    top_k: Optional[int] = None,
    tokens: Optional[Sequence[str]] = None,
    width: Any = "page",
) -> Any:
    """Direct logit attribution at every position: a component x position heatmap.

    For an attribution taken with ``positions=None`` (``values [component, batch, pos]``):
    rows are the components in their own order (``embed`` at the top), columns the
    positions, colour the direct effect on the answer's logit (difference) as read at that
    position, on the diverging ``RdBu`` map with limits symmetric about zero.

    Args:
        att: an :class:`~tl_logitlens.Attribution` with 3-D ``values``.
        prompt: the prompt to show, or ``None`` for the mean over prompts (``batch=`` is the old spelling).
        ax: a matplotlib ``Axes`` to draw into.
        top_k: keep only the ``top_k`` components with the largest ``|value|`` at any
            position (useful with ``by="neuron"``), in their original order.
        tokens: the input tokens as decoded strings, one per position column, for the x
            tick labels (drawn with :func:`~tl_logitlens.tokentext.display_token`);
            default: the absolute position.
        width: the widest a new figure may be: ``"page"``, ``"column"`` or inches.

    Returns:
        The ``Figure``; ``fig.axes[0].images[0]`` holds the ``[component, pos]`` array.

    Example::

        >>> import tl_logitlens as tll
        >>> from tl_logitlens.plots import plot_attribution_positions
        >>> model = tll.demo_model()
        >>> ids = tll.demo.induction_prompt(model)
        >>> att = tll.direct_logit_attribution(model, ids, answers=int(ids[0, -11]), positions=None)
        >>> words = [model.tokenizer.decode([i]) for i in ids[0].tolist()]
        >>> fig = plot_attribution_positions(att, tokens=words)
        >>> fig.axes[0].images[0].get_array().shape == (len(att.labels), ids.shape[1])
        True
    """
    if att.values.ndim != 3:
        raise LensInputError(
            f"this attribution was taken at one position (values {tuple(att.values.shape)} = "
            "[component, batch]); call tll.direct_logit_attribution(..., positions=None) to "
            "attribute at every position, or use plot_attribution"
        )
    n_comp, n_batch, n_pos = att.values.shape
    if prompt is None:
        data = att.values.mean(1)
        which = f"mean of {n_batch} prompts"
        pos_row = att.positions[0] if bool((att.positions == att.positions[0]).all()) else None
    else:
        _check_batch(prompt, n_batch, "attribution")
        prompt = int(prompt) % n_batch
        data = att.values[:, prompt]
        which = f"prompt {prompt}" if n_batch > 1 else ""
        pos_row = att.positions[prompt]
    labels = list(att.labels)
    rows = list(range(n_comp))
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise LensInputError(f"top_k must be a positive int or None, got {top_k!r}")
        strength = data.abs().amax(1)
        rows = sorted(strength.argsort(descending=True)[: int(top_k)].tolist())
    grid = _np(data[torch.tensor(rows)])  # [component, pos]
    if tokens is not None:
        tokens = list(tokens)
        if len(tokens) != n_pos:
            raise LensInputError(f"tokens has {len(tokens)} entries but the attribution has {n_pos} positions")
        x_labels = [display_token(str(t)) for t in tokens]
        x_title = "token"
    else:
        x_labels = [str(int(p)) for p in pos_row] if pos_row is not None else [str(j) for j in range(n_pos)]
        x_title = "position" if pos_row is not None else "position column"
    fig, ax = _new_axes(ax, (3.0 + 0.3 * n_pos, _clamp(2.4 + 0.2 * len(rows), 3.0, _MAX_HEIGHT)), width)
    limit = float(np.abs(grid).max()) or 1.0
    image = ax.imshow(
        grid, cmap=SIGNED_CMAP, norm=mcolors.Normalize(-limit, limit), aspect="auto", interpolation="nearest"
    )
    target = _answer_words(att)
    bar = fig.colorbar(image, ax=ax, pad=0.02)
    bar.set_label("direct effect (on the title's logit)", fontsize=BASE_FONT - 1)  # the target is in the title
    _position_labels(ax, x_labels, [labels[i] for i in rows])
    ax.set_xlabel(x_title)
    ax.set_ylabel("component")
    ax.tick_params(length=0)
    subset = "" if top_k is None else f", top {len(rows)} of {n_comp} by max |value|"
    title = f"Direct logit attribution to {target} at each position"
    if which or subset:
        title += f"\n{which}{subset}".replace("\n, ", "\n")
    ax.set_title(title, **LITERAL_TEXT)
    return fig


def _position_labels(ax: Any, x_labels: List[str], y_labels: List[str]) -> None:
    """Column labels flat when they fit, else rotated, elided to an inch and thinned; rows likewise."""
    fig = ax.figure
    if fig.get_layout_engine() is not None:
        fig.get_layout_engine().execute(fig)
    width, height = _axes_inches(ax)
    cell_w, cell_h = width / len(x_labels), height / len(y_labels)
    flat = max(len(s) for s in x_labels) * 0.6 * BASE_FONT / 72 <= cell_w
    font = BASE_FONT if flat else _clamp(cell_w * 72 / 1.25, MIN_FONT, BASE_FONT)
    step = 1 if flat else thin_every(len(x_labels), cell_w, font * 1.25 / 72)
    ticks = list(range(0, len(x_labels), step))
    ax.set_xticks(ticks)
    ax.set_xticklabels(
        [elide(x_labels[j], cell_w if flat else 0.9, font, fig) for j in ticks],
        rotation=0 if flat else 90,
        fontsize=font,
        **LITERAL_TEXT,
    )
    y_font = _clamp(cell_h * 72 / 1.25, MIN_FONT, BASE_FONT)
    y_step = thin_every(len(y_labels), cell_h, y_font * 1.2 / 72)
    y_ticks = list(range(0, len(y_labels), y_step))
    ax.set_yticks(y_ticks)
    ax.set_yticklabels([y_labels[i] for i in y_ticks], fontsize=y_font, **LITERAL_TEXT)


@renamed_keywords(top="top_k", batch="prompt")
def plot_source_attribution(
    att: Any,
    *,
    ax: Any = None,
    top_k: int = 6,
    prompt: Optional[int] = 0,
    position: int = -1,
    annotate: Optional[bool] = None,
) -> Any:
    """Which source tokens the top heads' direct effect came from: a source x head heatmap.

    Columns are the ``top_k`` heads with the largest ``|value|`` (for the prompt and position
    shown), strongest first; rows are the source positions from the first to the
    destination (later sources get no attention), labelled with their tokens; each cell is
    ``att.by_source()[layer, head, src]``, the part of the head's effect on the answer's
    logit (difference) that came from that source, on the diverging ``RdBu`` map with limits
    symmetric about zero. A column sums to the head's own attribution (plus the
    ``source_rounding`` of a half-precision model).

    Args:
        att: an :class:`~tl_logitlens.Attribution` made with ``by="head", by_source=True``.
        top_k: how many heads to show (a positive int; fewer when the model has fewer; ``top=``
            is the old spelling).
        prompt: the prompt to show, or ``None`` for the mean over prompts (rows are then
            labelled by position only, since prompts hold different tokens; ``batch=`` is the
            old spelling).
        position: for an attribution taken at several positions, which column of
            ``att.positions`` (negative from the end).
        ax: a matplotlib ``Axes`` to draw into.
        annotate: write each value in its cell (default: at most 256 cells).

    Returns:
        The ``Figure``; ``fig.axes[0].images[0]`` holds the ``[source, head]`` array.

    Example::

        >>> import tl_logitlens as tll
        >>> from tl_logitlens.plots import plot_source_attribution
        >>> model = tll.demo_model()
        >>> ids = tll.demo.induction_prompt(model)
        >>> att = tll.direct_logit_attribution(model, ids[:, :-1], answers=int(ids[0, -1]), by="head", by_source=True)
        >>> fig = plot_source_attribution(att, top_k=3)
        >>> fig.axes[0].images[0].get_array().shape      # 24 sources up to the last token, 3 heads
        (24, 3)
    """
    data = att.by_source()  # [layer, head, src, batch(, pos)]
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise LensInputError(f"top_k must be a positive int (how many heads to show), got {top_k!r}")
    n_layers, n_heads, n_src, n_batch = data.shape[:4]
    positions = att.positions  # [batch, n]
    if data.ndim == 5:
        n_pos = data.shape[4]
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or not -n_pos <= position < n_pos:
            raise LensInputError(
                f"position={position!r} is out of range: the attribution has {n_pos} position column(s)"
            )
        col = int(position) % n_pos
        data = data[..., col]
    else:
        col = 0
    if prompt is None:
        grid = torch.nanmean(data, dim=3)  # [layer, head, src]
        dests = {int(p) for p in positions[:, col]}
        dest = max(dests)
        which = f"mean of {n_batch} prompts"
        words = None
    else:
        _check_batch(prompt, n_batch, "attribution")
        b = int(prompt) % n_batch
        grid = data[:, :, :, b]
        dest = int(positions[b, col])
        which = f"prompt {b}" if n_batch > 1 else ""
        texts = att.source_tokens()
        words = None if texts is None else texts[b]
    totals = grid.sum(2).reshape(-1)  # [layer * head]
    order = totals.abs().nan_to_num(-1.0).argsort(descending=True)[: int(top_k)].tolist()
    heads = [divmod(i, n_heads) for i in order]
    rows = list(range(min(dest + 1, n_src)))
    image_data = _np(torch.stack([grid[layer, head, : len(rows)] for layer, head in heads], dim=1))  # [src, head]
    labels = [f"{p} {display_token(words[p])}" if words is not None else str(p) for p in rows]
    cols = [f"L{layer}H{head}" for layer, head in heads]

    chars = max(len(s) for s in labels)
    if ax is None:
        width = _clamp(2.6 + CHAR_WIDTH * BASE_FONT * chars + 0.7 * len(cols), 4.0, 16.0)
        height = _clamp(1.6 + 0.22 * len(rows), 3.0, 14.0)
        fig, ax = _new_axes(None, (width, height))
    else:
        fig = ax.figure
    limit = float(np.nanmax(np.abs(image_data))) if np.isfinite(image_data).any() else 1.0
    limit = limit or 1.0
    norm = mcolors.Normalize(-limit, limit)
    image = ax.imshow(image_data, cmap=SIGNED_CMAP, norm=norm, aspect="auto", interpolation="nearest")
    if annotate is None:
        annotate = image_data.size <= 256
    if annotate:
        cmap = image.get_cmap()
        for i in range(image_data.shape[0]):
            for j in range(image_data.shape[1]):
                value = float(image_data[i, j])
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=BASE_FONT - 2,
                    color=_text_color(cmap, norm, value),
                    **LITERAL_TEXT,
                )
    target = _answer_words(att)
    bar = fig.colorbar(image, ax=ax, pad=0.02)
    bar.set_label(f"direct effect on {target}", **LITERAL_TEXT)
    _set_ticklabels(ax.xaxis, cols)
    _set_ticklabels(ax.yaxis, labels, 0, _clamp(BASE_FONT - 0.05 * max(len(rows) - 30, 0), 5.0, BASE_FONT))
    ax.set_xlabel("head (strongest first)")
    ax.set_ylabel("source position")
    ax.tick_params(length=0)
    title = f"Head attribution to {target} by source, at position {dest}"
    if words is not None:
        title += f" ({display_token(words[dest])})"
    if which:
        title += f"\n{which}"
    ax.set_title(title, **LITERAL_TEXT)
    return fig
