"""Figures of logit-lens and direct-logit-attribution results (matplotlib), one module per family.

- :mod:`.style`: the one table of metric names and colours (static and interactive alike), colour
  maps, line styles, width presets, captions
- :mod:`.layout`: sizes, fonts, text measured and elided to fit, tick labels, decoding, ``save_figure``
- :mod:`.lens`: :func:`plot_lens`, the logit-lens heatmap (small multiples for several prompts)
- :mod:`.lines`: :func:`plot_trajectory`, :func:`plot_layer_curves`, :func:`plot_lens_metrics`,
  :func:`plot_group_trajectory`, :func:`plot_lens_comparison`
  (``LensEvaluation.plot`` draws with :func:`plot_layer_curves`, ``LensComparison.plot`` with
  :func:`plot_lens_comparison`)
- :mod:`.attribution`: :func:`plot_attribution`, :func:`plot_attribution_positions`,
  :func:`plot_source_attribution` (source tokens x heads)
- :mod:`.interactive`: plotly views behind ``result.show()`` and ``result.to_html(path)``

Every function takes a result object (:class:`~tl_logitlens.LensResult`,
:class:`~tl_logitlens.Attribution` or :class:`~tl_logitlens.evaluate.LensComparison`, read
duck-typed) as its one positional argument, and everything else by keyword, ``ax=`` first: it
draws into ``ax`` when one is given (otherwise into a new figure sized to the data), and returns
the ``Figure``. Nothing here runs the model. A bad argument raises
:class:`~tl_logitlens.errors.LensInputError` (a ``ValueError``) that names it.

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

Sizes are for print. Every drawer takes ``width="page"`` (6.9 in, the default), ``"column"``
(3.3 in) or a number of inches: the widest a new figure may be; a figure smaller by nature
stays smaller. Text that does not fit is elided (``…``) or thinned, and the figure says so; the
full text stays in the data. :func:`save_figure` writes a figure at print resolution (300 dpi by
default). Stack entries are explained under each new figure: ``0_pre`` is the residual stream
before block 0, ``final_post`` the stream after the last block and final norm (the model's
output). Ranks are 0-based everywhere (0 = top).

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

from .attribution import plot_attribution, plot_attribution_positions, plot_source_attribution
from .layout import save_figure
from .lens import plot_lens
from .lines import (
    plot_group_trajectory,
    plot_layer_curves,
    plot_lens_comparison,
    plot_lens_metrics,
    plot_trajectory,
)
from .style import ATTRIBUTION_KINDS, LENS_METRICS, METRIC_STYLE, TRAJECTORY_METRICS, WIDTHS

__all__ = [
    "LENS_METRICS",
    "TRAJECTORY_METRICS",
    "ATTRIBUTION_KINDS",
    "METRIC_STYLE",
    "WIDTHS",
    "plot_lens",
    "plot_trajectory",
    "plot_lens_metrics",
    "plot_layer_curves",
    "plot_attribution",
    "plot_attribution_positions",
    "plot_source_attribution",
    "plot_group_trajectory",
    "plot_lens_comparison",
    "save_figure",
]
