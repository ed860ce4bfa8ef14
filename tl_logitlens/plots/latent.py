"""The latent-language figure of Wendler et al. (2024): per layer, each language's probability with its band.

One line per token group (the mean over prompts of the group's summed probability at the last
position) with its 95% confidence band, stack entries along the x axis (``0_pre`` left,
``final_post`` right), and under it a strip coloured by the mean entropy of the reading, as in the
paper. The interactive view hovers each point's mean, interval and entropy.

Example::

    >>> import tl_logitlens as tll
    >>> out = tll.latent_language(tll.demo_model(), ["red cat", "blue sky"], {"a": ["sun", "sea"], "b": ["cat", "sky"]})
    >>> fig = plot_latent_language(out)
    >>> [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    ['a', 'b']
"""

from __future__ import annotations

from typing import Any, Optional

from .style import resolve_width

_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def plot_latent_language(result: Any, *, width: Any = "page", title: Optional[str] = None) -> Any:
    """Lines with 95% bands per group over the stack entries, and the mean-entropy strip beneath."""
    import matplotlib.pyplot as plt

    n = len(result.labels)
    fig, (ax, strip) = plt.subplots(
        2,
        1,
        sharex=True,
        figsize=(min(resolve_width(width), 1.5 + 0.3 * n), 3.4),
        gridspec_kw={"height_ratios": [6, 1]},
        layout="constrained",
    )
    x = list(range(n))
    low, high, mean = result.ci_low.clamp(0, 1), result.ci_high.clamp(0, 1), result.mean
    for j, name in enumerate(result.group_names):
        colour = _COLOURS[j % len(_COLOURS)]
        ax.plot(x, mean[:, j].numpy(), color=colour, marker="o", markersize=3, label=name)
        ax.fill_between(x, low[:, j].numpy(), high[:, j].numpy(), color=colour, alpha=0.2, linewidth=0)
    ax.set_ylabel("probability")
    ax.set_ylim(0, max(0.05, float(high.max()) * 1.05))
    ax.legend(loc="upper left", frameon=False)
    ax.set_title(
        title
        or f"{len(result.prompts)} prompts ({len(result.dropped)} dropped), {result.lens_name} lens; bands: 95% CI",
        fontsize=9,
    )
    image = strip.imshow(
        result.mean_entropy.numpy()[None, :], aspect="auto", cmap="viridis", extent=(-0.5, n - 0.5, 0, 1)
    )
    strip.set_yticks([])
    strip.set_ylabel("entropy", rotation=0, ha="right", va="center")
    fig.colorbar(image, ax=strip, label="nats", location="right", aspect=5)
    step = max(1, n // 12)
    strip.set_xticks(x[::step], result.labels[::step], rotation=45, ha="right")
    strip.set_xlabel("stack entry")
    return fig


def latent_language_figure(result: Any) -> Any:
    """The interactive figure: lines with bands per group, hover with mean, interval and mean entropy."""
    import plotly.graph_objects as go

    traces = []
    ent = result.mean_entropy
    for j, name in enumerate(result.group_names):
        colour = _COLOURS[j % len(_COLOURS)]
        low, high, mean = result.ci_low[:, j], result.ci_high[:, j], result.mean[:, j]
        traces.append(
            go.Scatter(
                x=result.labels + result.labels[::-1],
                y=high.tolist() + low.tolist()[::-1],
                fill="toself",
                fillcolor=colour,
                opacity=0.2,
                line={"width": 0},
                hoverinfo="skip",
                showlegend=False,
            )
        )
        hover = [
            f"{label} · {name}<br>mean {float(mean[e]):.4g} (95% CI {float(low[e]):.4g} to {float(high[e]):.4g})"
            f"<br>entropy {float(ent[e]):.4g} nats"
            for e, label in enumerate(result.labels)
        ]
        traces.append(
            go.Scatter(
                x=result.labels, y=mean.tolist(), name=name, line={"color": colour}, text=hover, hoverinfo="text"
            )
        )
    fig = go.Figure(traces)
    fig.update_layout(
        meta={"view": "latent_language"},
        title=f"latent language: {len(result.prompts)} prompts ({len(result.dropped)} dropped), "
        f"{result.lens_name} lens",
        xaxis={"title": "stack entry"},
        yaxis={"title": "probability (mean, 95% CI)"},
    )
    return fig
