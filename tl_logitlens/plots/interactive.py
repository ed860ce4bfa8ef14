"""Interactive views: plotly figures of the results, and pages of them.

A logit-lens heatmap reads like the static one (:func:`~tl_logitlens.plots.plot_lens`): layers
go up (``0_pre`` at the bottom, ``final_post`` at the top), each cell shows its top-1 token (bold
where it is the true next token), and cells are wide enough for that text (up to 8 characters);
the page is as wide as its cells (the browser scrolls), and a grid wider than two laptop
windows (2600 px) shows its first positions and pans sideways.
Hovering a cell lists its top-k tokens with their probabilities, the target (the true next token
with ``targets="next"``) with its probability and rank, the entropy and the KL to the final
layer. Menus switch the coloured metric and the prompt. The head-attribution heatmap (layer 0 at
the bottom, each cell its value, a colour scale that spans the heads), attribution bars and
per-layer evaluation curves hover their values the same way; attribution pages name the answer
and the wrong token. Nothing here runs a model: every number is read from the result object.

Pages are small. The figure's JSON is gzip-compressed and inlined as base-85 text (RFC 1924
alphabet with ``.`` in place of ``<``, so no ``<`` can end the script early), which a
twenty-line loader inflates with the browser's native ``DecompressionStream`` (Chromium 80+,
Firefox 113+, Safari 16.4+). plotly.js comes as ``to_html(..., plotly=)`` says
(:data:`PLOTLY_MODES`): ``"inline"`` (the default) packs it the same way into the page, 1.84 MB
instead of 4.8 MB (plotly.js 3, plotly 7.1), so the page opens anywhere without a network;
``"directory"`` writes one ``plotly.min.js`` beside the pages, which every page of the folder
shares (the demo and the command line write their pages so); ``"cdn"`` loads it from
cdn.plot.ly. Hover texts are formatted here, in Python, so the page shows exactly the strings
documented below; colours use values rounded to 4 significant digits.

Tooltip of a lens cell (one line each; tokens spelled by
:func:`~tl_logitlens.tokentext.display_token`, numbers with ``:.4g``)::

    <label> · pos <p> · <input token>
    <token>  <prob>                       (top-k, best first)
    next <token>  p <prob>  rank <rank>   (target <token> ... with other targets)
    entropy <e> · KL <kl> nats

Requires plotly (``pip install tl-logitlens[interactive]``). Every name, colour-bar label and
colour comes from :mod:`tl_logitlens.plots.style`, the table the static figures read: the lens
metrics from :data:`~tl_logitlens.plots.style.LENS_METRIC_STYLE` (their matplotlib colour maps
drawn as plotly colour scales), the evaluation curves from
:data:`~tl_logitlens.plots.style.METRIC_STYLE`, the lenses' line styles from
:data:`~tl_logitlens.plots.style.LINE_STYLES`, signed attributions on
:data:`~tl_logitlens.plots.style.SIGNED_CMAP`.

Example::

    >>> import tl_logitlens as tll
    >>> from tl_logitlens.plots.interactive import lens_figure
    >>> model = tll.demo_model()
    >>> result = tll.logit_lens(model, tll.demo.induction_prompt(model), targets="next")
    >>> fig = lens_figure(result)
    >>> [b["label"] for b in fig.layout.updatemenus[0].buttons]
    ['top-1 probability', 'next-token probability', 'entropy', 'KL to final', 'next-token rank']
"""

from __future__ import annotations

import base64
import functools
import gzip
import html
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import LensInputError
from ..files import HTML_MARK, JS_MARK, check_file, write_owned_text
from ..renamed import renamed_keywords
from ..tokentext import display_token, token_text
from .layout import _answer_words, _shared_answers
from .style import (
    LENS_METRIC_STYLE,
    LINE_STYLES,
    METRIC_STYLE,
    NATS_STATISTICS,
    NEG_COLOR,
    POS_COLOR,
    SIGNED_CMAP,
    TARGET_WORDS,
    LensMetric,
    plotly_colorscale,
)

__all__ = [
    "LENS_METRICS",
    "lens_figure",
    "attribution_figure",
    "evaluation_figure",
    "comparison_figure",
    "figure",
    "page_html",
    "page_of",
    "to_html",
    "show",
    "PLOTLY_MODES",
    "PLOTLY_FILE",
    "plotlyjs_text",
    "write_plotlyjs",
]

INSTALL_HINT = "interactive views need plotly: pip install tl-logitlens[interactive]"

#: Lens heatmap metrics, in menu order: key -> name, colour-bar unit and colour map, from the one
#: table the static heatmap reads (:data:`~tl_logitlens.plots.style.LENS_METRIC_STYLE`).
LENS_METRICS: Dict[str, LensMetric] = {
    key: LENS_METRIC_STYLE[key] for key in ("prob", "target_prob", "entropy", "kl", "rank")
}
_MAX_OPTIONS = 64  # attribution cells offered in the menu (beyond: the mean and the first ones)
_TICK_CHARS = 12  # axis tick labels are elided past this; the hover keeps the full text
_CELL_CHARS = 8  # a lens cell shows its top-1 token up to this many characters (the hover has it whole)
_CELL_FONT = 11  # px: the text in a lens cell
_CHAR_PX = 6.6  # px: an average character at that size, to size cells before the browser draws them
_PAGE_PX = (640, 2600)  # the narrowest and widest a lens page is drawn (px, two laptop windows); wider grids pan
_SIDE_PX = 190  # px beside the grid: the stack-entry labels and the colour bar
_TOP_PX, _BOTTOM_PX = 110, 80  # a page's margins above and below the plot area (plotly's default below)


def _menu_y(height: int) -> float:
    """The paper ``y`` that puts a menu's bottom 14 px above the plot area of a page ``height`` px tall
    (a fixed paper ``y`` such as 1.1 lands in the title on a tall page, and off the page on a taller one)."""
    return 1 + 14 / max(height - _TOP_PX - _BOTTOM_PX, 1)


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
# Data flow: _read_lens (the result's tensors, one layout) -> per prompt: _colour_grid, _hover_texts,
# _tick_texts -> per metric: _metric_scale -> _lens_traces, _lens_menus -> lens_figure's layout.
@dataclass
class _LensCells:
    """What the lens heatmap reads from a result, every field with a position axis."""

    top_ids: torch.Tensor  # [layer, batch, pos, k]
    top_probs: torch.Tensor  # [layer, batch, pos, k]
    entropy: torch.Tensor  # [layer, batch, pos]
    kl: torch.Tensor  # [layer, batch, pos]
    targets: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # first target: ids, probs, ranks
    target: str  # what {target} reads in metric names: TARGET_WORDS
    values: Dict[str, torch.Tensor]  # metric -> [layer, batch, pos] coloured values (NaN: none)
    positions: torch.Tensor  # [batch, pos] absolute positions
    real: torch.Tensor  # [batch, pos] not padding
    inputs: Optional[torch.Tensor]  # [batch, pos] input ids at those positions
    next_ids: torch.Tensor  # [batch, pos] the true next token, -1 where there is none
    labels: List[str]
    tokenizer: Any
    k: int  # tokens listed per cell
    lens_name: str

    @property
    def shape(self) -> Tuple[int, int, int]:
        """``(layers, prompts, positions)``."""
        return tuple(self.entropy.shape)  # type: ignore[return-value]


def _read_lens(result: Any, top_k: Optional[int]) -> _LensCells:
    """The result's fields in one layout (a position axis even when it was read at one position)."""
    expand = (lambda t: t) if result.has_pos_axis else (lambda t: None if t is None else t.unsqueeze(2))  # noqa: E731
    top_ids, top_probs = expand(result.top_ids), expand(result.top_probs)
    entropy, kl = expand(result.entropy), expand(result.kl_to_final)
    _, batch, n_pos, k = top_ids.shape
    k = k if top_k is None else int(top_k)
    if k < 1:
        raise LensInputError(f"top_k must be a positive int (tokens listed per cell), got {top_k!r}")
    positions = result.positions.reshape(batch, -1)[:, :n_pos]
    values: Dict[str, torch.Tensor] = {"prob": top_probs[..., 0], "entropy": entropy, "kl": kl}
    targets, target = None, TARGET_WORDS["other"]
    if result.target_ids is not None:
        targets = tuple(expand(x)[..., 0] for x in (result.target_ids, result.target_probs, result.target_ranks))
        next_ids = result.next_ids.reshape(batch, -1)[:, :n_pos]
        if result.target_ids.shape[-1] == 1 and torch.equal(targets[0][0], next_ids):
            target = TARGET_WORDS["next"]
        ranks = targets[2]
        values["target_prob"] = targets[1]
        values["rank"] = torch.where(ranks >= 0, ranks.double(), torch.tensor(float("nan"), dtype=torch.float64))
    inputs = None
    if result.input_ids is not None:
        inputs = torch.stack([result.input_ids[b, positions[b]] for b in range(batch)])  # [batch, pos]
    return _LensCells(
        top_ids=top_ids,
        top_probs=top_probs,
        entropy=entropy,
        kl=kl,
        targets=targets,
        target=target,
        values=values,
        positions=positions,
        real=positions < result.lengths.reshape(batch, 1),
        inputs=inputs,
        next_ids=result.next_ids.reshape(batch, -1)[:, :n_pos],
        labels=list(result.labels),
        tokenizer=result.tokenizer,
        k=k,
        lens_name=result.lens_name,
    )


def _colour_grid(cells: _LensCells, metric: str, b: int) -> List[List[Optional[float]]]:
    """``[layer][pos]`` colour values of prompt ``b``, 4 significant digits; padding is a gap (None)."""
    grid = cells.values[metric][:, b].double().clone()  # [layer, pos]
    grid[:, ~cells.real[b]] = float("nan")
    return _grid(grid)


def _hover_texts(cells: _LensCells, b: int) -> List[List[str]]:
    """``[layer][pos]`` tooltips of prompt ``b``, as the module doc spells them."""
    # Decode each distinct id once: a 12 x 128 x 5 grid has 7680 tokens but few distinct ones.
    names: Dict[int, str] = {}

    def name(i: int) -> str:
        if i not in names:
            names[i] = _tok(cells.tokenizer, i)
        return names[i]

    n_layer, _, n_pos = cells.shape
    ids, probs = cells.top_ids[:, b, :, : cells.k].tolist(), cells.top_probs[:, b, :, : cells.k].tolist()
    ent, div = cells.entropy[:, b].tolist(), cells.kl[:, b].tolist()
    if cells.targets is not None:
        tid, tp, tr = (x[:, b].tolist() for x in cells.targets)
    word = "next" if cells.target == TARGET_WORDS["next"] else "target"
    inputs = None if cells.inputs is None else cells.inputs[b].tolist()
    rows = []
    for layer in range(n_layer):
        row = []
        for j in range(n_pos):
            if not bool(cells.real[b, j]):
                row.append("padding")
                continue
            head = f"{cells.labels[layer]} · pos {int(cells.positions[b, j])}"
            if inputs is not None:
                head += f" · {name(inputs[j])}"
            lines = [head] + [f"{name(i)}  {p:.4g}" for i, p in zip(ids[layer][j], probs[layer][j])]
            if cells.targets is not None:
                if tid[layer][j] < 0:
                    lines.append(f"{word}: none")
                else:
                    lines.append(f"{word} {name(tid[layer][j])}  p {tp[layer][j]:.4g}  rank {tr[layer][j]}")
            lines.append(f"entropy {ent[layer][j]:.4g} · KL {div[layer][j]:.4g} nats")
            row.append("<br>".join(lines))
        rows.append(row)
    return rows


def _top1_texts(cells: _LensCells, b: int) -> List[List[str]]:
    """``[layer][pos]`` what each cell of prompt ``b`` shows: its top-1 token, elided past :data:`_CELL_CHARS`."""
    ids = cells.top_ids[:, b, :, 0].tolist()
    names: Dict[int, str] = {}
    for row in ids:
        for i in row:
            if i not in names:
                text = display_token(token_text(cells.tokenizer, int(i)))
                names[i] = _esc(text if len(text) <= _CELL_CHARS else text[: _CELL_CHARS - 1] + "…")
    real = cells.real[b].tolist()
    nxt = cells.next_ids[b].tolist()  # bold where the top-1 token is the true next one, as the static figure
    return [
        [(f"<b>{names[i]}</b>" if i == nxt[j] else names[i]) if real[j] else "" for j, i in enumerate(row)]
        for row in ids
    ]


def _tick_texts(cells: _LensCells, b: int) -> List[str]:
    """Prompt ``b``'s x tick labels: its input tokens, elided, or the positions without input ids."""
    if cells.inputs is None:
        return [str(int(p)) for p in cells.positions[b]]
    return [_tick(cells.tokenizer, t) for t in cells.inputs[b].tolist()]


def _metric_scale(cells: _LensCells, metric: str) -> Dict[str, Any]:
    """Menu label, colour-bar title, colour scale and limits of one metric (the same for every prompt)."""
    style = LENS_METRIC_STYLE[metric]
    values = cells.values[metric][:, cells.real].double()
    values = values[~values.isnan()]
    top = float(values.max()) if values.numel() else 1.0
    if metric in ("prob", "target_prob"):
        hi = 1.0
    elif metric == "rank":
        hi = max(1.0, min(top, 100.0))  # beyond 100 all look alike; the hover has the rank
    else:
        hi = max(top, 1e-6)
    return {
        "label": style.name.format(target=cells.target),
        "bar": style.label(cells.target),
        "scale": plotly_colorscale(style.cmap),
        "zmin": 0.0,
        "zmax": hi,
    }


def _lens_traces(go: Any, cells: _LensCells, metric: str, prompt: int) -> List[Any]:
    """One heatmap per prompt, coloured by ``metric``; only ``prompt``'s is visible."""
    n_layer, batch, n_pos = cells.shape
    scale = _metric_scale(cells, metric)
    return [
        go.Heatmap(
            z=_colour_grid(cells, metric, b),
            x=list(range(n_pos)),
            y=list(range(n_layer)),
            text=_top1_texts(cells, b),
            texttemplate="%{text}",
            textfont={"size": _CELL_FONT},
            customdata=_hover_texts(cells, b),
            hovertemplate="%{customdata}<extra></extra>",
            visible=(b == prompt),
            name=f"prompt {b}",
            colorscale=scale["scale"],
            zmin=scale["zmin"],
            zmax=scale["zmax"],
            colorbar={"title": {"text": scale["bar"]}},
            xgap=1,
            ygap=1,
        )
        for b in range(batch)
    ]


def _lens_menus(
    cells: _LensCells, metrics: List[str], metric: str, prompt: int, step: int, height: int
) -> List[Dict[str, Any]]:
    """The metric menu (recolours every prompt's heatmap) and, for several prompts, the prompt menu, above the
    plot area of a page ``height`` px tall."""
    _, batch, n_pos = cells.shape
    metric_buttons = []
    for m in metrics:
        scale = _metric_scale(cells, m)
        restyle = {
            "z": [_colour_grid(cells, m, b) for b in range(batch)],
            "colorscale": [scale["scale"]] * batch,  # one per trace: a bare list would be read per trace
            "zmin": scale["zmin"],
            "zmax": scale["zmax"],
            "colorbar.title.text": scale["bar"],
        }
        metric_buttons.append({"label": scale["label"], "method": "restyle", "args": [restyle]})
    place = {"y": _menu_y(height), "xanchor": "left", "yanchor": "bottom", "showactive": True}
    menus = [{"buttons": metric_buttons, "active": metrics.index(metric), "x": 0.0, **place, "name": "metric"}]
    if batch > 1:
        prompt_buttons = [
            {
                "label": f"prompt {b}",
                "method": "update",
                "args": [
                    {"visible": [i == b for i in range(batch)]},
                    {"xaxis.tickvals": list(range(0, n_pos, step)), "xaxis.ticktext": _tick_texts(cells, b)[::step]},
                ],
            }
            for b in range(batch)
        ]
        menus.append({"buttons": prompt_buttons, "active": prompt, "x": 0.45, **place, "name": "prompt"})
    return menus


def lens_figure(result: Any, *, top_k: Optional[int] = None, metric: str = "prob", prompt: int = 0) -> Any:
    """The lens heatmap ``[layer x position]`` of a :class:`~tl_logitlens.LensResult` as a plotly Figure.

    Hovering a cell shows its top ``top_k`` tokens (default: all the result kept) with
    probabilities, the first target's probability and rank (when targets were given),
    entropy and KL to final (see the module doc for the exact lines). One heatmap trace
    per prompt (``z`` is ``[layer][pos]``); a menu switches the prompt, another the coloured
    metric (``prob``, ``target_prob``, ``entropy``, ``kl``, ``rank``; the target ones need
    targets), named and coloured as the static heatmap
    (:data:`~tl_logitlens.plots.style.LENS_METRIC_STYLE`). Padding positions are gaps.

    Example::

        >>> import tl_logitlens as tll
        >>> from tl_logitlens.plots.interactive import lens_figure
        >>> model = tll.demo_model()
        >>> result = tll.logit_lens(model, tll.demo.induction_prompt(model), targets="next")
        >>> fig = lens_figure(result, metric="entropy")
        >>> len(fig.data[0].z), len(fig.data[0].z[0])  # [layer][pos]
        (3, 25)
        >>> fig.data[0].colorbar.title.text
        'entropy (nats)'
    """
    go = _go()
    cells = _read_lens(result, top_k)
    n_layer, batch, n_pos = cells.shape
    metrics = [m for m in LENS_METRICS if m in cells.values]
    if metric not in metrics:
        raise LensInputError(
            f"metric must be one of {metrics} for this result, got {metric!r}"
            + ("" if cells.targets is not None else " (target metrics need logit_lens(..., targets=...))")
        )
    if not 0 <= prompt < batch:
        raise LensInputError(f"prompt must index the batch of {batch} prompts, got {prompt!r}")
    fig = go.Figure(_lens_traces(go, cells, metric, prompt))
    cell, shown = _lens_cells_px(cells)
    height = max(320, 130 + 26 * n_layer)
    title = f"{cells.lens_name} lens: each cell's top-1 token; hover a cell for its top tokens"
    xaxis: Dict[str, Any] = {
        "title": {"text": "position (input token)"},
        "tickmode": "array",
        "tickvals": list(range(n_pos)),
        "ticktext": _tick_texts(cells, prompt),
    }
    if shown < n_pos:  # cells keep their width: the page shows the first positions and pans to the rest
        xaxis["range"] = [-0.5, shown - 0.5]
        title += f" (positions 0\u2013{shown - 1} of {n_pos}: drag sideways for the rest)"
    fig.update_layout(
        # below the mode bar, which covers a long title's end on a narrow page
        title={"text": title, "y": 1, "yanchor": "top", "pad": {"t": 32}},
        updatemenus=_lens_menus(cells, metrics, metric, prompt, 1, height),
        margin={"t": _TOP_PX, "b": _BOTTOM_PX},
        height=height,
        width=max(_PAGE_PX[0], _SIDE_PX + round(cell * shown)),
        xaxis=xaxis,
        yaxis={
            "title": {"text": "stack entry"},
            "tickmode": "array",
            "tickvals": list(range(n_layer)),
            "ticktext": [_esc(x) for x in cells.labels],
        },
        dragmode="pan",
        plot_bgcolor="white",
        meta={"view": "lens", "metrics": metrics, "target": cells.target},
    )
    return fig


def _lens_cells_px(cells: _LensCells) -> Tuple[float, int]:
    """``(cell width in px, positions shown at once)``: cells wide enough for their top-1 token (up to
    :data:`_CELL_CHARS` characters), as many as the widest page holds."""
    longest = max(
        (
            len(html.unescape(t.replace("<b>", "").replace("</b>", "")))
            for b in range(cells.shape[1])
            for row in _top1_texts(cells, b)
            for t in row
        ),
        default=1,
    )
    cell = _CHAR_PX * min(max(longest, 3), _CELL_CHARS) + 14
    return cell, min(cells.shape[2], max(1, int((_PAGE_PX[1] - _SIDE_PX) // cell)))


# -- attribution -------------------------------------------------------------------------------
def _attribution_options(att: Any) -> List[Tuple[str, torch.Tensor, str]]:
    """What the cell menu offers: ``(menu label, [component] values, hover note)``, the mean over
    every real (prompt, position) cell first, then each cell (the first 64). When prompts attribute
    different tokens, each cell's note names its own."""
    values = att.values if att.values.ndim == 3 else att.values.unsqueeze(-1)  # [comp, batch, pos]
    _, batch, n_pos = values.shape
    model_value, constant = att.model_value.reshape(batch, n_pos), att.constant.reshape(batch, n_pos)
    positions = att.positions.reshape(batch, -1)[:, :n_pos]
    real = att.real().reshape(batch, n_pos)
    cells = [(b, j) for b in range(batch) for j in range(n_pos) if bool(real[b, j])]
    mean = values[:, real].double().mean(1)  # [comp]
    shared = _shared_answers(att)  # then the title names the tokens
    options: List[Tuple[str, torch.Tensor, str]] = [("mean over prompts", mean, f"mean over {len(cells)} cells")]
    for b, j in cells[:_MAX_OPTIONS]:
        note = f"model {float(model_value[b, j]):+.4g} · constant {float(constant[b, j]):+.4g}"
        if not shared:
            note += f"<br>{_esc(_answer_words(att, prompt=b))}"
        options.append((f"prompt {b} pos {int(positions[b, j])}", values[:, b, j].double(), note))
    return options


def _head_traces(go: Any, att: Any, options: List[Tuple[str, torch.Tensor, str]], what: str) -> List[Any]:
    """One ``[layer][head]`` heatmap per menu option (each cell shows its value, the hover says more), on one
    colour scale symmetric about zero that spans the heads alone: the embeddings, MLPs and biases are not drawn."""
    index = {label: i for i, label in enumerate(att.labels)}
    rows = [[index[f"L{layer}H{head}"] for head in range(att.n_heads)] for layer in range(att.n_layers)]
    heads = torch.tensor([i for row in rows for i in row])
    limit = max(max(float(v[heads].abs().max()) for _, v, _ in options), 1e-9)
    scale = plotly_colorscale(SIGNED_CMAP)
    fmt = ".2f" if limit >= 0.05 else ".2g"
    traces = []
    for n, (name, v, note) in enumerate(options):
        hover = [
            [f"L{layer}H{head}: {float(v[i]):+.4g}<br>{note}" for head, i in enumerate(row)]
            for layer, row in enumerate(rows)
        ]
        traces.append(
            go.Heatmap(
                z=[[_r4(v[i]) for i in row] for row in rows],
                x=list(range(att.n_heads)),
                y=list(range(att.n_layers)),
                text=[[format(float(v[i]), fmt) for i in row] for row in rows],
                texttemplate="%{text}" if att.n_layers * att.n_heads <= 256 else "",
                customdata=hover,
                hovertemplate="%{customdata}<extra></extra>",
                visible=(n == 0),
                name=name,
                colorscale=scale,
                zmid=0,
                zmin=-limit,
                zmax=limit,
                xgap=1,
                ygap=1,
                colorbar={"title": {"text": f"direct effect on<br>{what}"}},
            )
        )
    return traces


def _bar_traces(go: Any, att: Any, options: List[Tuple[str, torch.Tensor, str]], top_k: int) -> List[Any]:
    """One set of horizontal bars per menu option; neurons: the ``top_k`` largest by mean |value|."""
    order = list(range(len(att.labels)))
    if att.by == "neuron":
        order = options[0][1].abs().argsort(descending=True)[:top_k].tolist()
    names = [_esc(att.labels[i]) for i in order]
    return [
        go.Bar(
            y=names,
            x=[_r4(v[i]) for i in order],
            orientation="h",
            visible=(n == 0),
            name=name,
            text=[f"{att.labels[i]}: {float(v[i]):+.4g}<br>{note}" for i in order],
            textposition="none",
            hovertemplate="%{text}<extra></extra>",
            marker={"color": [NEG_COLOR if float(v[i]) < 0 else POS_COLOR for i in order]},
        )
        for n, (name, v, note) in enumerate(options)
    ]


@renamed_keywords(top="top_k")
def attribution_figure(att: Any, *, top_k: int = 40) -> Any:
    """An :class:`~tl_logitlens.Attribution` as a plotly Figure: a layer x head heatmap for
    ``by="head"`` (layer 0 at the bottom, as in the static figure), horizontal bars (the ``top_k``
    largest by mean |value| for ``by="neuron"``) otherwise.

    The title names what is attributed (``logit(␣Paris) − logit(␣Rome)``; when prompts differ,
    each cell's hover names its own tokens). A menu switches between the mean over every real
    (prompt, position) cell and each cell (the first 64). Each head cell shows its value; hover:
    the component, its value (``:+.4g``), and for one cell the model's value and the constant
    term. The head heatmap's colour scale spans the heads alone (the other components, which it
    does not draw, are in the subtitle's sum). Colours as the static figures: the diverging
    :data:`~tl_logitlens.plots.style.SIGNED_CMAP` symmetric about zero, bars in its two ends.
    (``top=`` is the old spelling of ``top_k=``.)

    Example::

        >>> import tl_logitlens as tll
        >>> from tl_logitlens.plots.interactive import attribution_figure
        >>> model = tll.demo_model()
        >>> tokens = tll.demo.induction_prompt(model)
        >>> att = tll.direct_logit_attribution(model, tokens, answers=int(tokens[0, -11]), by="head")
        >>> fig = attribution_figure(att)
        >>> len(fig.data[0].z), len(fig.data[0].z[0])  # [layer][head]
        (2, 4)
        >>> fig.layout.title.text.split("<br>")[0]
        'direct logit attribution by head of logit(goat)'
    """
    if isinstance(top_k, bool) or not hasattr(top_k, "__index__") or int(top_k) < 1:
        raise LensInputError(f"top_k must be a positive int (how many neurons to show), got {top_k!r}")
    go = _go()
    options = _attribution_options(att)
    what = _esc(_answer_words(att))
    title = f"direct logit attribution by {att.by} of {what}"
    if att.by == "head":
        traces = _head_traces(go, att, options, what)
        axes = {"xaxis": {"title": {"text": "head"}, "dtick": 1}, "yaxis": {"title": {"text": "layer"}, "dtick": 1}}
        title += f"<br><sup>{_rest_of_heads(att, options[0][1])}</sup>"
    else:
        traces = _bar_traces(go, att, options, int(top_k))
        axes = {
            "xaxis": {"title": {"text": f"direct effect on {what}"}},
            "yaxis": {"autorange": "reversed", "type": "category"},
        }
    buttons = [
        {"label": name, "method": "update", "args": [{"visible": [i == n for i in range(len(options))]}]}
        for n, (name, _, _) in enumerate(options)
    ]
    fig = go.Figure(traces)
    height = max(360, 140 + 22 * (att.n_layers if att.by == "head" else len(traces[0].y)))
    menu = {"buttons": buttons, "x": 0.0, "y": _menu_y(height), "xanchor": "left", "yanchor": "bottom", "name": "cell"}
    fig.update_layout(
        title={"text": title, "y": 1, "yanchor": "top", "pad": {"t": 14}},
        updatemenus=[menu],
        margin={"t": _TOP_PX, "b": _BOTTOM_PX},
        height=height,
        meta={"view": "attribution", "by": att.by},
        **axes,
    )
    return fig


def _rest_of_heads(att: Any, mean: torch.Tensor) -> str:
    """The subtitle of a head page: what the heads add up to, and what the rest (not drawn) adds."""
    is_head = torch.tensor([bool(re.fullmatch(r"L\d+H\d+", label)) for label in att.labels])
    heads, others = float(mean[is_head].sum()), float(mean[~is_head].sum())
    constant, model = float(att.constant[att.real()].mean()), float(att.model_value[att.real()].mean())
    return (
        f"mean over prompts: heads {heads:+.3g}, the other components (embeddings, MLPs, biases) {others:+.3g}, "
        f"constant {constant:+.3g}; sum = model value {model:+.3g}"
    )


# -- per-layer curves --------------------------------------------------------------------------
def _curves(
    go: Any, ev: Any, stat: str, band: Tuple[float, float], name: str, group: str, lens_number: int = 0
) -> List[Any]:
    """Band edges and mean of one statistic: its colour from the style table, the lens's line style."""
    labels = list(ev.labels)
    mean, lo, hi = ev.mean(stat), ev.quantile(stat, band[0]), ev.quantile(stat, band[1])
    text = [
        f"{name} · {label}<br>mean {float(m):.4g}<br>"
        f"q{100 * band[0]:g} {float(a):.4g} · q{100 * band[1]:g} {float(b):.4g}"
        for label, m, a, b in zip(labels, mean, lo, hi)
    ]
    colour = METRIC_STYLE[stat].color
    line = LINE_STYLES[lens_number % len(LINE_STYLES)]
    x = list(range(len(labels)))
    edge = {"x": x, "mode": "lines", "line": {"width": 0}, "hoverinfo": "skip", "showlegend": False}
    return [
        go.Scatter(y=[_r4(v) for v in lo], legendgroup=group, **edge),
        go.Scatter(y=[_r4(v) for v in hi], fill="tonexty", fillcolor=_fade(colour), legendgroup=group, **edge),
        go.Scatter(
            x=x,
            y=[_r4(v) for v in mean],
            mode="lines+markers",
            line={"color": colour, "dash": line.dash},
            marker={"symbol": line.symbol},
            name=name,
            text=text,
            hovertemplate="%{text}<extra></extra>",
            legendgroup=group,
        ),
    ]


def _fade(colour: str) -> str:
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},0.2)"


def _check_statistics(statistics: Sequence[str]) -> List[str]:
    wanted = [statistics] if isinstance(statistics, str) else list(statistics)
    bad = [s for s in wanted if s not in NATS_STATISTICS]
    if not wanted or bad:
        raise LensInputError(
            f"statistics must be a non-empty selection of {NATS_STATISTICS} (the ones with quantiles), "
            f"got {statistics!r}"
        )
    return wanted


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
    ev: Any, *, statistics: Sequence[str] = NATS_STATISTICS, band: Tuple[float, float] = (0.25, 0.75)
) -> Any:
    """A :class:`~tl_logitlens.evaluate.LensEvaluation` as per-layer curves: each statistic's
    mean with a shaded band between two quantiles; hover shows the mean and both quantiles.

    Names and colours are those of the static figures (:data:`~tl_logitlens.plots.style.METRIC_STYLE`);
    each curve is ``[layer]``, one point per stack entry.

    Example::

        >>> import tl_logitlens as tll
        >>> from tl_logitlens.plots.interactive import evaluation_figure
        >>> model = tll.demo_model()
        >>> ev = tll.evaluate_lens(model, tll.demo.induction_prompt(model), progress=False)
        >>> [t.name for t in evaluation_figure(ev).data if t.name]
        ['KL to final', 'next-token loss', 'entropy']
    """
    go = _go()
    traces = []
    for stat in _check_statistics(statistics):
        traces += _curves(go, ev, stat, band, METRIC_STYLE[stat].name, stat)
    fig = go.Figure(traces)
    fig.update_layout(meta={"view": "evaluation"})
    return _curve_layout(fig, ev.labels, f"{ev.lens_name} lens over {ev.n_tokens:,} tokens", [])


def comparison_figure(
    comparison: Any, *, statistics: Sequence[str] = NATS_STATISTICS, band: Tuple[float, float] = (0.25, 0.75)
) -> Any:
    """Every lens's per-layer curves of a comparison (anything with ``.lenses`` and
    ``[name] -> LensEvaluation``); a menu picks the statistic.

    As in ``LensComparison.plot``, a statistic keeps its one colour
    (:data:`~tl_logitlens.plots.style.METRIC_STYLE`) and each lens has its own line style
    (:data:`~tl_logitlens.plots.style.LINE_STYLES`); each curve is ``[layer]``.

    Example::

        >>> import tl_logitlens as tll
        >>> from tl_logitlens.plots.interactive import comparison_figure
        >>> model = tll.demo_model()
        >>> tokens = tll.demo.induction_prompt(model)
        >>> cmp = tll.compare_lenses(model, tokens, {"logit": None, "tuned": tll.TunedLens(model)}, progress=False)
        >>> fig = comparison_figure(cmp)
        >>> [(t.name, t.line.dash) for t in fig.data if t.visible and t.name]
        [('logit', 'solid'), ('tuned', 'dash')]
    """
    go = _go()
    wanted = _check_statistics(statistics)
    names = list(comparison.lenses)
    traces, groups = [], []
    for stat in wanted:
        for n, lens in enumerate(names):
            part = _curves(go, comparison[lens], stat, band, str(lens), f"{stat}:{lens}", lens_number=n)
            traces += part
            groups += [stat] * len(part)
    for t, g in zip(traces, groups):
        t.visible = g == wanted[0]
    buttons = [
        {"label": METRIC_STYLE[s].name, "method": "update", "args": [{"visible": [g == s for g in groups]}]}
        for s in wanted
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


#: The page script's first lines (shared with the report page): ``inflate(element)`` is the text that
#: :func:`_pack` packed into the element (base85, then gzip, undone by the browser's DecompressionStream).
_INFLATE_JS = """  const A = "@ALPHABET@", m = new Uint8Array(128);
  for (let i = 0; i < 85; i++) m[A.charCodeAt(i)] = i;
  function b85(s) {
    const n = s.length, rem = n % 5, out = new Uint8Array(Math.floor(n / 5) * 4 + (rem ? rem - 1 : 0));
    for (let i = 0, o = 0; i < n; i += 5) {
      let v = 0;
      for (let j = 0; j < 5; j++) v = v * 85 + (i + j < n ? m[s.charCodeAt(i + j)] : 84);
      for (let k = 24; k >= 0 && o < out.length; k -= 8) out[o++] = (v >>> k) & 255;
    }
    return out;
  }
  async function inflate(el) {
    const stream = new Blob([b85(el.textContent.trim())]).stream().pipeThrough(new DecompressionStream("gzip"));
    return await new Response(stream).text();
  }
""".replace("@ALPHABET@", _ALPHABET)

_LOADER = (
    "\n(async () => {\n"
    + _INFLATE_JS
    + """  if (!window.Plotly) {
    if (!document.getElementById("tll-plotlyjs")) throw new Error("plotly.js did not load from " + "@SOURCE@");
    const lib = document.createElement("script");
    lib.textContent = await inflate(document.getElementById("tll-plotlyjs"));
    document.head.appendChild(lib);
  }
  const fig = JSON.parse(await inflate(document.getElementById("tll-figure")));
  const gd = document.getElementById("tll-plot");
  gd.textContent = "";
  await Plotly.newPlot(gd, fig.data, fig.layout, {displaylogo: false});
  gd.dataset.ready = "1";
})().catch((e) => {
  document.getElementById("tll-plot").textContent = "This page could not draw (it needs a browser with " +
    "DecompressionStream, and plotly.js: inlined, beside the page, or from the CDN): " + e;
  console.error(e);
});
"""
)


#: Where a page gets plotly.js (``plotly=`` of :func:`to_html`): inside the page, from :data:`PLOTLY_FILE` beside
#: it (pages of one folder share it), or from plotly's CDN (needs the network when the page opens).
PLOTLY_MODES = ("inline", "directory", "cdn")
#: The file a ``plotly="directory"`` page loads from its own folder.
PLOTLY_FILE = "plotly.min.js"


def _check_plotly_mode(plotly: Any) -> str:
    if not isinstance(plotly, str) or plotly not in PLOTLY_MODES:
        raise LensInputError(
            f"plotly must be 'inline' (plotly.js inside the page, ~1.8 MB), 'directory' ({PLOTLY_FILE} beside the "
            f"page, shared by every page of the folder) or 'cdn' (loaded from cdn.plot.ly when the page opens), "
            f"got {plotly!r}"
        )
    return plotly


def plotlyjs_text() -> str:
    """The text of :data:`PLOTLY_FILE`: plotly's own minified plotly.js, under the package's mark (so that a
    writer recognises it as its own, :data:`tl_logitlens.files.JS_MARK`)."""
    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    return f"{JS_MARK.decode()} {get_plotlyjs_version()}, shared by the pages beside it */\n{get_plotlyjs()}"


def page_html(fig: Any, title: str = "tl_logitlens", plotly: str = "inline") -> str:
    """An HTML page drawing ``fig``, the figure inlined and compressed; plotly.js as ``plotly`` says
    (:data:`PLOTLY_MODES`): inlined and compressed (the page is self-contained), ``<script src=plotly.min.js>``
    (``"directory"``) or plotly's CDN (``"cdn"``)."""
    import plotly.io as pio

    _check_plotly_mode(plotly)
    body = pio.to_json(fig, validate=False, pretty=False)
    if plotly == "inline":
        library = f'<script id="tll-plotlyjs" type="application/octet-stream">{_packed_plotlyjs()}</script>\n'
        source = "the page"
    else:
        from plotly.io._utils import plotly_cdn_url

        source = PLOTLY_FILE if plotly == "directory" else plotly_cdn_url()
        library = f'<script src="{html.escape(source, quote=True)}" charset="utf-8"></script>\n'
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8">{HTML_MARK.decode()}<title>{html.escape(title)}</title>'
        "</head>\n"
        f'<body style="margin:0;font-family:sans-serif">\n<div id="tll-plot">loading...</div>\n'
        f"{library}"
        f'<script id="tll-figure" type="application/octet-stream">{_pack(body.encode("utf-8"))}</script>\n'
        f"<script>{_LOADER.replace('@SOURCE@', source)}</script>\n</body></html>\n"
    )


def page_of(result: Any, *, title: Optional[str] = None, plotly: str = "inline", **kwargs: Any) -> str:
    """The page :func:`to_html` writes for ``result`` (or a plotly Figure), as text."""
    fig = figure(result, **kwargs)
    name = fig.layout.meta["view"] if fig.layout.meta else "figure"
    return page_html(fig, title or f"tl_logitlens: {name}", plotly=plotly)


def to_html(
    result: Any,
    path: Union[str, Path],
    *,
    title: Optional[str] = None,
    overwrite: bool = False,
    plotly: str = "inline",
    **kwargs: Any,
) -> Path:
    """Write the interactive view of ``result`` (or a plotly Figure) to ``path`` as a page, atomically;
    returns the path.

    ``plotly`` says where the page gets plotly.js (:data:`PLOTLY_MODES`): ``"inline"`` (default:
    inside the page, compressed, ~1.8 MB; the page opens anywhere without a network),
    ``"directory"`` (:data:`PLOTLY_FILE` written beside the page, once, and shared by every page of
    that folder: move the folder as a whole) or ``"cdn"`` (plotly's CDN; the page needs the network).

    The path's folder must exist; an existing file (the page, or ``plotly.min.js`` beside it) is
    replaced only if this package wrote it (or with ``overwrite=True``); a folder or a missing
    folder is refused before the page is built (:func:`tl_logitlens.files.check_file`).

    Example::

        >>> import os, tempfile
        >>> import tl_logitlens as tll
        >>> from tl_logitlens.plots.interactive import to_html
        >>> model = tll.demo_model()
        >>> folder = tempfile.mkdtemp()
        >>> lens = tll.logit_lens(model, tll.demo.induction_prompt(model))
        >>> _ = to_html(lens, os.path.join(folder, "lens.html"), plotly="directory")
        >>> sorted(os.listdir(folder))
        ['lens.html', 'plotly.min.js']
    """
    _go()
    _check_plotly_mode(plotly)
    check_file(path, overwrite=overwrite, what="to_html", mark=HTML_MARK)
    library = Path(path).expanduser().parent / PLOTLY_FILE
    if plotly == "directory":
        check_file(library, overwrite=overwrite, what="to_html", mark=JS_MARK)
    text = page_of(result, title=title, plotly=plotly, **kwargs)
    if plotly == "directory":
        write_plotlyjs(library, overwrite=overwrite)
    return write_owned_text(
        path,
        text,
        overwrite=overwrite,
        what="to_html",
        mark=HTML_MARK,
    )


def write_plotlyjs(path: Union[str, Path], *, overwrite: bool = False, folder: Any = None) -> Path:
    """Write :func:`plotlyjs_text` to ``path`` (or as :data:`PLOTLY_FILE` into an
    :class:`~tl_logitlens.files.OwnedFolder` ``folder``), unless the same text is already there."""
    text = plotlyjs_text()
    target = Path(path) if folder is None else Path(folder.path) / PLOTLY_FILE
    try:
        if target.is_file() and target.read_text(encoding="utf-8") == text:
            return target  # the pages of this folder already share this very file
    except (OSError, UnicodeDecodeError):
        pass
    if folder is not None:
        return folder.write_text(PLOTLY_FILE, text)
    return write_owned_text(
        target,
        text,
        overwrite=overwrite,
        what="to_html",
        mark=JS_MARK,
    )


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
