"""Interactive views: plotly figures of the results, and self-contained pages of them.

A logit-lens heatmap is read by hovering: each cell's tooltip lists its top-k tokens with
their probabilities, the target (the true next token with ``targets="next"``) with its
probability and rank, the entropy and the KL to the final layer. Menus switch the
coloured metric and the prompt. The head-attribution heatmap, attribution bars and
per-layer evaluation curves hover their values the same way. Nothing here runs a model:
every number is read from the result object.

Pages are self-contained (no network needed to open them) and small: plotly.js (4.8 MB
minified) and the figure's JSON are gzip-compressed and inlined as base-85 text (RFC 1924
alphabet with ``.`` in place of ``<``, so no ``<`` can end the script early); a
twenty-line loader inflates them with the browser's native ``DecompressionStream``
(Chromium 80+, Firefox 113+, Safari 16.4+). plotly.js 3 (plotly 7.1) then takes 1.84 MB
instead of 4.8 MB; a 12-layer x 128-position lens page of a random 5000-token model (the hard
case for compression) is 1.96 MB. Plain base 64 (native ``atob``) would not fit under 2 MB. Hover texts are formatted here, in
Python, so the page shows exactly the strings documented below; colours use values
rounded to 4 significant digits.

Tooltip of a lens cell (one line each; tokens spelled by
:func:`~tl_logitlens.tokentext.display_token`, numbers with ``:.4g``)::

    <label> · pos <p> · <input token>
    <token>  <prob>                       (top-k, best first)
    next <token>  p <prob>  rank <rank>   (target <token> ... with other targets)
    entropy <e> · KL <kl> nats

Requires plotly (``pip install tl-logitlens[interactive]``). The metric names and colour
scales live in :data:`LENS_METRICS`; the evaluation curves take their names and colours from
:data:`tl_logitlens.plots.style.METRIC_STYLE`, as the static figures do.

Example::

    >>> import tl_logitlens as tll
    >>> from tl_logitlens.plots.interactive import lens_figure
    >>> model = tll.demo_model()
    >>> result = tll.logit_lens(model, tll.demo.induction_prompt(model), targets="next")
    >>> fig = lens_figure(result)
    >>> [b["label"] for b in fig.layout.updatemenus[0].buttons]
    ['top-token probability', 'next-token probability', 'entropy', 'KL to final', 'next-token rank']
"""

from __future__ import annotations

import base64
import functools
import gzip
import html
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import LensInputError
from ..files import write_text
from ..tokentext import display_token, token_text
from .style import METRIC_STYLE

__all__ = [
    "LENS_METRICS",
    "lens_figure",
    "attribution_figure",
    "evaluation_figure",
    "comparison_figure",
    "figure",
    "page_html",
    "to_html",
    "show",
]

INSTALL_HINT = "interactive views need plotly: pip install tl-logitlens[interactive]"

#: Lens heatmap metrics: key -> (menu label, colorbar title, plotly colour scale, reversed?).
#: ``{target}`` is "next-token" with ``targets="next"``, else "target".
LENS_METRICS: Dict[str, Tuple[str, str, str, bool]] = {
    "prob": ("top-token probability", "p(top token)", "Viridis", False),
    "target_prob": ("{target} probability", "p({target})", "Viridis", False),
    "entropy": ("entropy", "entropy (nats)", "Magma", True),
    "kl": ("KL to final", "KL to final (nats)", "Magma", True),
    "rank": ("{target} rank", "rank (0 = top)", "Viridis", True),
}
#: Evaluation statistics: key -> (name, colour), from the one style table the static figures use.
EVAL_STATS: Dict[str, Tuple[str, str]] = {
    key: (METRIC_STYLE[key].name, METRIC_STYLE[key].color) for key in ("kl_to_final", "next_token_loss", "entropy")
}
_LENS_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
_MAX_OPTIONS = 64  # attribution cells offered in the menu (beyond: the mean and the first ones)
_TICK_CHARS = 12  # axis tick labels are elided past this; the hover keeps the full text


def _go() -> Any:
    try:
        import plotly.graph_objects as go
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return go


def _r4(x: float) -> Optional[float]:
    """4 significant digits for colours (None for NaN: a gap)."""
    x = float(x)
    return None if math.isnan(x) else float(f"{x:.4g}")


def _grid(t: torch.Tensor) -> List[List[Optional[float]]]:
    return [[_r4(v) for v in row] for row in t.tolist()]


def _esc(text: str) -> str:
    """Plotly reads hover text as a little HTML: escape what it would interpret."""
    return html.escape(text, quote=False)


def _tok(tokenizer: Any, token_id: int) -> str:
    return _esc(display_token(token_text(tokenizer, int(token_id))))


def _tick(tokenizer: Any, token_id: int) -> str:
    text = display_token(token_text(tokenizer, int(token_id)))
    return _esc(text if len(text) <= _TICK_CHARS else text[: _TICK_CHARS - 1] + "…")


# -- the lens heatmap --------------------------------------------------------------------------
def lens_figure(result: Any, *, top_k: Optional[int] = None, metric: str = "prob", prompt: int = 0) -> Any:
    """The lens heatmap ``[layer x position]`` of a :class:`~tl_logitlens.LensResult` as a plotly Figure.

    Hovering a cell shows its top ``top_k`` tokens (default: all the result kept) with
    probabilities, the first target's probability and rank (when targets were given),
    entropy and KL to final (see the module doc for the exact lines). One heatmap trace
    per prompt; a menu switches the prompt, another the coloured metric (``prob``,
    ``target_prob``, ``entropy``, ``kl``, ``rank``; the target ones need targets).
    Padding positions are gaps.
    """
    go = _go()
    expand = (lambda t: t) if result.has_pos_axis else (lambda t: None if t is None else t.unsqueeze(2))  # noqa: E731
    top_ids, top_probs = expand(result.top_ids), expand(result.top_probs)
    entropy, kl = expand(result.entropy), expand(result.kl_to_final)
    n_layer, batch, n_pos, k = top_ids.shape
    k = k if top_k is None else int(top_k)
    if k < 1:
        raise LensInputError(f"top_k must be a positive int (tokens listed per cell), got {top_k!r}")
    has_targets = result.target_ids is not None
    metrics = [m for m in LENS_METRICS if has_targets or not m.startswith(("target", "rank"))]
    if metric not in metrics:
        raise LensInputError(
            f"metric must be one of {metrics} for this result, got {metric!r}"
            + ("" if has_targets else " (target metrics need logit_lens(..., targets=...))")
        )
    if not 0 <= prompt < batch:
        raise LensInputError(f"prompt must index the batch of {batch} prompts, got {prompt!r}")
    positions = result.positions.reshape(batch, -1)[:, :n_pos]
    real = positions < result.lengths.reshape(batch, 1)  # [batch, pos]: not padding
    target = "target"
    if has_targets:
        t_ids, t_probs, t_ranks = (
            expand(x)[..., 0] for x in (result.target_ids, result.target_probs, result.target_ranks)
        )
        next_ids = result.next_ids.reshape(batch, -1)[:, :n_pos]
        if result.target_ids.shape[-1] == 1 and torch.equal(t_ids[0], next_ids):
            target = "next-token"
    tokenizer = result.tokenizer
    labels = list(result.labels)

    z_of: Dict[str, torch.Tensor] = {"prob": top_probs[..., 0], "entropy": entropy, "kl": kl}
    if has_targets:
        z_of["target_prob"] = t_probs
        z_of["rank"] = torch.where(t_ranks >= 0, t_ranks.double(), torch.tensor(float("nan"), dtype=torch.float64))

    def z(m: str, b: int) -> List[List[Optional[float]]]:
        grid = z_of[m][:, b].double().clone()  # [layer, pos]
        grid[:, ~real[b]] = float("nan")
        return _grid(grid)

    def hover(b: int) -> List[List[str]]:
        # Decode each distinct id once: a 12 x 128 x 5 grid has 7680 tokens but few distinct ones.
        names: Dict[int, str] = {}

        def name(i: int) -> str:
            if i not in names:
                names[i] = _tok(tokenizer, i)
            return names[i]

        ids, probs = top_ids[:, b, :, :k].tolist(), top_probs[:, b, :, :k].tolist()
        ent, div = entropy[:, b].tolist(), kl[:, b].tolist()
        if has_targets:
            tid, tp, tr = t_ids[:, b].tolist(), t_probs[:, b].tolist(), t_ranks[:, b].tolist()
        inputs = result.input_ids[b, positions[b]].tolist() if result.input_ids is not None else None
        rows = []
        for layer in range(n_layer):
            row = []
            for j in range(n_pos):
                if not bool(real[b, j]):
                    row.append("padding")
                    continue
                head = f"{labels[layer]} · pos {int(positions[b, j])}"
                if inputs is not None:
                    head += f" · {name(inputs[j])}"
                lines = [head] + [f"{name(i)}  {p:.4g}" for i, p in zip(ids[layer][j], probs[layer][j])]
                if has_targets:
                    word = "next" if target == "next-token" else "target"
                    if tid[layer][j] < 0:
                        lines.append(f"{word}: none")
                    else:
                        lines.append(f"{word} {name(tid[layer][j])}  p {tp[layer][j]:.4g}  rank {tr[layer][j]}")
                lines.append(f"entropy {ent[layer][j]:.4g} · KL {div[layer][j]:.4g} nats")
                row.append("<br>".join(lines))
            rows.append(row)
        return rows

    def ticks(b: int) -> List[str]:
        if result.input_ids is None:
            return [str(int(p)) for p in positions[b]]
        return [_tick(tokenizer, t) for t in result.input_ids[b, positions[b]].tolist()]

    def style(m: str) -> Dict[str, Any]:
        label, bar, scale = (s.format(target=target) for s in LENS_METRICS[m][:3])
        rev = LENS_METRICS[m][3]
        values = z_of[m][:, real].double()
        values = values[~values.isnan()]
        top = float(values.max()) if values.numel() else 1.0
        if m in ("prob", "target_prob"):
            lo, hi = 0.0, 1.0
        elif m == "rank":
            lo, hi = 0.0, max(1.0, min(top, 100.0))  # beyond 100 all look alike; the hover has the rank
        else:
            lo, hi = 0.0, max(top, 1e-6)
        return {"label": label, "bar": bar, "scale": scale, "reverse": rev, "zmin": lo, "zmax": hi}

    s0 = style(metric)
    traces = []
    for b in range(batch):
        traces.append(
            go.Heatmap(
                z=z(metric, b),
                x=list(range(n_pos)),
                y=list(range(n_layer)),
                text=hover(b),
                hovertemplate="%{text}<extra></extra>",
                visible=(b == prompt),
                name=f"prompt {b}",
                colorscale=s0["scale"],
                reversescale=s0["reverse"],
                zmin=s0["zmin"],
                zmax=s0["zmax"],
                colorbar={"title": {"text": s0["bar"]}},
                xgap=1,
                ygap=1,
            )
        )
    metric_buttons = []
    for m in metrics:
        s = style(m)
        metric_buttons.append(
            {
                "label": s["label"],
                "method": "restyle",
                "args": [
                    {
                        "z": [z(m, b) for b in range(batch)],
                        "colorscale": s["scale"],
                        "reversescale": s["reverse"],
                        "zmin": s["zmin"],
                        "zmax": s["zmax"],
                        "colorbar.title.text": s["bar"],
                    }
                ],
            }
        )
    all_ticks = [ticks(b) for b in range(batch)]
    step = max(1, math.ceil(n_pos / 64))  # thin crowded tick labels; the hover names every cell
    title = f"{result.lens_name} lens: hover a cell for its top tokens"
    prompt_buttons = [
        {
            "label": f"prompt {b}",
            "method": "update",
            "args": [
                {"visible": [i == b for i in range(batch)]},
                {"xaxis.tickvals": list(range(0, n_pos, step)), "xaxis.ticktext": all_ticks[b][::step]},
            ],
        }
        for b in range(batch)
    ]
    menus = [
        {
            "buttons": metric_buttons,
            "active": metrics.index(metric),
            "x": 0.0,
            "y": 1.12,
            "xanchor": "left",
            "yanchor": "bottom",
            "showactive": True,
            "name": "metric",
        }
    ]
    if batch > 1:
        menus.append(
            {
                "buttons": prompt_buttons,
                "active": prompt,
                "x": 0.45,
                "y": 1.12,
                "xanchor": "left",
                "yanchor": "bottom",
                "showactive": True,
                "name": "prompt",
            }
        )
    fig = go.Figure(traces)
    fig.update_layout(
        title={"text": title, "y": 0.98},
        updatemenus=menus,
        margin={"t": 110},
        height=max(320, 120 + 22 * n_layer),
        width=max(640, min(1600, 160 + 14 * n_pos)),
        xaxis={
            "title": {"text": "position (input token)"},
            "tickmode": "array",
            "tickangle": -60,
            "tickvals": list(range(0, n_pos, step)),
            "ticktext": all_ticks[prompt][::step],
        },
        yaxis={
            "title": {"text": "stack entry"},
            "tickmode": "array",
            "tickvals": list(range(n_layer)),
            "ticktext": [_esc(x) for x in labels],
        },
        plot_bgcolor="white",
        meta={"view": "lens", "metrics": metrics, "target": target},
    )
    return fig


# -- attribution -------------------------------------------------------------------------------
def attribution_figure(att: Any, *, top: int = 40) -> Any:
    """An :class:`~tl_logitlens.Attribution` as a plotly Figure: a layer x head heatmap for
    ``by="head"``, horizontal bars (the ``top`` largest by mean |value| for ``by="neuron"``) otherwise.

    A menu switches between the mean over every real (prompt, position) cell and each cell
    (the first 64). Hover: the component, its value (``:+.4g``), and for one cell the
    model's value and the constant term.
    """
    go = _go()
    values = att.values if att.values.ndim == 3 else att.values.unsqueeze(-1)  # [comp, batch, pos]
    model_value = att.model_value.reshape(values.shape[1], values.shape[2])
    constant = att.constant.reshape(values.shape[1], values.shape[2])
    positions = att.positions.reshape(values.shape[1], -1)[:, : values.shape[2]]
    real = att.real().reshape(values.shape[1], values.shape[2])
    cells = [(b, j) for b in range(values.shape[1]) for j in range(values.shape[2]) if bool(real[b, j])]
    mean = values[:, real].double().mean(1)  # [comp]
    options: List[Tuple[str, torch.Tensor, str]] = [("mean over prompts", mean, f"mean over {len(cells)} cells")]
    for b, j in cells[:_MAX_OPTIONS]:
        options.append(
            (
                f"prompt {b} pos {int(positions[b, j])}",
                values[:, b, j].double(),
                f"model {float(model_value[b, j]):+.4g} · constant {float(constant[b, j]):+.4g}",
            )
        )
    what = "logit difference" if att.wrong_ids is not None else "logit"
    traces = []
    if att.by == "head":
        index = {label: i for i, label in enumerate(att.labels)}
        rows = [[index[f"L{layer}H{head}"] for head in range(att.n_heads)] for layer in range(att.n_layers)]
        limit = max(float(mean.abs().max()), max(float(v.abs().max()) for _, v, _ in options), 1e-9)
        for n, (name, v, note) in enumerate(options):
            grid = [[_r4(v[i]) for i in row] for row in rows]
            text = [
                [f"L{layer}H{head}: {float(v[i]):+.4g}<br>{note}" for head, i in enumerate(row)]
                for layer, row in enumerate(rows)
            ]
            traces.append(
                go.Heatmap(
                    z=grid,
                    x=list(range(att.n_heads)),
                    y=list(range(att.n_layers)),
                    text=text,
                    hovertemplate="%{text}<extra></extra>",
                    visible=(n == 0),
                    name=name,
                    colorscale="RdBu",
                    zmid=0,
                    zmin=-limit,
                    zmax=limit,
                    xgap=1,
                    ygap=1,
                    colorbar={"title": {"text": f"direct effect on {what}"}},
                )
            )
        axes = {"xaxis": {"title": {"text": "head"}, "dtick": 1}, "yaxis": {"title": {"text": "layer"}, "dtick": 1}}
    else:
        order = list(range(len(att.labels)))
        if att.by == "neuron":
            order = mean.abs().argsort(descending=True)[: int(top)].tolist()
        names = [_esc(att.labels[i]) for i in order]
        for n, (name, v, note) in enumerate(options):
            traces.append(
                go.Bar(
                    y=names,
                    x=[_r4(v[i]) for i in order],
                    orientation="h",
                    visible=(n == 0),
                    name=name,
                    text=[f"{att.labels[i]}: {float(v[i]):+.4g}<br>{note}" for i in order],
                    textposition="none",
                    hovertemplate="%{text}<extra></extra>",
                    marker={"color": ["#d62728" if float(v[i]) < 0 else "#1f77b4" for i in order]},
                )
            )
        axes = {
            "xaxis": {"title": {"text": f"direct effect on {what}"}},
            "yaxis": {"autorange": "reversed", "type": "category"},
        }
    menus = [
        {
            "buttons": [
                {"label": name, "method": "update", "args": [{"visible": [i == n for i in range(len(options))]}]}
                for n, (name, _, _) in enumerate(options)
            ],
            "x": 0.0,
            "y": 1.1,
            "xanchor": "left",
            "yanchor": "bottom",
            "name": "cell",
        }
    ]
    fig = go.Figure(traces)
    fig.update_layout(
        title={"text": f"direct logit attribution by {att.by}", "y": 0.98},
        updatemenus=menus,
        margin={"t": 100},
        height=max(360, 140 + 22 * (att.n_layers if att.by == "head" else len(traces[0].y))),
        meta={"view": "attribution", "by": att.by},
        **axes,
    )
    return fig


# -- per-layer curves --------------------------------------------------------------------------
def _curves(go: Any, ev: Any, stat: str, band: Tuple[float, float], colour: str, name: str, group: str) -> List[Any]:
    labels = list(ev.labels)
    mean, lo, hi = ev.mean(stat), ev.quantile(stat, band[0]), ev.quantile(stat, band[1])
    text = [
        f"{name} · {label}<br>mean {float(m):.4g}<br>q{100 * band[0]:g} {float(a):.4g} · q{100 * band[1]:g} {float(b):.4g}"
        for label, m, a, b in zip(labels, mean, lo, hi)
    ]
    x = list(range(len(labels)))
    return [
        go.Scatter(
            x=x,
            y=[_r4(v) for v in lo],
            mode="lines",
            line={"width": 0},
            hoverinfo="skip",
            showlegend=False,
            legendgroup=group,
        ),
        go.Scatter(
            x=x,
            y=[_r4(v) for v in hi],
            mode="lines",
            line={"width": 0},
            fill="tonexty",
            hoverinfo="skip",
            fillcolor=_fade(colour),
            showlegend=False,
            legendgroup=group,
        ),
        go.Scatter(
            x=x,
            y=[_r4(v) for v in mean],
            mode="lines+markers",
            line={"color": colour},
            name=name,
            text=text,
            hovertemplate="%{text}<extra></extra>",
            legendgroup=group,
        ),
    ]


def _fade(colour: str) -> str:
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},0.2)"


def _curve_layout(fig: Any, labels: Sequence[str], title: str, menus: List[Dict[str, Any]]) -> Any:
    menus = menus + [
        {
            "buttons": [
                {"label": "linear", "method": "relayout", "args": [{"yaxis.type": "linear"}]},
                {"label": "log", "method": "relayout", "args": [{"yaxis.type": "log"}]},
            ],
            "x": 1.0,
            "y": 1.1,
            "xanchor": "right",
            "yanchor": "bottom",
            "name": "scale",
        }
    ]
    fig.update_layout(
        title={"text": title, "y": 0.98},
        updatemenus=menus,
        margin={"t": 100},
        hovermode="closest",
        height=480,
        width=max(640, min(1400, 200 + 40 * len(labels))),
        xaxis={
            "title": {"text": "stack entry"},
            "tickmode": "array",
            "tickvals": list(range(len(labels))),
            "ticktext": [_esc(x) for x in labels],
        },
        yaxis={"title": {"text": "nats"}},
    )
    return fig


def evaluation_figure(
    ev: Any, *, statistics: Sequence[str] = tuple(EVAL_STATS), band: Tuple[float, float] = (0.25, 0.75)
) -> Any:
    """A :class:`~tl_logitlens.evaluate.LensEvaluation` as per-layer curves: each statistic's
    mean with a shaded band between two quantiles; hover shows the mean and both quantiles."""
    go = _go()
    traces = []
    for stat in statistics:
        name, colour = EVAL_STATS[stat]
        traces += _curves(go, ev, stat, band, colour, name, stat)
    fig = go.Figure(traces)
    fig.update_layout(meta={"view": "evaluation"})
    return _curve_layout(fig, ev.labels, f"{ev.lens_name} lens over {ev.n_tokens:,} tokens", [])


def comparison_figure(
    comparison: Any, *, statistics: Sequence[str] = tuple(EVAL_STATS), band: Tuple[float, float] = (0.25, 0.75)
) -> Any:
    """Every lens's per-layer curves of a comparison (anything with ``.lenses`` and
    ``[name] -> LensEvaluation``); a menu picks the statistic."""
    go = _go()
    names = list(comparison.lenses)
    traces, groups = [], []
    for stat in statistics:
        for n, lens in enumerate(names):
            part = _curves(
                go, comparison[lens], stat, band, _LENS_COLOURS[n % len(_LENS_COLOURS)], str(lens), f"{stat}:{lens}"
            )
            traces += part
            groups += [stat] * len(part)
    for t, g in zip(traces, groups):
        t.visible = g == statistics[0]
    buttons = [
        {"label": EVAL_STATS[s][0], "method": "update", "args": [{"visible": [g == s for g in groups]}]}
        for s in statistics
    ]
    fig = go.Figure(traces)
    fig.update_layout(meta={"view": "comparison"})
    menus = [{"buttons": buttons, "x": 0.0, "y": 1.1, "xanchor": "left", "yanchor": "bottom", "name": "statistic"}]
    return _curve_layout(fig, comparison[names[0]].labels, "lenses compared", menus)


# -- dispatch, pages, notebooks ----------------------------------------------------------------
def figure(result: Any, **kwargs: Any) -> Any:
    """The interactive view of any result (a plotly Figure passes through)."""
    kind = type(result).__name__
    if hasattr(result, "to_plotly_json"):
        return result
    if kind == "LensResult":
        return lens_figure(result, **kwargs)
    if kind == "Attribution":
        return attribution_figure(result, **kwargs)
    if kind == "LensEvaluation":
        return evaluation_figure(result, **kwargs)
    if hasattr(result, "lenses"):
        return comparison_figure(result, **kwargs)
    raise LensInputError(
        f"no interactive view for a {kind}; pass a LensResult, Attribution, LensEvaluation or LensComparison"
    )


_B85_SAFE = bytes.maketrans(b"<", b".")  # '<' is the only character that can end a script early
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&()*+-;.=>?@^_`{|}~"


def _pack(data: bytes) -> str:
    return base64.b85encode(gzip.compress(data, 9, mtime=0)).translate(_B85_SAFE).decode("ascii")


@functools.lru_cache(maxsize=1)
def _packed_plotlyjs() -> str:
    from plotly.offline import get_plotlyjs

    return _pack(get_plotlyjs().encode("utf-8"))


_LOADER = (
    """
(async () => {
  const A = "%s", m = new Uint8Array(128);
  for (let i = 0; i < 85; i++) m[A.charCodeAt(i)] = i;
  function b85(s) {
    const n = s.length, rem = n %% 5, out = new Uint8Array(Math.floor(n / 5) * 4 + (rem ? rem - 1 : 0));
    for (let i = 0, o = 0; i < n; i += 5) {
      let v = 0;
      for (let j = 0; j < 5; j++) v = v * 85 + (i + j < n ? m[s.charCodeAt(i + j)] : 84);
      for (let k = 24; k >= 0 && o < out.length; k -= 8) out[o++] = (v >>> k) & 255;
    }
    return out;
  }
  async function inflate(id) {
    const bytes = b85(document.getElementById(id).textContent.trim());
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return await new Response(stream).text();
  }
  const lib = document.createElement("script");
  lib.textContent = await inflate("tll-plotlyjs");
  document.head.appendChild(lib);
  const fig = JSON.parse(await inflate("tll-figure"));
  const gd = document.getElementById("tll-plot");
  gd.textContent = "";
  await Plotly.newPlot(gd, fig.data, fig.layout, {displaylogo: false});
  gd.dataset.ready = "1";
})().catch((e) => {
  document.getElementById("tll-plot").textContent = "This page needs a browser with DecompressionStream: " + e;
  console.error(e);
});
"""
    % _ALPHABET
)


def page_html(fig: Any, title: str = "tl_logitlens") -> str:
    """A self-contained HTML page drawing ``fig``: plotly.js and the figure inlined, compressed."""
    import plotly.io as pio

    body = pio.to_json(fig, validate=False, pretty=False)
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>\n'
        f'<body style="margin:0;font-family:sans-serif">\n<div id="tll-plot">loading...</div>\n'
        f'<script id="tll-plotlyjs" type="application/octet-stream">{_packed_plotlyjs()}</script>\n'
        f'<script id="tll-figure" type="application/octet-stream">{_pack(body.encode("utf-8"))}</script>\n'
        f"<script>{_LOADER}</script>\n</body></html>\n"
    )


def to_html(result: Any, path: Union[str, Path], *, title: Optional[str] = None, **kwargs: Any) -> Path:
    """Write the interactive view of ``result`` (or a plotly Figure) to ``path`` as a
    self-contained page (no network needed to open it), atomically; returns the path."""
    _go()
    fig = figure(result, **kwargs)
    path = Path(path)
    text = page_html(fig, title or f"tl_logitlens: {fig.layout.meta['view'] if fig.layout.meta else 'figure'}")
    write_text(path, text)
    return path


def show(result: Any, **kwargs: Any) -> Any:
    """Display the interactive view in a notebook (nothing happens elsewhere) and return the Figure."""
    fig = figure(result, **kwargs)
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return fig
    if get_ipython() is not None:
        display(fig)
    return fig
