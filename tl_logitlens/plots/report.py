"""The audit page of one prediction (:func:`tl_logitlens.report`): several interactive figures and tables.

Self-contained like every page of the package (:mod:`tl_logitlens.plots.interactive`): plotly.js
and each figure's JSON are gzip-compressed and inlined as base-85 text, inflated by the browser's
own ``DecompressionStream``; when every figure is drawn, ``<body data-ready="1">``. Tables
(provenance, identity checks, the heads' source tokens) are plain HTML, readable with scripts off.

Example::

    >>> "what a lens reading is not" in CAVEATS.lower()
    True
"""

from __future__ import annotations

import html
import json
from typing import Any, Dict, List

from ..files import HTML_MARK
from ..tokentext import display_token
from .interactive import _INFLATE_JS, _pack, _packed_plotlyjs, lens_figure

#: What the page says a lens reading is, and is not (shown near its top).
CAVEATS = (
    "<h2>What a lens reading is not</h2><p>A lens reading says what the residual stream at a layer "
    "<em>would</em> predict if it were read through the model's final norm and unembedding (or through a "
    "trained lens's translation first). It is <b>not a causal claim</b>: a layer may hold the answer in a form "
    "the unembedding cannot read, and a readable answer need not be used by later layers. Direct logit "
    "attribution measures each piece's <em>direct</em> write to the answer's logit along the final stream's "
    "normalisation; it ignores what a piece does through later layers. To claim that a component "
    "<em>causes</em> the prediction, intervene (activation patching, ablation).</p>"
)
PAPERS = [
    ("The logit lens (nostalgebraist, 2020)", "https://www.lesswrong.com/posts/AcKRB8wDpdaN6v6ru/"),
    ("Eliciting latent predictions with the tuned lens (Belrose et al., 2023)", "https://arxiv.org/abs/2303.08112"),
    (
        "A mathematical framework for transformer circuits (Elhage et al., 2021)",
        "https://transformer-circuits.pub/2021/framework/index.html",
    ),
    (
        "Interpretability in the wild: IOI, direct logit attribution (Wang et al., 2022)",
        "https://arxiv.org/abs/2211.00593",
    ),
]

_LOADER = (
    "\n(async () => {\n"
    + _INFLATE_JS
    + """  const lib = document.createElement("script");
  lib.textContent = await inflate(document.getElementById("tll-plotlyjs"));
  document.head.appendChild(lib);
  for (const el of document.querySelectorAll("script.tll-figure")) {
    const fig = JSON.parse(await inflate(el)), gd = document.getElementById(el.dataset.target);
    gd.textContent = "";
    await Plotly.newPlot(gd, fig.data, fig.layout, {displaylogo: false});
  }
  document.body.dataset.ready = "1";
})().catch((e) => {
  document.body.dataset.ready = "error";
  document.body.prepend("This page needs a browser with DecompressionStream: " + e);
});
"""
)

_STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;"
    "font-size:13px;vertical-align:top}th{background:#f3f3f3}.pass{color:#1a7f37}.fail{color:#c00;font-weight:bold}"
    ".note{background:#fff8e1;border:1px solid #f0d070;padding:.2em 1em;margin:1em 0}code{font-size:12px}"
)


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _answer_lines(readings: Dict[str, Any], last: int, targets: List[str]) -> Any:
    """Answer probability and rank by stack entry, one line per lens (two panels)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1, cols=2, subplot_titles=(f"p({targets[0]})", f"rank of {targets[0]} + 1 (1 = top; log axis)")
    )
    for name, r in readings.items():
        fig.add_trace(
            go.Scatter(x=r.labels, y=r.target_probs[:, 0, last, 0].tolist(), name=name, legendgroup=name), 1, 1
        )
        fig.add_trace(
            go.Scatter(
                x=r.labels,
                y=(r.target_ranks[:, 0, last, 0] + 1).tolist(),
                name=name,
                legendgroup=name,
                showlegend=False,
            ),
            1,
            2,
        )
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title="the answer by layer, for every lens", height=380, meta={"view": "report-answer"})
    return fig


def _attribution_figures(atts: Dict[str, Any], what: str) -> List[Any]:
    import plotly.graph_objects as go

    comp = atts["component"]
    bars = go.Figure(go.Bar(x=comp.labels, y=comp.values[:, 0].tolist(), marker_color="#4c72b0"))
    bars.update_layout(title=f"DLA by component: direct effect on {what}", height=360, meta={"view": "report-dla"})
    heads = atts["head"].by_head()[..., 0]
    grid = go.Figure(
        go.Heatmap(
            z=heads.tolist(),
            colorscale="RdBu",
            zmid=0,
            colorbar={"title": {"text": what}},
            hovertemplate="L%{y}H%{x}: %{z:.4g}<extra></extra>",
        )
    )
    grid.update_layout(
        title="DLA by head (layer x head)",
        xaxis={"title": "head", "dtick": 1},
        yaxis={"title": "layer", "dtick": 1},
        height=max(300, 60 + 22 * heads.shape[0]),
        meta={"view": "report-heads"},
    )
    top = atts["neuron"].top(20)
    neurons = go.Figure(
        go.Bar(x=[v for _, v in top][::-1], y=[n for n, _ in top][::-1], orientation="h", marker_color="#dd8452")
    )
    neurons.update_layout(title="DLA by neuron: the 20 largest", height=520, meta={"view": "report-neurons"})
    return [bars, grid, neurons]


def _head_sources(att: Any, top_heads: int) -> str:
    """The top heads by |direct effect| and, for each, the 3 source tokens it moved most of it from."""
    src = att.by_source()[..., 0]  # [layer, head, src]
    tokens = att.source_tokens()[0] if att.source_tokens() is not None else None
    rows = []
    for label, value in att.top(top_heads):
        layer, head = (int(x) for x in label[1:].split("H"))
        order = src[layer, head].abs().argsort(descending=True)[:3].tolist()
        parts = [
            f"{s}: <code>{_esc(display_token(tokens[s]) if tokens else s)}</code> {float(src[layer, head, s]):+.4g}"
            for s in order
        ]
        rows.append(f"<tr><td>{label}</td><td>{value:+.4g}</td><td>{'<br>'.join(parts)}</td></tr>")
    return (
        "<table><tr><th>head</th><th>direct effect</th><th>top source positions: token, share of the effect"
        "</th></tr>" + "".join(rows) + "</table>"
    )


def _tables(checks: List[Any], provenance: Dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{_esc(c.name)}</td><td>{c.residual:.3g}</td><td>{c.tolerance:.3g}</td>"
        f"<td class={'pass' if c.passed else 'fail'}>{'pass' if c.passed else 'FAIL'}</td></tr>"
        for c in checks
    )
    ident = f"<table><tr><th>identity</th><th>measured residual</th><th>bound</th><th></th></tr>{rows}</table>"
    prov = "".join(
        f"<tr><th>{_esc(k)}</th><td><code>{_esc(json.dumps(v, ensure_ascii=False) if isinstance(v, dict) else v)}"
        "</code></td></tr>"
        for k, v in provenance.items()
    )
    return f"<h2>Identity checks</h2>{ident}<h2>Provenance</h2><table>{prov}</table>"


def report_page(
    *,
    readings: Dict[str, Any],
    attributions: Dict[str, Any],
    checks: List[Any],
    provenance: Dict[str, Any],
    top_heads: int,
) -> str:
    """The page's HTML: summary, caveats, figures, the heads' sources, identity checks, provenance, papers."""
    settings = provenance["settings"]
    logit = readings["logit"]
    last = int(logit.lengths[0]) - 1
    targets = [settings["answer"].rsplit(" (id", 1)[0]]
    top = display_token(logit.top_tokens()[-1][0][last][0])
    what = f"logit({targets[0]})" + (
        "" if settings["wrong"] is None else f" - logit({settings['wrong'].rsplit(' (id', 1)[0]})"
    )
    figures = [lens_figure(r, metric="prob") for r in readings.values()]
    figures += [_answer_lines(readings, last, targets)] + _attribution_figures(attributions, what)
    divs = "".join(f'<div id="tll-plot-{i}">loading...</div>' for i in range(len(figures)))
    scripts = "".join(
        f'<script class="tll-figure" data-target="tll-plot-{i}" type="application/octet-stream">'
        f"{_pack(f.to_json().encode('utf-8'))}</script>\n"
        for i, f in enumerate(figures)
    )
    failed = [c.name for c in checks if not c.passed]
    verdict = (
        "every identity check passed" if not failed else f"<b class=fail>{len(failed)} identity check(s) FAILED</b>"
    )
    papers = "".join(f'<li><a href="{url}">{_esc(title)}</a></li>' for title, url in PAPERS)
    summary = (
        f"<h1>Audit of one prediction</h1><p><b>Model</b> {_esc(provenance['model'])} · <b>prompt</b> "
        f"<code>{_esc(settings['prompt'])}</code><br><b>answer audited</b> <code>{_esc(settings['answer'])}</code>"
        f" · <b>model's own top token</b> <code>{_esc(top)}</code> · <b>DLA explains</b> <code>{_esc(what)}</code>"
        f" = {float(attributions['component'].model_value.reshape(-1)[0]):.4g} · {verdict}</p>"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8">{HTML_MARK.decode()}<title>tl_logitlens: audit report'
        f"</title><style>{_STYLE}</style></head>\n<body>\n{summary}<div class=note>{CAVEATS}</div>"
        f"<h2>Lens heatmaps and the answer by layer</h2>{divs}"
        f"<h2>Top heads' source tokens</h2>{_head_sources(attributions['head'], top_heads)}"
        f"{_tables(checks, provenance)}<h2>Methods</h2><ul>{papers}</ul>\n"
        f'<script id="tll-plotlyjs" type="application/octet-stream">{_packed_plotlyjs()}</script>\n'
        f"{scripts}<script>{_LOADER}</script>\n</body></html>\n"
    )
