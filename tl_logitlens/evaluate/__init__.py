"""Lenses over whole datasets, streamed in bounded memory: how well each layer predicts, on average.

- :mod:`.running`: mergeable statistics (float64 sums, extremes, fixed-bin histograms and the
  quantiles read from them), exact across shards and processes
- :mod:`.stream`: the one streaming pass that reads every lens of a run (the model once per batch)
- :mod:`.evaluation`: :func:`evaluate_lens` and :class:`LensEvaluation`
- :mod:`.compare`: :func:`compare_lenses` and :class:`LensComparison`

Example::

    >>> import torch
    >>> import tl_logitlens as tll
    >>> from tl_logitlens.evaluate import evaluate_lens
    >>> model = tll.demo_model()
    >>> tokens = torch.cat([tll.demo.induction_prompt(model, seed=s) for s in range(2)])
    >>> evaluate_lens(model, tokens, progress=False).labels
    ['0_pre', '1_pre', 'final_post']
"""

from __future__ import annotations

from .compare import LensComparison, compare_lenses
from .evaluation import LensEvaluation, evaluate_lens
from .running import HIST_BINS_PER_DECADE, HIST_HIGH, HIST_LOW, N_BINS, STATISTICS, RunningStats

__all__ = [
    "LensComparison",
    "compare_lenses",
    "LensEvaluation",
    "evaluate_lens",
    "HIST_BINS_PER_DECADE",
    "HIST_HIGH",
    "HIST_LOW",
    "N_BINS",
    "STATISTICS",
    "RunningStats",
]
