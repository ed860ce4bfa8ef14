"""Where two runs diverge: heatmaps of a :class:`~tl_logitlens.RunComparison` (static and interactive).

Rows are stack entries (``0_pre`` at the bottom, ``final_post`` at the top, as in the lens
heatmaps), columns the positions of one prompt, labelled ``clean → corrupted`` where the input
tokens differ. The colour is one statistic (KL, JS or TV); the interactive view hovers all three.

Example::

    >>> import tl_logitlens as tll
    >>> runs = tll.compare_runs(tll.demo_model(), "red cat sun", "red dog sun")
    >>> fig = plot_divergence(runs, statistic="tv")
    >>> fig.axes[0].get_title()
    'total variation, prompt 0 (logit lens)'
"""

from __future__ import annotations

from typing import Any, List, Optional

from ..errors import LensInputError
from ..tokentext import display_token

_NAMES = {"kl": "KL(clean || corrupted), nats", "js": "Jensen-Shannon divergence, nats", "tv": "total variation"}
_TITLES = {"kl": "KL divergence", "js": "Jensen-Shannon divergence", "tv": "total variation"}


def _check(runs: Any, statistic: str, prompt: int) -> None:
    if statistic not in _NAMES:
        raise LensInputError(f"statistic must be one of {sorted(_NAMES)}, got {statistic!r}")
    batch = runs.kl.shape[1]
    if isinstance(prompt, bool) or not isinstance(prompt, int) or not 0 <= prompt < batch:
        raise LensInputError(f"prompt must be an int in [0, {batch}), got {prompt!r}")


def column_labels(runs: Any, prompt: int) -> List[str]:
    """One label per position: the token, or ``clean → corrupted`` where the two inputs differ."""
    out = []
    for a, b in zip(runs.clean_tokens[prompt], runs.corrupted_tokens[prompt]):
        out.append(display_token(a) if a == b else f"{display_token(a)} → {display_token(b)}")
    return out


def plot_divergence(
    runs: Any, *, statistic: str = "js", prompt: int = 0, ax: Optional[Any] = None, cmap: str = "magma_r"
) -> Any:
    """Heatmap ``[entry, position]`` of ``statistic`` (``"kl"``, ``"js"`` or ``"tv"``) for one prompt."""
    import matplotlib.pyplot as plt

    _check(runs, statistic, prompt)
    values = runs.statistic(statistic)[:, prompt].numpy()
    n_entry, n_pos = values.shape
    if ax is None:
        fig, ax = plt.subplots(figsize=(min(6.9, 1.2 + 0.45 * n_pos), 1.2 + 0.25 * n_entry), layout="constrained")
    fig = ax.figure
    limit = {"js": 0.6931471805599453, "tv": 1.0}.get(statistic)
    image = ax.imshow(values, origin="lower", aspect="auto", cmap=cmap, vmin=0.0, vmax=limit)
    ax.set_yticks(range(n_entry), runs.labels)
    ax.set_xticks(range(n_pos), column_labels(runs, prompt), rotation=60, ha="right")
    for tick in ax.get_xticklabels():
        tick.set_parse_math(False)
    ax.set_ylabel("stack entry")
    ax.set_xlabel("position (clean → corrupted where they differ)")
    ax.set_title(f"{_TITLES[statistic]}, prompt {prompt} ({runs.lens_name} lens)")
    fig.colorbar(image, ax=ax, label=_NAMES[statistic])
    return fig


def divergence_figure(runs: Any, *, statistic: str = "js", prompt: int = 0) -> Any:
    """The interactive heatmap: ``statistic`` coloured, KL, JS and TV in each tooltip, a menu per statistic."""
    import plotly.graph_objects as go

    _check(runs, statistic, prompt)
    ticks = column_labels(runs, prompt)
    stats = {s: runs.statistic(s)[:, prompt] for s in _NAMES}
    hover = [
        [
            f"{label} · pos {int(runs.positions[prompt, j])} · {ticks[j]}<br>"
            + " · ".join(f"{s.upper()} {float(stats[s][e, j]):.4g}" for s in _NAMES)
            for j in range(len(ticks))
        ]
        for e, label in enumerate(runs.labels)
    ]
    traces = [
        go.Heatmap(
            z=stats[s].tolist(),
            x=list(range(len(ticks))),
            y=runs.labels,
            text=hover,
            hoverinfo="text",
            colorscale="Magma",
            reversescale=True,
            zmin=0.0,
            colorbar={"title": {"text": _NAMES[s]}},
            visible=s == statistic,
            name=s,
        )
        for s in _NAMES
    ]
    fig = go.Figure(traces)
    buttons = [
        {"label": _TITLES[s], "method": "update", "args": [{"visible": [t == s for t in _NAMES]}]} for s in _NAMES
    ]
    fig.update_layout(
        meta={"view": "divergence"},
        title=f"where two runs diverge: prompt {prompt} ({runs.lens_name} lens)",
        xaxis={"tickmode": "array", "tickvals": list(range(len(ticks))), "ticktext": ticks, "title": "position"},
        yaxis={"title": "stack entry"},
        updatemenus=[{"buttons": buttons, "x": 0.0, "y": 1.12, "xanchor": "left", "yanchor": "bottom"}],
        margin={"t": 90},
    )
    return fig
