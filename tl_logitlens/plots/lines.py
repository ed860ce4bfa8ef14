"""Line figures over the stack: target trajectories and per-layer statistics with quantile bands.

Every per-layer statistic is named and coloured from :data:`~tl_logitlens.plots.style.METRIC_STYLE`,
so ``plot_lens_metrics``, ``LensEvaluation.plot`` and :func:`plot_lens_comparison` agree (several
lenses on one figure are told apart by :data:`~tl_logitlens.plots.style.LINE_STYLES`); bands are
light, drawn under every line, the widest first, so overlapping bands stay readable.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import LensInputError
from ..renamed import renamed_keywords
from ..tokentext import LITERAL_TEXT, display_token
from .layout import (
    _batch_rows,
    _check_batch,
    _clamp,
    _decoder,
    _lens_words,
    _literal,
    _new_axes,
    _np,
    _set_ticklabels,
    _targets_are_next,
    _with_pos,
    add_caption,
    plain_log_ticks,
    rank_axis,
)
from .style import (
    BAND_ALPHA,
    BASE_FONT,
    COMPARISON_STATISTICS,
    LINE_STYLES,
    METRIC_STYLE,
    NATS_STATISTICS,
    RATE_STATISTICS,
    STACK_CAPTION,
    TRAJECTORY_METRICS,
    metric_style,
)

_MAX_WIDTH = 16.0  # natural widths above a page are clamped by width=


def _read_columns(result: Any, position: int, rows: List[int]) -> List[int]:
    """The position column read for each prompt in ``rows`` (see :func:`plot_trajectory`)."""
    if not result.has_pos_axis:
        if position not in (0, -1):
            raise LensInputError(
                f"position={position}: this result was read at one position only "
                "(logit_lens(..., positions=<int>)); leave position at its default"
            )
        return [0] * len(rows)
    cols = []
    for b in rows:
        valid = [j for j in range(result.positions.shape[1]) if int(result.positions[b, j]) < int(result.lengths[b])]
        if not -len(valid) <= position < len(valid):
            raise LensInputError(
                f"position={position} is out of range for prompt {b}, which has {len(valid)} "
                f"position column(s) read (0..{len(valid) - 1}, or negative from its last real token)"
            )
        cols.append(valid[position])
    return cols


def _pick_targets(target: Any, ids: torch.Tensor, decode_raw: Any) -> List[int]:
    """Target axis indices for ``target`` (index, token id, token string, or a list)."""
    n_t = ids.shape[1]
    items = target if isinstance(target, (list, tuple)) else [target]
    shared = [int(ids[0, t]) if bool((ids[:, t] == ids[0, t]).all()) else None for t in range(n_t)]
    names = [decode_raw(i) if i is not None else None for i in shared]
    picked: List[int] = []
    for item in items:
        if isinstance(item, torch.Tensor) and item.ndim == 0:
            item = int(item)
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            item = int(item)
            if -n_t <= item < n_t:
                picked.append(item % n_t)
                continue
            hits = [t for t in range(n_t) if shared[t] == item]
        elif isinstance(item, str):
            hits = [t for t in range(n_t) if names[t] == item]
        else:
            raise LensInputError(f"target must be an index, a token id or a token string, got {item!r}")
        if not hits:
            raise LensInputError(
                f"target {item!r} is not among this result's targets: indices 0..{n_t - 1}, "
                f"ids {[s for s in shared if s is not None]}, tokens {[n for n in names if n is not None]}"
            )
        picked.extend(hits)
    return picked


@renamed_keywords(batch="prompt")
def plot_trajectory(
    result: Any,
    *,
    ax: Any = None,
    target: Any = None,
    metric: str = "prob",
    position: Optional[int] = None,
    prompt: Optional[Union[int, Sequence[int]]] = None,
    width: Any = "page",
) -> Any:
    """How one or more target tokens fare across layers: probability, rank or logit.

    One line per target over the stack entries (x = ``result.labels``), read from
    ``result.target_probs`` / ``target_ranks`` / ``target_logits`` (``[layer, batch, pos,
    t]``, or ``[layer, batch, t]`` for a result read at one int position) at one position.
    With several prompts the line is the mean over prompts and the shaded band spans the
    25-75% quantiles. ``"rank"`` is the 0-based rank (0 = top-1) on a symmetric-log axis.

    Args:
        result: a :class:`~tl_logitlens.LensResult` made with ``targets=``.
        target: ``None`` (all targets); an index into the target axis; a token id or a
            token string (as ``result.decode(id)`` spells it) shared by the prompts; or a
            list of these. An int in ``-t..t-1`` is an index, any other int a token id.
        metric: ``"prob"``, ``"rank"`` or ``"logit"``.
        ax: a matplotlib ``Axes`` to draw into.
        position: which position column, per prompt: negative counts back from each
            prompt's own last real (non-padding) column. Default: the last column that has
            a target: ``-1``, or ``-2`` for ``targets="next"`` (the last token has no next).
        prompt: ``None`` (all prompts), one prompt index, or a list of them (``batch=`` is the old spelling).
        width: the widest a new figure may be: ``"page"``, ``"column"`` or inches.

    Returns:
        The ``Figure``; ``ax.lines[i]`` is target ``i``'s mean curve, labelled with its
        decoded token (``"true next token"`` for ``targets="next"``).

    Example::

        >>> import tl_logitlens as tll
        >>> from tl_logitlens.plots import plot_trajectory
        >>> model = tll.demo_model()
        >>> tokens = tll.demo.induction_prompt(model)
        >>> result = tll.logit_lens(model, tokens, targets=[int(tokens[0, 2]), int(tokens[0, 3])])
        >>> fig = plot_trajectory(result, metric="rank", position=-2)
        >>> fig.axes[0].get_yscale()
        'symlog'
    """
    if metric not in TRAJECTORY_METRICS:
        raise LensInputError(f"unknown metric {metric!r}; choose one of {list(TRAJECTORY_METRICS)}")
    if result.target_ids is None:
        raise LensInputError(
            "this result has no targets; run tll.logit_lens(model, input, targets=...) with the "
            "tokens to follow (a token, a list of tokens, or 'next')"
        )
    rows = _batch_rows(prompt, int(result.lengths.shape[0]))
    has_pos = result.has_pos_axis
    is_next = _targets_are_next(result)
    if position is None:
        position = -2 if (is_next and has_pos) else -1
    cols = _read_columns(result, int(position), rows)
    field = {"prob": result.target_probs, "rank": result.target_ranks, "logit": result.target_logits}[metric]
    field = _with_pos(field, has_pos, 2)  # [layer, batch, pos, t]
    ids_all = _with_pos(result.target_ids, has_pos, 2)
    r_idx, c_idx = torch.tensor(rows), torch.tensor(cols)
    values = _np(field[:, r_idx, c_idx])  # [layer, prompts, t]
    ids = ids_all[0, r_idx, c_idx]  # [prompts, t]

    nxt = _with_pos(result.next_ids, has_pos, 1)[r_idx, c_idx]  # [prompts]
    if is_next:
        # targets="next": no target where there is no next token (a prompt's last token).
        values[:, (nxt < 0).numpy(), :] = np.nan
        if not bool((nxt >= 0).any()):
            raise LensInputError(
                f"this result's targets are the true next tokens, and position={position} is each "
                "prompt's last token, which has no next token; pass position=-2 (or another column)"
            )
    raw = (lambda i: f"#{int(i)}") if result.tokenizer is None else result.decode  # noqa: E731
    chosen = list(range(ids.shape[1])) if target is None else _pick_targets(target, ids, raw)
    decode = _decoder(result.tokenizer)

    owned = ax is None
    fig, ax = _new_axes(ax, (_clamp(1.6 + 0.55 * len(result.labels), 6.0, _MAX_WIDTH), 3.6), width)
    x = np.arange(len(result.labels))
    for t in chosen:
        name = _target_name(ids[:, t][nxt >= 0] if is_next else ids[:, t], t, is_next, decode)
        v = values[:, :, t]
        v = v[:, np.isfinite(v).all(0)]  # prompts without a next token drop out
        (line,) = ax.plot(x, v.mean(1), marker="o", markersize=4, label=name, zorder=3)
        if v.shape[1] > 1:
            _band(ax, x, *np.quantile(v, [0.25, 0.75], axis=1), line.get_color())
    _set_ticklabels(ax.xaxis, result.labels, 45 if len(result.labels) > 10 else 0)
    ax.set_xlabel("stack entry")
    ax.set_xlim(-0.3, len(x) - 0.7)
    _value_axis(ax, metric, values)
    title = f"Target {metric} across layers at {_where(result, rows, cols, int(position), decode)}"
    if getattr(result, "lens_name", "logit") != "logit":
        title += f" ({result.lens_name} lens)"
    if len(rows) > 1:
        title += f"\nmean over {len(rows)} prompts, band: 25\u201375% quantiles"
    ax.set_title(title, **LITERAL_TEXT)
    legend = ax.legend(title="target", fontsize=BASE_FONT, frameon=False)
    _literal(legend.get_texts())
    add_caption(fig, [STACK_CAPTION], owned)
    return fig


def _target_name(column: torch.Tensor, t: int, is_next: bool, decode: Any) -> str:
    """The legend entry of target ``t``: its token when every prompt shares it."""
    shared = bool((column == column[0]).all())
    if is_next:
        return "true next token" + (f" ({decode(int(column[0]))})" if shared else "")
    return decode(int(column[0])) if shared else f"target {t} (differs by prompt)"


def _value_axis(ax: Any, metric: str, values: np.ndarray) -> None:
    if metric == "rank":
        rank_axis(ax.yaxis, float(np.nanmax(values)) if np.isfinite(values).any() else 10.0)
        ax.set_ylabel("rank of target (0 = top)")
    elif metric == "prob":
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("probability of target")
    else:
        ax.set_ylabel("logit of target")
    ax.grid(True, alpha=0.3)


def _where(result: Any, rows: List[int], cols: List[int], position: int, decode: Any) -> str:
    """Words for the position read: ``position 7 (␣Paris)``, or per prompt when they differ."""
    positions = sorted({int(result.positions[b, c]) for b, c in zip(rows, cols)})
    if len(positions) != 1:
        return {-1: "each prompt's last position", -2: "each prompt's last position but one"}.get(
            position, f"column {position} of each prompt"
        )
    where = f"position {positions[0]}"
    if result.input_ids is not None:
        words = {int(result.input_ids[b, positions[0]]) for b in rows}
        if len(words) == 1:
            where += f" ({decode(words.pop())})"
    return where


def _band(ax: Any, x: np.ndarray, low: Any, high: Any, color: str) -> None:
    """A quantile band: a light fill under the lines, with a thin dashed outline so overlaps stay legible."""
    from matplotlib.colors import to_rgba

    ax.fill_between(
        x,
        low,
        high,
        facecolor=to_rgba(color, BAND_ALPHA),
        edgecolor=to_rgba(color, 0.55),
        linewidth=0.6,
        linestyle=(0, (3, 2)),
        zorder=1,
    )


# -- per-layer statistics --------------------------------------------------------------------
def plot_layer_curves(
    labels: Sequence[str],
    curves: Mapping[str, Sequence[Any]],
    *,
    ax: Any = None,
    title: Optional[str] = None,
    ylabel: Optional[str] = None,
    logy: bool = False,
    width: Any = "page",
) -> Any:
    """Per-layer curves, each a line with a shaded band: the shared drawing of layer statistics.

    Used by :func:`plot_lens_metrics` and by anything else that summarises a quantity per
    stack entry (dataset evaluations), so all such figures look alike. A curve named by a
    statistic of :data:`~tl_logitlens.plots.style.METRIC_STYLE` (by field, ``"kl_to_final"``,
    or by shown name, ``"KL to final"``) gets that statistic's shown name and colour.

    Args:
        labels: ``[layer]`` stack entry labels, the x axis.
        curves: ``name -> (mean, low, high)``, each ``[layer]`` (tensor, array or list);
            ``low``/``high`` bound the band and may be ``None`` (or the tuple just
            ``(mean,)``) for no band. NaN entries leave gaps.
        ax: a matplotlib ``Axes`` to draw into.
        title: the axes title.
        ylabel: the y axis label.
        logy: log y axis.
        width: the widest a new figure may be: ``"page"``, ``"column"`` or inches.

    Returns:
        The ``Figure``; the curves' means are the lines labelled with their (shown) names,
        in the order given; band edges are unlabelled lines (``_`` labels).

    Example::

        >>> from tl_logitlens.plots import plot_layer_curves
        >>> fig = plot_layer_curves(["0_pre", "1_pre", "final_post"],
        ...                         {"entropy": ([3.0, 2.0, 0.5], [2.5, 1.0, 0.1], [3.5, 3.0, 1.0])},
        ...                         ylabel="nats")
        >>> fig.axes[0].lines[0].get_ydata().tolist()
        [3.0, 2.0, 0.5]
    """
    labels = list(labels)
    if not curves:
        raise LensInputError("curves is empty; pass {name: (mean, low, high)} with one value per label")
    owned = ax is None
    fig, ax = _new_axes(ax, (_clamp(3.2 + 0.55 * len(labels), 6.5, _MAX_WIDTH), 3.6), width)
    x = np.arange(len(labels))
    parsed = [_curve_parts(name, curve, len(labels)) for name, curve in curves.items()]
    spare = iter(_spare_colors())  # curves that are no known statistic take the usual cycle
    parsed = [(n, m, lo, hi, c or next(spare)) for n, m, lo, hi, c in parsed]
    # Bands first and widest first, all under the lines: no band hides a line or a narrower band.
    for _, _, low, high, color in sorted(
        (c for c in parsed if c[2] is not None), key=lambda c: -float(np.nanmean(c[3] - c[2]))
    ):
        _band(ax, x, low, high, color)
    for name, mean, _, _, color in parsed:
        ax.plot(x, mean, marker="o", markersize=4, label=name, color=color, zorder=3)
    _set_ticklabels(ax.xaxis, labels, 45 if len(labels) > 10 else 0)
    ax.set_xlim(-0.3, len(x) - 0.7)
    ax.set_xlabel("stack entry")
    if ylabel:
        ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
        plain_log_ticks(ax.yaxis)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    legend = ax.legend(fontsize=BASE_FONT, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _literal(legend.get_texts())
    if any(label in ("0_pre", "final_post") for label in labels):
        add_caption(fig, [STACK_CAPTION], owned)
    return fig


def _spare_colors() -> List[str]:
    import matplotlib

    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    return [cycle[i % len(cycle)] for i in range(64)]


def _curve_parts(name: str, curve: Any, n: int) -> Tuple[str, np.ndarray, Any, Any, Optional[str]]:
    """``(shown name, mean, low, high, colour)`` of one curve; low/high None for no band."""
    parts = list(curve) if isinstance(curve, (tuple, list)) else [curve]
    if len(parts) not in (1, 3):
        raise LensInputError(f"curve {name!r} must be (mean, low, high) or (mean,), got {len(parts)} items")
    mean = _np(parts[0]).reshape(-1)
    if mean.shape[0] != n:
        raise LensInputError(f"curve {name!r} has {mean.shape[0]} values but there are {n} labels")
    low = high = None
    if len(parts) == 3 and parts[1] is not None and parts[2] is not None:
        low, high = _np(parts[1]).reshape(-1), _np(parts[2]).reshape(-1)
        if low.shape != mean.shape or high.shape != mean.shape:
            raise LensInputError(
                f"curve {name!r}: mean, low and high must all have {n} values, got "
                f"{mean.shape[0]}, {low.shape[0]}, {high.shape[0]}"
            )
    style = metric_style(name)
    return (style.name if style else name), mean, low, high, (style.color if style else None)


@renamed_keywords(batch="prompt")
def plot_lens_metrics(
    result: Any,
    *,
    ax: Any = None,
    prompt: Optional[Union[int, Sequence[int]]] = None,
    quantiles: Tuple[float, float] = (0.1, 0.9),
    width: Any = "page",
) -> Any:
    """Per-layer entropy, KL to the final layer and next-token loss, in one panel (nats).

    For each stack entry, the mean over every real (non-padding) position of the chosen
    prompts, with a band between the ``quantiles`` (default 10-90%). NaN values (the loss
    where there is no next token) are ignored; a statistic with no finite value at all
    (the loss of a result read only at each prompt's last token) is left out. All three
    are in nats, so they share one y axis.

    Args:
        result: a :class:`~tl_logitlens.LensResult`; ``entropy``, ``kl_to_final`` and
            ``next_token_loss`` are ``[layer, batch, pos]`` (or ``[layer, batch]``).
        ax: a matplotlib ``Axes`` to draw into.
        prompt: ``None`` (all prompts), one prompt index, or a list of them (``batch=`` is the old spelling).
        quantiles: the band's ``(low, high)`` quantiles.
        width: the widest a new figure may be: ``"page"``, ``"column"`` or inches.

    Returns:
        The ``Figure`` (see :func:`plot_layer_curves`).

    Example::

        >>> import tl_logitlens as tll
        >>> from tl_logitlens.plots import plot_lens_metrics
        >>> model = tll.demo_model()
        >>> result = tll.logit_lens(model, tll.demo.induction_prompt(model))
        >>> [line.get_label() for line in plot_lens_metrics(result).axes[0].lines]
        ['entropy', 'KL to final', 'next-token loss']
    """
    lo_q, hi_q = quantiles
    if not 0 <= lo_q <= hi_q <= 1:
        raise LensInputError(f"quantiles must satisfy 0 <= low <= high <= 1, got {quantiles}")
    rows = _batch_rows(prompt, int(result.lengths.shape[0]))
    has_pos = result.has_pos_axis
    real = result.positions < result.lengths.unsqueeze(1)  # [batch, pos]
    real = real[torch.tensor(rows)]
    curves: Dict[str, Tuple[Any, Any, Any]] = {}
    for name, field in (
        ("entropy", result.entropy),
        ("kl_to_final", result.kl_to_final),
        ("next_token_loss", result.next_token_loss),
    ):
        v = _with_pos(field, has_pos, 2)[:, torch.tensor(rows)].float()  # [layer, rows, pos]
        v = torch.where(real.unsqueeze(0), v, torch.full_like(v, float("nan"))).reshape(v.shape[0], -1)
        if not bool(torch.isfinite(v).any()):
            continue
        curves[name] = (
            torch.nanmean(v, dim=1),
            torch.nanquantile(v, lo_q, dim=1),
            torch.nanquantile(v, hi_q, dim=1),
        )
    n_cells = int(real.sum())
    title = (
        f"{_lens_words(result)} per layer (norm={result.norm!r})\nmean over {n_cells} position(s)"
        f"{'' if len(rows) == 1 else f' of {len(rows)} prompts'}, "
        f"band {lo_q * 100:g}\u2013{hi_q * 100:g}%"
    )
    return plot_layer_curves(result.labels, curves, ax=ax, title=title, ylabel="nats", width=width)


@renamed_keywords(batch="prompt")
def plot_group_trajectory(
    result: Any,
    *,
    ax: Any = None,
    groups: Any = None,
    prompt: Optional[int] = 0,
    position: int = -1,
    metric: str = "prob",
) -> Any:
    """Each token group's summed probability (or log-sum-exp logit) across layers, one line per group.

    The figure behind "latent language" readings: e.g. the answer in one language against
    its translation, layer by layer. Read from ``result.group_probs`` /
    ``result.group_logits`` (``[layer, batch, pos, group]``, or ``[layer, batch, group]``
    for a result read at one int position).

    Args:
        result: a :class:`~tl_logitlens.LensResult` made with ``targets={"name": [tokens...], ...}``.
        groups: ``None`` (all), a group name, or a list of names.
        prompt: a prompt index, or ``None`` for the mean over prompts (``batch=`` is the old spelling).
        position: which column of ``result.positions`` (negative from the end). For one
            prompt, the column must be a real (non-padding) token.
        metric: ``"prob"`` (summed probability, 0..1) or ``"logit"`` (log-sum-exp logit).
        ax: a matplotlib ``Axes`` to draw into.

    Returns:
        The ``Figure``; ``ax.lines[i]`` is the ``i``-th group shown, labelled with its name.

    Example::

        >>> import tl_logitlens as tll
        >>> from tl_logitlens.plots import plot_group_trajectory
        >>> model = tll.demo_model()
        >>> ids = tll.demo.induction_prompt(model)
        >>> result = tll.logit_lens(model, ids, targets={"cat": ["cat"], "animals": ["cat", "goat", "ape"]})
        >>> fig = plot_group_trajectory(result, position=13)
        >>> [line.get_label() for line in fig.axes[0].lines]
        ['cat', 'animals']
    """
    if getattr(result, "group_names", None) is None:
        raise LensInputError(
            'plot_group_trajectory needs token groups: tll.logit_lens(..., targets={"name": [tokens...], ...})'
        )
    if metric not in ("prob", "logit"):
        raise LensInputError(f"metric must be 'prob' or 'logit', got {metric!r}")
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
            raise LensInputError(f"unknown group(s) {unknown}; the result's groups are {names}")
        picked = [names.index(g) for g in wanted]
    if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or not -n_pos <= position < n_pos:
        raise LensInputError(f"position={position!r} is out of range: the result has {n_pos} position column(s)")
    col = int(position) % n_pos
    if prompt is None:
        real = result.positions[:, col] < result.lengths  # prompts with a token in this column
        curves = values[:, real, col].mean(1)
        which = f"mean of {int(real.sum())} prompts"
        where = f"column {col}"
    else:
        _check_batch(prompt, n_batch, "result")
        b = int(prompt) % n_batch
        pos = int(result.positions[b, col])
        if pos >= int(result.lengths[b]):
            raise LensInputError(
                f"position column {col} is padding in prompt {b} (its length is {int(result.lengths[b])})"
            )
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
    legend = ax.legend(loc="best", fontsize=BASE_FONT - 1)
    for text in legend.get_texts():
        text.set_parse_math(False)
    ax.grid(alpha=0.3)
    title = f"Token groups across layers at {where}" + (f"\n{which}" if which else "")
    ax.set_title(title, **LITERAL_TEXT)
    return fig


# -- several lenses ----------------------------------------------------------------------------
def plot_lens_comparison(
    comparison: Any,
    *,
    ax: Any = None,
    statistics: Sequence[str] = COMPARISON_STATISTICS,
    band: Optional[Sequence[float]] = None,
    title: Optional[str] = None,
) -> Any:
    """Several lenses' per-layer statistics on one figure: one colour per statistic, one line style per lens.

    The statistics in nats (``kl_to_final``, ``next_token_loss``, ``entropy``) share the left
    axis; the top-1 rates (``top1_agreement``, ``top1_accuracy``, in [0, 1]) are drawn against
    a right axis (alone, on the left one). Each statistic has its colour of
    :data:`~tl_logitlens.plots.style.METRIC_STYLE` (as ``LensEvaluation.plot`` draws it), each
    lens its line style and marker of :data:`~tl_logitlens.plots.style.LINE_STYLES`. Each line
    is labelled ``"<lens>: <statistic>"`` and the legend lists them all. ``band=(0.25, 0.75)``
    shades each statistic in nats between those quantiles (off by default: several lenses'
    bands overlap).

    Args:
        comparison: a :class:`~tl_logitlens.evaluate.LensComparison`, or anything with
            ``.lenses`` (names) and ``[name]`` giving an evaluation with ``labels``,
            ``n_tokens``, ``mean(stat)`` and ``quantile(stat, q)`` (``[layer]`` each) and the
            rates as ``[layer]`` attributes.
        ax: a matplotlib ``Axes`` to draw into.
        statistics: a non-empty selection of the nats and rates above.
        band: ``None``, or the ``(low, high)`` quantiles of the bands.
        title: the axes title (default: the lenses and the token count).

    Returns:
        The ``Figure``; ``fig.axes[0]`` (or ``ax``) holds the first kind of statistic, a twin
        axis the rates when both kinds are drawn; the lines are ``[layer]``, lens by lens,
        statistic by statistic.

    Example::

        >>> import torch
        >>> import tl_logitlens as tll
        >>> from tl_logitlens.plots import plot_lens_comparison
        >>> model = tll.demo_model()
        >>> tokens = torch.cat([tll.demo.induction_prompt(model, seed=s) for s in range(2)])
        >>> cmp = tll.compare_lenses(model, tokens, {"logit": None, "tuned": tll.TunedLens(model)}, progress=False)
        >>> fig = plot_lens_comparison(cmp, statistics=("kl_to_final", "top1_accuracy"))
        >>> [line.get_label() for line in fig.axes[0].lines + fig.axes[1].lines]
        ['logit: kl_to_final', 'tuned: kl_to_final', 'logit: top1_accuracy', 'tuned: top1_accuracy']
    """
    nats, rates = _comparison_statistics(statistics, band)
    evaluations = {name: comparison[name] for name in comparison.lenses}
    first = nats or rates
    labels = list(next(iter(evaluations.values())).labels)
    lines_before = 0 if ax is None else len(ax.lines)
    fig = plot_layer_curves(
        labels,
        {f"{name}: {stat}": (_comparison_curve(ev, stat),) for name, ev in evaluations.items() for stat in first},
        ax=ax,
        ylabel="nats" if nats else "top-1 rate",
    )
    ax = ax if ax is not None else fig.axes[0]
    drawn = list(ax.lines[lines_before:])
    _lens_line_styles(drawn, first)
    if band is not None and nats:
        x = np.arange(len(labels))
        edges = [
            (_np(ev.quantile(stat, band[0])), _np(ev.quantile(stat, band[1])), METRIC_STYLE[stat].color)
            for ev in evaluations.values()
            for stat in nats
        ]
        for low, high, color in sorted(edges, key=lambda e: -float(np.nanmean(e[1] - e[0]))):  # widest first
            _band(ax, x, low, high, color)
    legend_x = 1.01
    if nats and rates:
        twin = ax.twinx()
        x = list(range(len(labels)))
        extra = [
            twin.plot(x, _comparison_curve(ev, stat).tolist(), markersize=4, label=f"{name}: {stat}")[0]
            for name, ev in evaluations.items()
            for stat in rates
        ]
        _lens_line_styles(extra, rates)
        twin.set_ylim(-0.02, 1.02)
        twin.set_ylabel("top-1 rate")
        drawn += extra
        legend_x = 1.13
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    legend = ax.legend(
        drawn,
        [line.get_label() for line in drawn],
        frameon=False,
        fontsize=BASE_FONT,
        loc="upper left",
        bbox_to_anchor=(legend_x, 1.0),
    )
    _literal(legend.get_texts())
    n_tokens = next(iter(evaluations.values())).n_tokens
    ax.set_title(title if title is not None else f"{' vs '.join(evaluations)} lens over {n_tokens:,} tokens")
    return fig


def _comparison_statistics(statistics: Sequence[str], band: Optional[Sequence[float]]) -> Tuple[List[str], List[str]]:
    """``(nats, rates)`` asked for, in the order given; a clear error for anything else."""
    plotted = NATS_STATISTICS + RATE_STATISTICS
    wanted = [statistics] if isinstance(statistics, str) else list(statistics)
    if not wanted or [s for s in wanted if s not in plotted]:
        raise LensInputError(f"statistics must be a non-empty selection of {plotted}, got {statistics!r}")
    if band is not None:
        try:
            low, high = (float(q) for q in band)
        except (TypeError, ValueError):
            low = high = float("nan")
        if not 0 <= low <= high <= 1:
            raise LensInputError(f"band must be None or (low, high) quantiles, 0 <= low <= high <= 1; got {band!r}")
    return [s for s in wanted if s in NATS_STATISTICS], [s for s in wanted if s in RATE_STATISTICS]


def _comparison_curve(ev: Any, stat: str) -> Any:
    """``[layer]``: a rate as it is, a statistic in nats as its mean."""
    return getattr(ev, stat) if stat in RATE_STATISTICS else ev.mean(stat)


def _lens_line_styles(lines: List[Any], stats: List[str]) -> None:
    """Colour per statistic, line style and marker per lens; ``lines`` go lens by lens, statistic by statistic."""
    for number, line in enumerate(lines):
        style = LINE_STYLES[(number // len(stats)) % len(LINE_STYLES)]
        line.set_color(METRIC_STYLE[stats[number % len(stats)]].color)
        line.set_linestyle(style.linestyle)
        line.set_marker(style.marker)
