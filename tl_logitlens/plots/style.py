"""The one style of every figure: metric names and colours, colour maps, sizes, captions.

Every figure, static (matplotlib) or interactive (plotly), reads its words and colours from
here, so the same metric has the same name and colour in :func:`~tl_logitlens.plots.plot_lens`
and the interactive heatmap, in :func:`~tl_logitlens.plots.plot_lens_metrics`,
``LensEvaluation.plot``, ``LensComparison.plot`` and their interactive views, and a change of
wording happens in one place.

Sizes follow print: a figure is at most one page wide (:data:`WIDTHS`, ``"page"`` = 6.9 in,
``"column"`` = 3.3 in, the text widths of a two-column paper); what does not fit is shrunk,
elided or thinned, and the figure says so.

Example::

    >>> from tl_logitlens.plots.style import LENS_METRIC_STYLE, METRIC_STYLE, TARGET_WORDS
    >>> from tl_logitlens.plots.style import metric_style, plotly_colorscale
    >>> metric_style("kl_to_final") == metric_style("KL to final")
    True
    >>> METRIC_STYLE["entropy"].name
    'entropy'
    >>> LENS_METRIC_STYLE["kl"].label(), LENS_METRIC_STYLE["rank"].label(TARGET_WORDS["other"])
    ('KL to final (nats)', 'target rank (0 = top)')
    >>> plotly_colorscale("Blues")[-1]
    [1.0, '#08306b']
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from ..errors import LensInputError


class MetricStyle(NamedTuple):
    """How one per-layer statistic is named and coloured in every figure."""

    name: str
    color: str


#: Per-layer statistics, keyed by the result's field name. Colours from the Okabe-Ito palette
#: (distinct for colour-blind readers and in greyscale print).
METRIC_STYLE: Dict[str, MetricStyle] = {
    "entropy": MetricStyle("entropy", "#0072B2"),
    "kl_to_final": MetricStyle("KL to final", "#D55E00"),
    "next_token_loss": MetricStyle("next-token loss", "#009E73"),
    "perplexity": MetricStyle("perplexity", "#CC79A7"),
    "top1_agreement": MetricStyle("top-1 agreement with final", "#E69F00"),
    "top1_accuracy": MetricStyle("top-1 accuracy", "#56B4E9"),
}
_BY_NAME = {s.name: s for s in METRIC_STYLE.values()}

#: Per-layer statistics in nats, summarised by a mean and quantiles per stack entry (a dataset
#: evaluation's ``STATISTICS``, in its order).
NATS_STATISTICS: Tuple[str, ...] = ("kl_to_final", "next_token_loss", "entropy")
#: Per-layer rates in [0, 1], one value per stack entry.
RATE_STATISTICS: Tuple[str, ...] = ("top1_agreement", "top1_accuracy")
#: What :func:`~tl_logitlens.plots.plot_lens_comparison` draws by default: the nats, then one rate.
COMPARISON_STATISTICS: Tuple[str, ...] = NATS_STATISTICS + ("top1_agreement",)


def metric_style(key: str) -> Optional[MetricStyle]:
    """The style of a statistic given by field name (``"kl_to_final"``) or shown name, else None."""
    return METRIC_STYLE.get(key) or _BY_NAME.get(key)


class LineStyle(NamedTuple):
    """How one lens is told apart when several share a figure (the statistic keeps its colour)."""

    linestyle: Any  # matplotlib
    marker: str  # matplotlib
    dash: str  # plotly
    symbol: str  # plotly


#: One line style per lens, in order (cycled past six), for matplotlib and plotly alike.
LINE_STYLES: Tuple[LineStyle, ...] = (
    LineStyle("-", "o", "solid", "circle"),
    LineStyle("--", "s", "dash", "square"),
    LineStyle(":", "^", "dot", "triangle-up"),
    LineStyle("-.", "D", "dashdot", "diamond"),
    LineStyle((0, (5, 1, 1, 1)), "v", "10px,2px,2px,2px", "triangle-down"),
    LineStyle((0, (1, 3)), "P", "2px,6px", "cross"),
)


class LensMetric(NamedTuple):
    """How one lens-heatmap metric is named and coloured, in the static and the interactive heatmap.

    ``{target}`` in a name stands for what the first target is (:data:`TARGET_WORDS`).
    """

    name: str  # menus and titles
    unit: str  # after the name on the colour bar ("" for none)
    cmap: str  # matplotlib colour map; the interactive view draws the same colours

    def label(self, target: str = "next-token") -> str:
        """The colour-bar label: the name, then the unit in brackets."""
        name = self.name.format(target=target)
        return f"{name} ({self.unit})" if self.unit else name


#: How ``{target}`` reads in a lens metric's name: the true next token (``targets="next"``), or another.
TARGET_WORDS: Dict[str, str] = {"next": "next-token", "other": "target"}
#: Every lens-heatmap metric, static and interactive, keyed as ``metric=`` takes it. Dark always
#: means "confident / right": high probability or logit, low rank, entropy, KL or loss.
LENS_METRIC_STYLE: Dict[str, LensMetric] = {
    "prob": LensMetric("top-1 probability", "", "Blues"),
    "target_prob": LensMetric("{target} probability", "", "Blues"),
    "logit": LensMetric("top-1 logit", "", "Blues"),
    "rank": LensMetric("{target} rank", "0 = top", "Blues_r"),
    "entropy": LensMetric(METRIC_STYLE["entropy"].name, "nats", "Blues_r"),
    "kl": LensMetric(METRIC_STYLE["kl_to_final"].name, "nats", "Blues_r"),
    "loss": LensMetric(METRIC_STYLE["next_token_loss"].name, "nats", "Blues_r"),
}
#: ``metric`` of :func:`~tl_logitlens.plots.plot_lens` -> (colour-bar label, colour map), from
#: :data:`LENS_METRIC_STYLE` (``rank`` there is the true next token's).
LENS_METRICS: Dict[str, Tuple[str, str]] = {
    key: (LENS_METRIC_STYLE[key].label(), LENS_METRIC_STYLE[key].cmap)
    for key in ("prob", "logit", "rank", "entropy", "kl", "loss")
}
#: ``metric`` of :func:`~tl_logitlens.plots.plot_trajectory`.
TRAJECTORY_METRICS = ("prob", "rank", "logit")
#: ``kind`` of :func:`~tl_logitlens.plots.plot_attribution`.
ATTRIBUTION_KINDS = ("bar", "line", "heatmap", "barh")
#: Signed values (attributions): a diverging map, limits symmetric about zero; blue pushes towards
#: the answer, red against.
SIGNED_CMAP = "RdBu"


def plotly_colorscale(cmap: str, stops: int = 41) -> List[List[Any]]:
    """A matplotlib colour map as a plotly colour scale, ``[[position, "#rrggbb"], ...]``.

    ``stops`` evenly spaced samples; 41 hit every node of ColorBrewer's 9- and 11-colour maps
    (``Blues``, ``RdBu``), so plotly draws exactly the colours matplotlib does.
    """
    import matplotlib
    from matplotlib.colors import to_hex

    colormap = matplotlib.colormaps[cmap]
    return [[i / (stops - 1), to_hex(colormap(i / (stops - 1)))] for i in range(stops)]


#: Width presets in inches: a paper's text column and its full text width.
WIDTHS: Dict[str, float] = {"column": 3.3, "page": 6.9}
MAX_HEIGHT = 9.0  # inches: a page's text height
BASE_FONT = 8.0  # points: figure text at print size
MIN_FONT = 6.0  # points: nothing smaller is drawn
CHAR_WIDTH = 0.62 / 72  # inches per point of font size: an average glyph, for sizing before drawing
POS_COLOR, NEG_COLOR = "#2166ac", "#b2182b"  # the ends of RdBu
MARK_COLOR = "#e66101"
NAN_COLOR = "#d9d9d9"
BAND_ALPHA = 0.10  # quantile bands: light enough that two overlapping bands stay readable
ELLIPSIS = "\u2026"
NEURON = re.compile(r"^L\d+N\d+$")

#: Words for readers outside the field, shown under figures whose axes use stack labels.
STACK_CAPTION = (
    "0_pre = residual stream before block 0; final_post = stream after the last block "
    "and final norm, i.e. the model's output"
)
CONSTANT_CAPTION = (
    "constant = the unembedding bias and norm bias, which no component writes; "
    "the components plus the constant add up to the model value"
)
ACCUMULATED_LABEL = "accumulated stream's reading of"


def resolve_width(width: object) -> float:
    """``"page"``, ``"column"`` or a positive number of inches, as inches (a clear error otherwise)."""
    if isinstance(width, str) and width in WIDTHS:
        return WIDTHS[width]
    if isinstance(width, (int, float)) and not isinstance(width, bool) and width > 0:
        return float(width)
    raise LensInputError(
        f"width must be 'page' ({WIDTHS['page']} in), 'column' ({WIDTHS['column']} in) "
        f"or a positive number of inches, got {width!r}"
    )
