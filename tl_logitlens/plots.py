"""Figures of logit-lens and direct-logit-attribution results (matplotlib).

Every function takes a result object (:class:`~tl_logitlens.LensResult` or
:class:`~tl_logitlens.Attribution`) as its one positional argument, and everything else by
keyword, ``ax=`` first: it draws into ``ax`` when one is given (otherwise into a new figure
sized to the data), and returns the ``Figure``. Nothing here runs the model.

Conventions shared by all figures:

- Token text is drawn as :func:`tl_logitlens.tokentext.display_token` of the decoded token
  (leading/trailing spaces ``␣``, newlines ``⏎``, tabs ``⇥``) with ``parse_math=False`` and
  ``usetex=False``, so ``$``, ``_`` and ``\\`` show as themselves. Without a tokenizer a
  token id ``i`` reads ``#i``.
- Logit-lens heatmaps put the first stack entry (``0_pre``) at the bottom and ``final_post``
  at the top, as in nostalgebraist's original logit-lens plots; the image array is in the
  result's own layer order (``origin="lower"``). Cells whose top-1 token is the true next
  token are boxed and their text is bold.
- Several prompts are summarised by their mean, with a quantile band (trajectories: 25-75%,
  per-layer statistics: 10-90%) or error bars of one standard deviation across prompts
  (attribution bars: the spread of the effect, not the uncertainty of the mean).
- Signed attributions use the diverging ``RdBu`` map with limits symmetric about zero
  (blue: pushes towards the answer, red: against).

New figures are made with ``pyplot`` (so ``plt.show()`` and notebook display work) with
constrained layout; call ``plt.close(fig)`` when making many.

Example::

    >>> import tl_logitlens as tll
    >>> from tl_logitlens.plots import plot_lens
    >>> model = tll.demo_model()
    >>> result = tll.logit_lens(model, tll.demo.induction_prompt(model), targets="next")
    >>> fig = plot_lens(result, metric="rank")
    >>> fig.axes[0].get_ylabel()
    'stack entry'
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import matplotlib.colors as mcolors
import numpy as np
import torch

from .tokentext import LITERAL_TEXT, display_token, token_text

__all__ = [
    "LENS_METRICS",
    "TRAJECTORY_METRICS",
    "ATTRIBUTION_KINDS",
    "plot_lens",
    "plot_trajectory",
    "plot_lens_metrics",
    "plot_layer_curves",
    "plot_attribution",
    "plot_attribution_positions",
]

#: ``metric`` of :func:`plot_lens` -> (colour-bar label, colour map). Dark always means
#: "confident / right": high probability or logit, low rank, entropy, KL or loss.
LENS_METRICS: Dict[str, Tuple[str, str]] = {
    "prob": ("top-1 probability", "Blues"),
    "logit": ("top-1 logit", "Blues"),
    "rank": ("rank of true next token (1 = top)", "Blues_r"),
    "entropy": ("entropy (nats)", "Blues_r"),
    "kl": ("KL(final \u2016 layer) (nats)", "Blues_r"),
    "loss": ("loss on the true next token (nats)", "Blues_r"),
}
#: ``metric`` of :func:`plot_trajectory`.
TRAJECTORY_METRICS = ("prob", "rank", "logit")
#: ``kind`` of :func:`plot_attribution`.
ATTRIBUTION_KINDS = ("bar", "line", "heatmap", "barh")

_DEFAULT_KIND = {"component": "bar", "accumulated": "line", "head": "heatmap", "neuron": "barh"}
_POS_COLOR, _NEG_COLOR = "#2166ac", "#b2182b"  # the ends of RdBu
_MARK_COLOR = "#e66101"
_NAN_COLOR = "#d9d9d9"
_MAX_WIDTH, _MAX_HEIGHT = 16.0, 14.0  # inches
_MAX_LENS_WIDTH = 20.0  # the lens heatmap may be wider: one column per token
_NEURON = re.compile(r"^L\d+N\d+$")
_FONT = 9.0  # base font size, points
_CHAR_W = 0.62 / 72  # average glyph width per point of font size, inches


# -- small helpers ---------------------------------------------------------------------------
def _new_axes(ax: Any, figsize: Tuple[float, float]) -> Tuple[Any, Any]:
    """``(figure, axes)``: the given axes and its figure, or a new constrained-layout figure."""
    if ax is not None:
        return ax.figure, ax
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _axes_inches(ax: Any) -> Tuple[float, float]:
    """The current size of an axes in inches."""
    box = ax.get_window_extent()
    dpi = ax.figure.dpi
    return box.width / dpi, box.height / dpi


def _clamp(x: float, lo: float, hi: float) -> float:
    return max(lo, min(hi, x))


def _font_for(cell_width: float, cell_height: float, chars: int) -> float:
    """The largest font size (<= base) at which ``chars`` characters fit one cell."""
    by_width = (cell_width - 0.06) / (_CHAR_W * max(chars, 1))
    by_height = cell_height * 72 / 1.6
    return _clamp(min(_FONT, by_width, by_height), 5.0, _FONT)


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
        kwargs.update(rotation=rotation, ha="right" if rotation < 90 else "center", rotation_mode="anchor" if rotation < 90 else "default")
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


def _np(t: Any) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=float)


def _with_pos(t: Optional[torch.Tensor], has_pos: bool, dim: int) -> Optional[torch.Tensor]:
    """Insert a length-1 position axis at ``dim`` for results read at one int position."""
    if t is None or has_pos:
        return t
    return t.unsqueeze(dim)


def _check_batch(batch: Any, n_batch: int, what: str) -> None:
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)):
        raise ValueError(f"batch must be an int prompt index, got {batch!r}")
    if not -n_batch <= int(batch) < n_batch:
        raise ValueError(f"batch={batch} is out of range: the {what} holds {n_batch} prompt(s) (0..{n_batch - 1})")



def _batch_rows(batch: Any, n_batch: int) -> List[int]:
    """Prompts to draw: every one for ``None``, else an index or a list of them (negative allowed)."""
    if batch is None:
        return list(range(n_batch))
    rows = [batch] if isinstance(batch, (int, np.integer)) else list(batch)
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
            raise ValueError(f"positions must be None, a slice or a list of column indices, got {positions!r}")
        bad = [p for p in positions if not -n_cols <= p < n_cols]
        if bad:
            raise ValueError(
                f"positions {bad} are out of range: the result has {n_cols} position column(s) "
                f"(0..{n_cols - 1}); positions= indexes the result's columns, not the input"
            )
        cols = [int(p) % n_cols for p in positions]
    if not cols:
        raise ValueError(f"positions={positions!r} selects no column of the {n_cols} in the result")
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
    """``target_ranks[..., 0]`` when the lens ran with ``targets="next"``, else ValueError."""
    mend = 'run tll.logit_lens(model, input, targets="next") to get the rank of the true next token'
    if result.target_ranks is None:
        raise ValueError(f"metric='rank' needs target ranks, but this result has no targets; {mend}")
    if not _targets_are_next(result):
        raise ValueError(
            f"metric='rank' shows the rank of the true next token, but this result's targets are "
            f"other tokens; {mend} (use plot_trajectory(result, metric='rank') for chosen targets)"
        )
    return result.target_ranks[..., 0]


def plot_lens(
    result: Any,
    *,
    ax: Any = None,
    metric: str = "prob",
    batch: int = 0,
    positions: Any = None,
    annotate: bool = True,
    mark_next: bool = True,
    fontsize: Optional[float] = None,
    cmap: Optional[str] = None,
) -> Any:
    """The logit-lens heatmap: every layer's top-1 token at every position of one prompt.

    Rows are the stack entries (``result.labels``, ``0_pre`` at the bottom, ``final_post``
    at the top); columns are the positions read, labelled with the input tokens below (the
    position index without input tokens) and with the true next tokens above. Each cell
    shows that layer's top-1 token, and its colour is ``metric``:

    - ``"prob"``: the top-1 probability, ``top_probs[layer, batch, pos, 0]`` (0..1)
    - ``"logit"``: the top-1 logit, ``top_logits[..., 0]``
    - ``"rank"``: the rank of the true next token plus one (1 = top-1) on a log scale;
      needs a result from ``logit_lens(..., targets="next")``
    - ``"entropy"``, ``"kl"`` (``kl_to_final``), ``"loss"`` (``next_token_loss``), nats

    Cells whose top-1 token is the true next token (``result.next_ids``) are boxed and
    their text is bold. Grey cells have no value (no next token). Padding positions of the
    prompt (beyond ``result.lengths[batch]``) are left out.

    Args:
        result: a :class:`~tl_logitlens.LensResult`; ``[layer, batch, pos, ...]`` or, after
            an int ``positions`` in ``logit_lens``, ``[layer, batch, ...]`` (one column).
        metric: one of :data:`LENS_METRICS`.
        batch: which prompt to show.
        positions: a window of columns: a slice or a list of column indices into the
            result's position axis (``slice(-20, None)``: the last 20).
        ax: a matplotlib ``Axes`` to draw into; the colour bar is added next to it.
        annotate: write the top-1 token in each cell.
        mark_next: box the cells whose top-1 token is the true next token.
        fontsize: cell text size in points (default: fitted to the cell size).
        cmap: a colour map name to use instead of the metric's default.

    Returns:
        The ``Figure``. ``fig.axes[0]`` holds the heatmap (an ``AxesImage`` of shape
        ``[layer, shown positions]``), ``fig.axes[1]`` the colour bar.

    Example::

        >>> import tl_logitlens as tll
        >>> from tl_logitlens.plots import plot_lens
        >>> model = tll.demo_model()
        >>> result = tll.logit_lens(model, tll.demo.induction_prompt(model), targets="next")
        >>> fig = plot_lens(result, metric="prob", positions=slice(-8, None))
        >>> fig.axes[0].images[0].get_array().shape
        (3, 8)
    """
    if metric not in LENS_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(LENS_METRICS)}")
    n_batch = int(result.lengths.shape[0])
    _check_batch(batch, n_batch, "result")
    batch = int(batch) % n_batch
    has_pos = result.has_pos_axis
    top_ids = _with_pos(result.top_ids, has_pos, 2)  # [layer, batch, pos, k]
    next_ids = _with_pos(result.next_ids, has_pos, 1)  # [batch, pos]
    n_cols = int(result.positions.shape[1])
    cols = _select_columns(positions, n_cols)
    length = int(result.lengths[batch])
    cols = [j for j in cols if int(result.positions[batch, j]) < length]
    if not cols:
        raise ValueError(
            f"the positions selected are all padding for prompt {batch}, which has {length} tokens"
        )

    if metric == "rank":
        field = _rank_from_next(result).float() + 1
    else:
        field = {
            "prob": lambda: result.top_probs[..., 0],
            "logit": lambda: result.top_logits[..., 0],
            "entropy": lambda: result.entropy,
            "kl": lambda: result.kl_to_final,
            "loss": lambda: result.next_token_loss,
        }[metric]()
    field = _with_pos(field, has_pos, 2)
    index = torch.tensor(cols)
    values = _np(field[:, batch, index])  # [layer, col]
    nxt = next_ids[batch, index]  # [col]
    if metric == "rank":
        values[:, (nxt < 0).numpy()] = np.nan
    top1 = top_ids[:, batch, index, 0]  # [layer, col]
    hits = ((top1 == nxt.unsqueeze(0)) & (nxt >= 0).unsqueeze(0)).numpy()

    decode = _decoder(result.tokenizer)
    cell_text = [[decode(t) for t in row] for row in top1.tolist()]
    if result.input_ids is not None:
        abs_pos = result.positions[batch, index]
        x_labels = [decode(t) for t in result.input_ids[batch, abs_pos].tolist()]
        x_title = "input token"
    else:
        x_labels = [str(int(p)) for p in result.positions[batch, index]]
        x_title = "position (no input tokens given)"
    next_labels = [decode(t) if t >= 0 else "" for t in nxt.tolist()]
    show_next = bool((nxt >= 0).any())

    n_rows, n_shown = values.shape
    # Cells are sized for a typical token (80th percentile of lengths), tick labels for the longest.
    sizes = sorted(len(s) for s in [*x_labels, *(c for row in cell_text for c in row)])
    chars = min(10, sizes[int(0.8 * (len(sizes) - 1))])
    tick_chars = min(16, max(len(s) for s in [*x_labels, *next_labels]))
    if ax is None:
        cell_w = max(0.5, _CHAR_W * _FONT * chars + 0.14)
        extra_w = 2.9  # y labels and the colour bar
        grid_w = min(cell_w * n_shown, _MAX_LENS_WIDTH - extra_w)
        cell_w = grid_w / n_shown
        font = fontsize or _font_for(cell_w, 0.34, chars)
        cell_h = 0.34 if n_rows <= 30 else max(0.2, 10.0 / n_rows)
        tick_w = _CHAR_W * font * tick_chars
        label_h = tick_w + 0.1 if tick_w > cell_w else 0.25
        height = _clamp(n_rows * cell_h + 1.3 + label_h * (2 if show_next else 1), 2.4, _MAX_HEIGHT)
        fig, ax = _new_axes(None, (grid_w + extra_w, height))
    else:
        fig = ax.figure
        width, height = _axes_inches(ax)
        cell_w = width / n_shown
        font = fontsize or _font_for(cell_w, height / n_rows, chars)
    rotation = 0 if _CHAR_W * font * tick_chars <= cell_w else 90

    label, default_cmap = LENS_METRICS[metric]
    colormap = _get_cmap(cmap or default_cmap).with_extremes(bad=_NAN_COLOR)
    finite = values[np.isfinite(values)]
    if metric == "prob":
        norm = mcolors.Normalize(0.0, 1.0)
    elif metric == "rank":
        top = float(finite.max()) if finite.size else 10.0
        norm = mcolors.LogNorm(vmin=1.0, vmax=max(top, 10.0))
    elif metric in ("entropy", "kl", "loss"):
        norm = mcolors.Normalize(0.0, max(float(finite.max()) if finite.size else 1.0, 1e-6))
    else:
        norm = mcolors.Normalize(*(float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0))
    image = ax.imshow(
        np.ma.masked_invalid(values), origin="lower", aspect="auto", cmap=colormap, norm=norm,
        interpolation="nearest",
    )
    bar = fig.colorbar(image, ax=ax, pad=0.02, fraction=0.05 if n_shown > 6 else 0.08)
    bar.set_label(label)
    if metric == "rank":
        _plain_log_ticks(bar.ax.yaxis)

    from matplotlib.patches import Rectangle

    for i in range(n_rows):
        for j in range(n_shown):
            if annotate:
                ax.text(
                    j, i, cell_text[i][j], ha="center", va="center", fontsize=font,
                    color=_text_color(colormap, norm, values[i, j]),
                    fontweight="bold" if (mark_next and hits[i, j]) else "normal",
                    clip_on=True, gid="tll-top1", **LITERAL_TEXT,
                )
            if mark_next and hits[i, j]:
                ax.add_patch(Rectangle(
                    (j - 0.44, i - 0.42), 0.88, 0.84, fill=False, edgecolor=_MARK_COLOR,
                    linewidth=1.6, gid="tll-next-marker",
                ))

    _set_ticklabels(ax.xaxis, x_labels, rotation, font)
    _set_ticklabels(ax.yaxis, result.labels, 0, min(_FONT, max(font, 6.5)))
    ax.set_xlabel(x_title)
    ax.set_ylabel("stack entry")
    if show_next:
        top_axis = ax.secondary_xaxis("top")
        _set_ticklabels(top_axis.xaxis, next_labels, rotation, font)
        top_axis.set_xlabel("true next token")
    title = f"{_lens_words(result)}: top-1 token per layer (norm={result.norm!r}"
    title += ")" if n_batch == 1 else f", prompt {batch})"
    if mark_next and hits.any():
        title += "\nboxed, bold: top-1 is the true next token"
    ax.set_title(title, fontsize=_FONT + 1)
    ax.tick_params(length=0)
    return fig


def _plain_log_ticks(axis: Any) -> None:
    """Log-axis tick labels as plain numbers (1, 10, 100, 20, 50) instead of mathtext powers."""
    from matplotlib.ticker import LogFormatter

    axis.set_major_formatter(LogFormatter())
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _get_cmap(name: Any) -> Any:
    import matplotlib

    return matplotlib.colormaps[name] if isinstance(name, str) else name


# -- trajectories of chosen tokens -----------------------------------------------------------
def _read_columns(result: Any, position: int, rows: List[int]) -> List[int]:
    """The position column read for each prompt in ``rows`` (see :func:`plot_trajectory`)."""
    if not result.has_pos_axis:
        if position not in (0, -1):
            raise ValueError(
                f"position={position}: this result was read at one position only "
                "(logit_lens(..., positions=<int>)); leave position at its default"
            )
        return [0] * len(rows)
    cols = []
    for b in rows:
        valid = [j for j in range(result.positions.shape[1]) if int(result.positions[b, j]) < int(result.lengths[b])]
        if not -len(valid) <= position < len(valid):
            raise ValueError(
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
            raise ValueError(f"target must be an index, a token id or a token string, got {item!r}")
        if not hits:
            raise ValueError(
                f"target {item!r} is not among this result's targets: indices 0..{n_t - 1}, "
                f"ids {[s for s in shared if s is not None]}, tokens {[n for n in names if n is not None]}"
            )
        picked.extend(hits)
    return picked


def plot_trajectory(
    result: Any,
    *,
    ax: Any = None,
    target: Any = None,
    metric: str = "prob",
    position: Optional[int] = None,
    batch: Optional[Union[int, Sequence[int]]] = None,
) -> Any:
    """How one or more target tokens fare across layers: probability, rank or logit.

    One line per target over the stack entries (x = ``result.labels``), read from
    ``result.target_probs`` / ``target_ranks`` / ``target_logits`` (``[layer, batch, pos,
    t]``, or ``[layer, batch, t]`` for a result read at one int position) at one position.
    With several prompts the line is the mean over prompts and the shaded band spans the
    25-75% quantiles. ``"rank"`` is drawn as rank + 1 (1 = top-1) on a log axis.

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
        batch: ``None`` (all prompts), one prompt index, or a list of them.

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
        'log'
    """
    if metric not in TRAJECTORY_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(TRAJECTORY_METRICS)}")
    if result.target_ids is None:
        raise ValueError(
            "this result has no targets; run tll.logit_lens(model, input, targets=...) with the "
            "tokens to follow (a token, a list of tokens, or 'next')"
        )
    rows = _batch_rows(batch, int(result.lengths.shape[0]))
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
    if metric == "rank":
        values = values + 1

    nxt = _with_pos(result.next_ids, has_pos, 1)[r_idx, c_idx]  # [prompts]
    if is_next:
        # targets="next": no target where there is no next token (a prompt's last token).
        values[:, (nxt < 0).numpy(), :] = np.nan
        if not bool((nxt >= 0).any()):
            raise ValueError(
                f"this result's targets are the true next tokens, and position={position} is each "
                "prompt's last token, which has no next token; pass position=-2 (or another column)"
            )
    raw = (lambda i: f"#{int(i)}") if result.tokenizer is None else result.decode  # noqa: E731
    chosen = list(range(ids.shape[1])) if target is None else _pick_targets(target, ids, raw)
    decode = _decoder(result.tokenizer)

    fig, ax = _new_axes(ax, (_clamp(1.6 + 0.55 * len(result.labels), 6.0, _MAX_WIDTH), 3.8))
    x = np.arange(len(result.labels))
    for t in chosen:
        column = ids[:, t][nxt >= 0] if is_next else ids[:, t]
        shared = bool((column == column[0]).all())
        if is_next:
            name = "true next token" + (f" ({decode(int(column[0]))})" if shared else "")
        elif shared:
            name = decode(int(column[0]))
        else:
            name = f"target {t} (differs by prompt)"
        v = values[:, :, t]
        v = v[:, np.isfinite(v).all(0)]  # prompts without a next token drop out
        (line,) = ax.plot(x, v.mean(1), marker="o", markersize=4, label=name)
        if v.shape[1] > 1:
            low, high = np.quantile(v, [0.25, 0.75], axis=1)
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.18, linewidth=0)
    _set_ticklabels(ax.xaxis, result.labels, 45 if len(result.labels) > 10 else 0)
    ax.set_xlabel("stack entry")
    ax.set_xlim(-0.3, len(x) - 0.7)
    if metric == "rank":
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
        ax.set_ylabel("rank of target (1 = top-1)")
    elif metric == "prob":
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("probability of target")
    else:
        ax.set_ylabel("logit of target")
    ax.grid(True, alpha=0.3)

    positions = sorted({int(result.positions[b, c]) for b, c in zip(rows, cols)})
    if len(positions) == 1:
        where = f"position {positions[0]}"
        if result.input_ids is not None:
            words = {int(result.input_ids[b, positions[0]]) for b in rows}
            if len(words) == 1:
                where += f" ({decode(words.pop())})"
    else:
        where = {-1: "each prompt's last position", -2: "each prompt's last position but one"}.get(
            position, f"column {position} of each prompt"
        )
    title = f"Target {metric} across layers at {where}"
    if getattr(result, "lens_name", "logit") != "logit":
        title += f" ({result.lens_name} lens)"
    if len(rows) > 1:
        title += f"\nmean over {len(rows)} prompts, band: 25\u201375% quantiles"
    ax.set_title(title, **LITERAL_TEXT)
    legend = ax.legend(title="target", fontsize=_FONT, frameon=False)
    _literal(legend.get_texts())
    return fig


# -- per-layer statistics --------------------------------------------------------------------
def plot_layer_curves(
    labels: Sequence[str],
    curves: Mapping[str, Sequence[Any]],
    *,
    ax: Any = None,
    title: Optional[str] = None,
    ylabel: Optional[str] = None,
    logy: bool = False,
) -> Any:
    """Per-layer curves, each a line with a shaded band: the shared drawing of layer statistics.

    Used by :func:`plot_lens_metrics` and by anything else that summarises a quantity per
    stack entry (dataset evaluations), so all such figures look alike.

    Args:
        labels: ``[layer]`` stack entry labels, the x axis.
        curves: ``name -> (mean, low, high)``, each ``[layer]`` (tensor, array or list);
            ``low``/``high`` bound the band and may be ``None`` (or the tuple just
            ``(mean,)``) for no band. NaN entries leave gaps.
        ax: a matplotlib ``Axes`` to draw into.
        title: the axes title.
        ylabel: the y axis label.
        logy: log y axis.

    Returns:
        The ``Figure``; ``ax.lines[i]`` is the ``i``-th curve's mean, labelled ``name``.

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
        raise ValueError("curves is empty; pass {name: (mean, low, high)} with one value per label")
    fig, ax = _new_axes(ax, (_clamp(3.2 + 0.55 * len(labels), 7.2, _MAX_WIDTH), 3.8))
    x = np.arange(len(labels))
    for name, curve in curves.items():
        parts = list(curve) if isinstance(curve, (tuple, list)) else [curve]
        if len(parts) not in (1, 3):
            raise ValueError(f"curve {name!r} must be (mean, low, high) or (mean,), got {len(parts)} items")
        mean = _np(parts[0]).reshape(-1)
        if mean.shape[0] != len(labels):
            raise ValueError(f"curve {name!r} has {mean.shape[0]} values but there are {len(labels)} labels")
        (line,) = ax.plot(x, mean, marker="o", markersize=4, label=name)
        if len(parts) == 3 and parts[1] is not None and parts[2] is not None:
            low, high = _np(parts[1]).reshape(-1), _np(parts[2]).reshape(-1)
            if low.shape != mean.shape or high.shape != mean.shape:
                raise ValueError(
                    f"curve {name!r}: mean, low and high must all have {len(labels)} values, got "
                    f"{mean.shape[0]}, {low.shape[0]}, {high.shape[0]}"
                )
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.18, linewidth=0)
    _set_ticklabels(ax.xaxis, labels, 45 if len(labels) > 10 else 0)
    ax.set_xlim(-0.3, len(x) - 0.7)
    ax.set_xlabel("stack entry")
    if ylabel:
        ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    legend = ax.legend(fontsize=_FONT, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _literal(legend.get_texts())
    return fig


def plot_lens_metrics(
    result: Any,
    *,
    ax: Any = None,
    batch: Optional[Union[int, Sequence[int]]] = None,
    quantiles: Tuple[float, float] = (0.1, 0.9),
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
        batch: ``None`` (all prompts), one prompt index, or a list of them.
        quantiles: the band's ``(low, high)`` quantiles.

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
        raise ValueError(f"quantiles must satisfy 0 <= low <= high <= 1, got {quantiles}")
    rows = _batch_rows(batch, int(result.lengths.shape[0]))
    has_pos = result.has_pos_axis
    real = result.positions < result.lengths.unsqueeze(1)  # [batch, pos]
    real = real[torch.tensor(rows)]
    curves: Dict[str, Tuple[Any, Any, Any]] = {}
    for name, field in (
        ("entropy", result.entropy),
        ("KL to final", result.kl_to_final),
        ("next-token loss", result.next_token_loss),
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
    return plot_layer_curves(result.labels, curves, ax=ax, title=title, ylabel="nats")


# -- direct logit attribution ----------------------------------------------------------------
def _pick_position(att: Any, position: int) -> Tuple[torch.Tensor, str]:
    """``values [component, batch]`` (one column of 3-D values) and words for the title."""
    if att.values.ndim == 2:
        return att.values, ""
    n_pos = att.values.shape[2]
    if not -n_pos <= position < n_pos:
        raise ValueError(f"position={position} is out of range: the attribution has {n_pos} position column(s)")
    col = position % n_pos
    absolute = sorted({int(p) for p in att.positions[:, col]})
    where = f"position {absolute[0]}" if len(absolute) == 1 else f"column {col}"
    return att.values[:, :, col], f" at {where} (of {n_pos}; plot_attribution_positions shows all)"


def _answer_words(att: Any) -> str:
    """``logit(␣Paris) − logit(␣Rome)`` when all prompts share the tokens, else generic."""
    decode = _decoder(att.tokenizer)

    def one(ids: Optional[torch.Tensor], generic: str) -> str:
        if ids is None:
            return ""
        ids = ids.reshape(-1)
        return decode(int(ids[0])) if bool((ids == ids[0]).all()) else generic

    text = f"logit({one(att.answer_ids, 'answer')})"
    if att.wrong_ids is not None:
        text += f" \u2212 logit({one(att.wrong_ids, 'wrong')})"
    return text


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
) -> Any:
    """Direct logit attribution as a figure: who writes the answer, and how much.

    The values are averaged over the prompts (``att.values.mean(1)`` = ``att.mean()``),
    with error bars of one standard deviation across prompts (the spread of the effect
    between prompts; none for one prompt). ``kind`` defaults from ``att.by``:

    - ``"component"`` -> ``"bar"``: one bar per component (embed, pos_embed, each
      attention and MLP layer, bias terms), blue positive and red negative.
    - ``"accumulated"`` -> ``"line"``: the accumulated stream's effect after each layer.
    - ``"head"`` -> ``"heatmap"``: ``att.by_head()`` averaged over prompts, ``[layer,
      head]`` (layer 0 at the top), diverging ``RdBu`` map with limits symmetric about
      zero and a colour bar. The non-head terms (embeddings, MLPs, biases) are not shown;
      ``kind="bar"`` shows every term.
    - ``"neuron"`` -> ``"barh"``: the ``top_k`` neurons with the largest ``|mean|``,
      strongest at the top, labelled ``L1N37``.

    The title names the answer (and wrong) token when all prompts share it, and the
    model's own value (mean over prompts) and the constant term (``b_U`` and the norm bias,
    which no component writes). An attribution taken at several positions
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
    if kind not in ATTRIBUTION_KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {list(ATTRIBUTION_KINDS)}")
    if kind == "heatmap" and att.by != "head":
        raise ValueError(
            f"kind='heatmap' draws a layer x head grid and needs an attribution made with by='head'; "
            f"this one is by={att.by!r}: use kind='bar' or 'barh'"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    values, where = _pick_position(att, int(position))  # [component, batch]
    n_prompts = values.shape[1]
    mean = values.mean(1)
    std = values.std(1) if n_prompts > 1 else None
    target = _answer_words(att)
    spread = "" if std is None else "\nerror bars: \u00b11 std across prompts"
    title = f"Direct logit attribution to {target}{where}\n{_model_value_words(att, int(position))}"
    value_label = f"direct effect on {target}"

    if kind == "heatmap":
        grid = att.by_head()  # [layer, head, batch(, pos)]
        if grid.ndim == 4:
            grid = grid[..., int(position) % grid.shape[3]]
        data = _np(grid.mean(2))  # [layer, head]
        n_layers, n_heads = data.shape
        if ax is None:
            fig, ax = _new_axes(None, (_clamp(2.8 + 0.5 * n_heads, 6.0, _MAX_WIDTH), _clamp(1.9 + 0.42 * n_layers, 3.2, _MAX_HEIGHT)))
        else:
            fig = ax.figure
        limit = float(np.abs(data).max()) or 1.0
        image = ax.imshow(
            data, cmap="RdBu", norm=mcolors.Normalize(-limit, limit), aspect="auto",
            interpolation="nearest",
        )
        bar = fig.colorbar(image, ax=ax, pad=0.02)
        bar.set_label(value_label, **LITERAL_TEXT)
        if annotate is None:
            annotate = data.size <= 256
        if annotate:
            fmt = ".2f" if limit >= 0.05 else ".2g"
            for i in range(n_layers):
                for j in range(n_heads):
                    ax.text(
                        j, i, format(data[i, j], fmt), ha="center", va="center",
                        fontsize=_clamp(_FONT - 0.15 * max(n_heads - 8, 0), 5.0, _FONT),
                        color=_text_color(image.cmap, image.norm, data[i, j]), gid="tll-value",
                    )
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        ax.set_xlabel("Head")
        ax.set_ylabel("Layer")
        ax.tick_params(length=0)
        ax.set_title(f"{title}\nheads only" + (f", mean over {n_prompts} prompts" if n_prompts > 1 else ""), **LITERAL_TEXT)
        return fig

    labels = list(att.labels)
    m, s = _np(mean), None if std is None else _np(std)
    if kind == "barh":
        order = [i for i in range(len(labels)) if _NEURON.match(labels[i])] if att.by == "neuron" else list(range(len(labels)))
        if not order:
            raise ValueError(f"this attribution (by={att.by!r}) has no neuron terms to rank")
        order = sorted(order, key=lambda i: -abs(m[i]))[: int(top_k)]
        pool = "neurons" if att.by == "neuron" else "terms"
        total = sum(1 for lab in labels if _NEURON.match(lab)) if att.by == "neuron" else len(labels)
        fig, ax = _new_axes(ax, (6.4, _clamp(1.6 + 0.26 * len(order), 3.0, _MAX_HEIGHT)))
        order = order[::-1]  # bottom to top: the strongest at the top
        y = np.arange(len(order))
        ax.barh(
            y, m[order], xerr=None if s is None else s[order],
            color=[_POS_COLOR if m[i] >= 0 else _NEG_COLOR for i in order],
            error_kw=dict(ecolor="0.3", capsize=2, elinewidth=0.8), gid="tll-bars",
        )
        ax.set_yticks(y)
        ax.set_yticklabels([labels[i] for i in order], **LITERAL_TEXT)
        ax.axvline(0, color="0.3", linewidth=0.8)
        ax.set_xlabel(value_label, **LITERAL_TEXT)
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_title(f"{title}\ntop {len(order)} of {total} {pool} by |mean|{spread}".replace("\nerror", "; error"), **LITERAL_TEXT)
        return fig

    width = _clamp(1.6 + 0.32 * len(labels), 6.4, _MAX_WIDTH)
    fig, ax = _new_axes(ax, (width, 4.2))
    x = np.arange(len(labels))
    if kind == "bar":
        ax.bar(
            x, m, yerr=s, color=[_POS_COLOR if v >= 0 else _NEG_COLOR for v in m],
            error_kw=dict(ecolor="0.3", capsize=2, elinewidth=0.8), gid="tll-bars",
        )
    else:
        ax.errorbar(x, m, yerr=s, marker="o", markersize=4, capsize=2, color=_POS_COLOR, gid="tll-line")
    ax.axhline(0, color="0.3", linewidth=0.8)
    rotate = len(labels) > 6 or max(len(label) for label in labels) > 8
    _set_ticklabels(ax.xaxis, labels, (90 if len(labels) > 24 else 45) if rotate else 0)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylabel(value_label, **LITERAL_TEXT)
    ax.set_xlabel("accumulated stream at" if kind == "line" else "component")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(f"{title}{spread}", **LITERAL_TEXT)
    return fig


def plot_attribution_positions(
    att: Any,
    *,
    ax: Any = None,
    batch: Optional[int] = 0,
    top_k: Optional[int] = None,
    tokens: Optional[Sequence[str]] = None,
) -> Any:
    """Direct logit attribution at every position: a component x position heatmap.

    For an attribution taken with ``positions=None`` (``values [component, batch, pos]``):
    rows are the components in their own order (``embed`` at the top), columns the
    positions, colour the direct effect on the answer's logit (difference) as read at that
    position, on the diverging ``RdBu`` map with limits symmetric about zero.

    Args:
        att: an :class:`~tl_logitlens.Attribution` with 3-D ``values``.
        batch: the prompt to show, or ``None`` for the mean over prompts.
        ax: a matplotlib ``Axes`` to draw into.
        top_k: keep only the ``top_k`` components with the largest ``|value|`` at any
            position (useful with ``by="neuron"``), in their original order.
        tokens: the input tokens as decoded strings, one per position column, for the x
            tick labels (drawn with :func:`~tl_logitlens.tokentext.display_token`);
            default: the absolute position.

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
        raise ValueError(
            f"this attribution was taken at one position (values {tuple(att.values.shape)} = "
            "[component, batch]); call tll.direct_logit_attribution(..., positions=None) to "
            "attribute at every position, or use plot_attribution"
        )
    n_comp, n_batch, n_pos = att.values.shape
    if batch is None:
        data = att.values.mean(1)
        which = f"mean of {n_batch} prompts"
        pos_row = att.positions[0] if bool((att.positions == att.positions[0]).all()) else None
    else:
        _check_batch(batch, n_batch, "attribution")
        batch = int(batch) % n_batch
        data = att.values[:, batch]
        which = f"prompt {batch}" if n_batch > 1 else ""
        pos_row = att.positions[batch]
    labels = list(att.labels)
    rows = list(range(n_comp))
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        strength = data.abs().amax(1)
        rows = sorted(strength.argsort(descending=True)[: int(top_k)].tolist())
    grid = _np(data[torch.tensor(rows)])  # [component, pos]
    if tokens is not None:
        tokens = list(tokens)
        if len(tokens) != n_pos:
            raise ValueError(f"tokens has {len(tokens)} entries but the attribution has {n_pos} positions")
        x_labels = [display_token(str(t)) for t in tokens]
        x_title = "token"
    else:
        x_labels = [str(int(p)) for p in pos_row] if pos_row is not None else [str(j) for j in range(n_pos)]
        x_title = "position" if pos_row is not None else "position column"
    chars = min(12, max(len(s) for s in x_labels))
    cell_w = max(0.3, _CHAR_W * _FONT * min(chars, 4) + 0.12)
    grid_w = min(cell_w * n_pos, _MAX_WIDTH - 3.2)
    cell_w = grid_w / n_pos
    if ax is None:
        height = _clamp(1.8 + 0.24 * len(rows) + _CHAR_W * _FONT * chars, 3.0, _MAX_HEIGHT)
        fig, ax = _new_axes(None, (grid_w + 3.2, height))
    else:
        fig = ax.figure
        cell_w = _axes_inches(ax)[0] / n_pos
    limit = float(np.abs(grid).max()) or 1.0
    image = ax.imshow(grid, cmap="RdBu", norm=mcolors.Normalize(-limit, limit), aspect="auto", interpolation="nearest")
    target = _answer_words(att)
    bar = fig.colorbar(image, ax=ax, pad=0.02)
    bar.set_label(f"direct effect on {target}", **LITERAL_TEXT)
    rotation = 0 if _CHAR_W * _FONT * chars <= cell_w else 90
    # rotated labels stack side by side: one line height (~1.3 x font size) per column
    font = _FONT if rotation == 0 else _clamp(cell_w * 72 / 1.3, 5.0, _FONT)
    _set_ticklabels(ax.xaxis, x_labels, rotation, font)
    _set_ticklabels(ax.yaxis, [labels[i] for i in rows], 0, _clamp(_FONT - 0.03 * max(len(rows) - 30, 0), 5.0, _FONT))
    ax.set_xlabel(x_title)
    ax.set_ylabel("component")
    ax.tick_params(length=0)
    subset = "" if top_k is None else f", top {len(rows)} of {n_comp} by max |value|"
    title = f"Direct logit attribution to {target} at each position"
    if which or subset:
        title += f"\n{which}{subset}".replace("\n, ", "\n")
    ax.set_title(title, **LITERAL_TEXT)
    return fig


def _lens_words(result: Any) -> str:
    """``"Logit lens"``, or the lens's name (``"Tuned lens"``) for a result read with another lens."""
    name = getattr(result, "lens_name", "logit") or "logit"
    return f"{name[:1].upper()}{name[1:]} lens"
