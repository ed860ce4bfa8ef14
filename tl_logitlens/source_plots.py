"""Figures for attribution down to the source token and for token groups.

- :func:`plot_source_attribution`: for the heads that write the answer most, which source
  positions their contribution came from (source tokens x heads).
- :func:`plot_group_trajectory`: each token group's summed probability across layers.

Both read result objects only (:class:`~tl_logitlens.Attribution` made with
``by_source=True``, :class:`~tl_logitlens.LensResult` made with token groups) and return
the ``Figure``; nothing here runs a model. Helpers come from :mod:`tl_logitlens.plots`.
"""

from __future__ import annotations

from typing import Any, List, Optional

import matplotlib.colors as mcolors
import numpy as np
import torch

from .plots import _CHAR_W, _FONT, _answer_words, _check_batch, _clamp, _new_axes, _np, _set_ticklabels, _text_color
from .tokentext import LITERAL_TEXT, display_token

__all__ = ["plot_source_attribution", "plot_group_trajectory"]


def plot_source_attribution(
    att: Any,
    *,
    top: int = 6,
    batch: Optional[int] = 0,
    position: int = -1,
    ax: Any = None,
    annotate: Optional[bool] = None,
) -> Any:
    """Which source tokens the top heads' direct effect came from: a source x head heatmap.

    Columns are the ``top`` heads with the largest ``|value|`` (for the prompt and position
    shown), strongest first; rows are the source positions from the first to the
    destination (later sources get no attention), labelled with their tokens; each cell is
    ``att.by_source()[layer, head, src]``, the part of the head's effect on the answer's
    logit (difference) that came from that source, on the diverging ``RdBu`` map with limits
    symmetric about zero. A column sums to the head's own attribution (plus the
    ``source_rounding`` of a half-precision model).

    Args:
        att: an :class:`~tl_logitlens.Attribution` made with ``by="head", by_source=True``.
        top: how many heads to show (a positive int; fewer when the model has fewer).
        batch: the prompt to show, or ``None`` for the mean over prompts (rows are then
            labelled by position only, since prompts hold different tokens).
        position: for an attribution taken at several positions, which column of
            ``att.positions`` (negative from the end).
        ax: a matplotlib ``Axes`` to draw into.
        annotate: write each value in its cell (default: at most 256 cells).

    Returns:
        The ``Figure``; ``fig.axes[0].images[0]`` holds the ``[source, head]`` array.

    Example::

        >>> import tl_logitlens as tll
        >>> from tl_logitlens.source_plots import plot_source_attribution
        >>> model = tll.demo_model()
        >>> ids = tll.demo.induction_prompt(model)
        >>> att = tll.direct_logit_attribution(model, ids[:, :-1], answers=int(ids[0, -1]), by="head", by_source=True)
        >>> fig = plot_source_attribution(att, top=3)
        >>> fig.axes[0].images[0].get_array().shape      # 24 sources up to the last token, 3 heads
        (24, 3)
    """
    data = att.by_source()  # [layer, head, src, batch(, pos)]
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise ValueError(f"top must be a positive int (how many heads to show), got {top!r}")
    n_layers, n_heads, n_src, n_batch = data.shape[:4]
    positions = att.positions  # [batch, n]
    if data.ndim == 5:
        n_pos = data.shape[4]
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or not -n_pos <= position < n_pos:
            raise ValueError(f"position={position!r} is out of range: the attribution has {n_pos} position column(s)")
        col = int(position) % n_pos
        data = data[..., col]
    else:
        col = 0
    if batch is None:
        grid = torch.nanmean(data, dim=3)  # [layer, head, src]
        dests = {int(p) for p in positions[:, col]}
        dest = max(dests)
        which = f"mean of {n_batch} prompts"
        words = None
    else:
        _check_batch(batch, n_batch, "attribution")
        b = int(batch) % n_batch
        grid = data[:, :, :, b]
        dest = int(positions[b, col])
        which = f"prompt {b}" if n_batch > 1 else ""
        texts = att.source_tokens()
        words = None if texts is None else texts[b]
    totals = grid.sum(2).reshape(-1)  # [layer * head]
    order = totals.abs().nan_to_num(-1.0).argsort(descending=True)[: int(top)].tolist()
    heads = [divmod(i, n_heads) for i in order]
    rows = list(range(min(dest + 1, n_src)))
    image_data = _np(torch.stack([grid[layer, head, : len(rows)] for layer, head in heads], dim=1))  # [src, head]
    labels = [f"{p} {display_token(words[p])}" if words is not None else str(p) for p in rows]
    cols = [f"L{layer}H{head}" for layer, head in heads]

    chars = max(len(s) for s in labels)
    if ax is None:
        width = _clamp(2.6 + _CHAR_W * _FONT * chars + 0.7 * len(cols), 4.0, 16.0)
        height = _clamp(1.6 + 0.22 * len(rows), 3.0, 14.0)
        fig, ax = _new_axes(None, (width, height))
    else:
        fig = ax.figure
    limit = float(np.nanmax(np.abs(image_data))) if np.isfinite(image_data).any() else 1.0
    limit = limit or 1.0
    norm = mcolors.Normalize(-limit, limit)
    image = ax.imshow(image_data, cmap="RdBu", norm=norm, aspect="auto", interpolation="nearest")
    if annotate is None:
        annotate = image_data.size <= 256
    if annotate:
        cmap = image.get_cmap()
        for i in range(image_data.shape[0]):
            for j in range(image_data.shape[1]):
                value = float(image_data[i, j])
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=_FONT - 2,
                        color=_text_color(cmap, norm, value), **LITERAL_TEXT)
    target = _answer_words(att)
    bar = fig.colorbar(image, ax=ax, pad=0.02)
    bar.set_label(f"direct effect on {target}", **LITERAL_TEXT)
    _set_ticklabels(ax.xaxis, cols)
    _set_ticklabels(ax.yaxis, labels, 0, _clamp(_FONT - 0.05 * max(len(rows) - 30, 0), 5.0, _FONT))
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


def plot_group_trajectory(
    result: Any,
    *,
    groups: Any = None,
    batch: Optional[int] = 0,
    position: int = -1,
    metric: str = "prob",
    ax: Any = None,
) -> Any:
    """Each token group's summed probability (or log-sum-exp logit) across layers, one line per group.

    The figure behind "latent language" readings: e.g. the answer in one language against
    its translation, layer by layer. Read from ``result.group_probs`` /
    ``result.group_logits`` (``[layer, batch, pos, group]``, or ``[layer, batch, group]``
    for a result read at one int position).

    Args:
        result: a :class:`~tl_logitlens.LensResult` made with ``targets={"name": [tokens...], ...}``.
        groups: ``None`` (all), a group name, or a list of names.
        batch: a prompt index, or ``None`` for the mean over prompts.
        position: which column of ``result.positions`` (negative from the end). For one
            prompt, the column must be a real (non-padding) token.
        metric: ``"prob"`` (summed probability, 0..1) or ``"logit"`` (log-sum-exp logit).
        ax: a matplotlib ``Axes`` to draw into.

    Returns:
        The ``Figure``; ``ax.lines[i]`` is the ``i``-th group shown, labelled with its name.

    Example::

        >>> import tl_logitlens as tll
        >>> from tl_logitlens.source_plots import plot_group_trajectory
        >>> model = tll.demo_model()
        >>> ids = tll.demo.induction_prompt(model)
        >>> result = tll.logit_lens(model, ids, targets={"cat": ["cat"], "animals": ["cat", "goat", "ape"]})
        >>> fig = plot_group_trajectory(result, position=13)
        >>> [line.get_label() for line in fig.axes[0].lines]
        ['cat', 'animals']
    """
    if getattr(result, "group_names", None) is None:
        raise ValueError('plot_group_trajectory needs token groups: tll.logit_lens(..., targets={"name": [tokens...], ...})')
    if metric not in ("prob", "logit"):
        raise ValueError(f"metric must be 'prob' or 'logit', got {metric!r}")
    values = result.group_probs if metric == "prob" else result.group_logits
    if not result.has_pos_axis:
        values = values.unsqueeze(2)
    n_layer, n_batch, n_pos, n_group = values.shape
    names: List[str] = list(result.group_names)
    if groups is None:
        picked = list(range(n_group))
    else:
        wanted = [groups] if isinstance(groups, str) else list(groups)
        unknown = [g for g in wanted if g not in names]
        if unknown:
            raise ValueError(f"unknown group(s) {unknown}; the result's groups are {names}")
        picked = [names.index(g) for g in wanted]
    if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or not -n_pos <= position < n_pos:
        raise ValueError(f"position={position!r} is out of range: the result has {n_pos} position column(s)")
    col = int(position) % n_pos
    if batch is None:
        real = (result.positions[:, col] < result.lengths)  # prompts with a token in this column
        curves = values[:, real, col].mean(1)
        which = f"mean of {int(real.sum())} prompts"
        where = f"column {col}"
    else:
        _check_batch(batch, n_batch, "result")
        b = int(batch) % n_batch
        pos = int(result.positions[b, col])
        if pos >= int(result.lengths[b]):
            raise ValueError(f"position column {col} is padding in prompt {b} (its length is {int(result.lengths[b])})")
        curves = values[:, b, col]
        which = f"prompt {b}" if n_batch > 1 else ""
        tokens = result.input_tokens()
        where = f"position {pos}" + ("" if tokens is None else f" ({display_token(tokens[b][col])})")
    fig, ax = _new_axes(ax, (_clamp(1.5 + 0.5 * n_layer, 5.0, 14.0), 3.8))
    x = np.arange(n_layer)
    for g in picked:
        ax.plot(x, _np(curves[:, g]), marker="o", label=names[g])
    _set_ticklabels(ax.xaxis, list(result.labels), 45 if n_layer > 8 else 0)
    ax.set_xlabel("layer (stack entry)")
    if metric == "prob":
        ax.set_ylabel("summed probability of the group")
        ax.set_ylim(-0.02, 1.02)
    else:
        ax.set_ylabel("log-sum-exp logit of the group")
    legend = ax.legend(loc="best", fontsize=_FONT - 1)
    for text in legend.get_texts():
        text.set_parse_math(False)
    ax.grid(alpha=0.3)
    title = f"Token groups across layers at {where}" + (f"\n{which}" if which else "")
    ax.set_title(title, **LITERAL_TEXT)
    return fig
