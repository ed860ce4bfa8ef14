"""The one style of every figure: metric names and colours, colour maps, sizes, captions.

Every figure reads its words and colours from here, so the same metric has the same name and
colour in :func:`~tl_logitlens.plots.plot_lens_metrics`, ``LensEvaluation.plot`` and any other
per-layer figure, and a change of wording happens in one place.

Sizes follow print: a figure is at most one page wide (:data:`WIDTHS`, ``"page"`` = 6.9 in,
``"column"`` = 3.3 in, the text widths of a two-column paper); what does not fit is shrunk,
elided or thinned, and the figure says so.

Example::

    >>> from tl_logitlens.plots.style import METRIC_STYLE, metric_style
    >>> metric_style("kl_to_final") == metric_style("KL to final")
    True
    >>> METRIC_STYLE["entropy"].name
    'entropy'
"""

from __future__ import annotations

import re
from typing import Dict, NamedTuple, Optional, Tuple

#: ``metric`` of :func:`~tl_logitlens.plots.plot_lens` -> (colour-bar label, colour map). Dark
#: always means "confident / right": high probability or logit, low rank, entropy, KL or loss.
LENS_METRICS: Dict[str, Tuple[str, str]] = {
    "prob": ("top-1 probability", "Blues"),
    "logit": ("top-1 logit", "Blues"),
    "rank": ("rank of true next token (0 = top)", "Blues_r"),
    "entropy": ("entropy (nats)", "Blues_r"),
    "kl": ("KL(final \u2016 layer) (nats)", "Blues_r"),
    "loss": ("loss on the true next token (nats)", "Blues_r"),
}
#: ``metric`` of :func:`~tl_logitlens.plots.plot_trajectory`.
TRAJECTORY_METRICS = ("prob", "rank", "logit")
#: ``kind`` of :func:`~tl_logitlens.plots.plot_attribution`.
ATTRIBUTION_KINDS = ("bar", "line", "heatmap", "barh")


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


def metric_style(key: str) -> Optional[MetricStyle]:
    """The style of a statistic given by field name (``"kl_to_final"``) or shown name, else None."""
    return METRIC_STYLE.get(key) or _BY_NAME.get(key)


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
    raise ValueError(
        f"width must be 'page' ({WIDTHS['page']} in), 'column' ({WIDTHS['column']} in) "
        f"or a positive number of inches, got {width!r}"
    )
