"""The logit lens over a whole dataset, streamed: how well each layer predicts, on average.

:func:`evaluate_lens` runs the model one batch at a time with hooks that keep only the
residual stream (``resid_pre`` of every layer and the final ``resid_post``; the forward
pass stops there, before ``ln_final`` and the unembedding), reads every stack entry
through the final norm and the unembedding with the package's one kernel
(:func:`tl_logitlens.kernel.read_rows`), and folds the per-token numbers into running
statistics. Nothing grows with the number of batches: no activation cache, no per-token
results, just fixed-size sums, counts and histograms per stack entry.

Per stack entry (``0_pre .. final_post``) it reports, over every scored token (a position
that has a true next token; padding and each sequence's last token are left out):

- ``kl_to_final``: KL(final || entry), nats; ``0`` at ``final_post``.
- ``next_token_loss``: cross-entropy of the true next token, nats; ``perplexity`` is
  ``exp(mean loss)``. At ``final_post`` this is the model's own loss.
- ``entropy``: entropy of the entry's full-vocabulary distribution, nats.
- ``top1_agreement``: how often the entry's top token is the model's own top token.
- ``top1_accuracy``: how often the entry's top token is the true next token.

Means are exact (float64 sums of the per-token values). Quantiles come from a fixed
histogram per entry and statistic (200 log-spaced bins per decade over ``[1e-6, 1e4)``, plus
one bin below and one above), so a quantile is off by at most one bin: a relative error below
1.2% in that range (:mod:`tl_logitlens.evaluate.running` says how they are read).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import LensInputError
from ..files import SavedAsJson
from ..inputs import check_stream_args, resolve_model, warn_file_names
from ..lenses import check_lens, is_identity, lens_name
from ..stacks import stack_labels
from .running import STATISTICS, FieldError, RunningStats, reading_field
from .stream import Run, stream_lenses

_FORMAT = "tl_logitlens.LensEvaluation/1"


@dataclass
class LensEvaluation(SavedAsJson):
    """Per-layer summary of the logit lens over a dataset (from :func:`evaluate_lens`).

    ``layer`` below is the stack entry axis, aligned with ``labels``.

    Attributes:
        labels: stack entry labels, ``0_pre .. final_post``.
        stats: the :class:`~tl_logitlens.evaluate.running.RunningStats` of the pass: per entry and
            statistic a float64 sum, the extremes and a histogram, and the top-1 counts.
        n_tokens: how many tokens were scored (positions with a true next token).
        n_sequences: how many sequences were read (a sequence split into windows counts once).
        norm: the final-norm mode the lens read with.
        lens_name: the lens's name (``"logit"`` for none; a file saved before lenses had
            names loads as ``"logit"``).
        sums: ``{statistic: [layer]}`` float64 sums over tokens, for :data:`STATISTICS` (read from ``stats``,
            as are the next four).
        minima, maxima: ``{statistic: [layer]}`` the smallest and largest value seen.
        histograms: ``{statistic: [layer, bins]}`` int64 counts in the fixed bins.
        top1_agree: ``[layer]`` tokens whose top-1 equals the final entry's top-1.
        top1_correct: ``[layer]`` tokens whose top-1 is the true next token.
        seconds: wall time of the evaluation.
        meta: ``model`` and ``lens``; with long sequences split into windows also
            ``split_sequences``, ``windows`` (how many windows they became) and ``n_ctx``.

    Example::

        >>> import torch
        >>> import tl_logitlens as tll
        >>> from tl_logitlens.evaluate import evaluate_lens
        >>> model = tll.demo_model()
        >>> tokens = torch.cat([tll.demo.induction_prompt(model, seed=s) for s in range(4)])
        >>> ev = evaluate_lens(model, tokens, progress=False)
        >>> ev.labels[-1], ev.n_tokens == tokens.shape[0] * (tokens.shape[1] - 1)
        ('final_post', True)
        >>> float(ev.mean("kl_to_final")[-1]) < 1e-5
        True
    """

    labels: List[str]
    stats: RunningStats
    norm: str
    seconds: float = 0.0
    meta: Dict[str, Any] = field(default_factory=dict)
    lens_name: str = "logit"

    # The statistics live in the running statistics; these name them as the evaluation does.
    n_tokens = property(lambda self: self.stats.n_tokens, doc="How many tokens were scored.")
    n_sequences = property(lambda self: self.stats.n_sequences, doc="How many sequences were read.")
    sums = property(lambda self: self.stats.sums, doc="``{statistic: [layer]}`` float64 sums over tokens.")
    minima = property(lambda self: self.stats.minima, doc="``{statistic: [layer]}`` the smallest value seen.")
    maxima = property(lambda self: self.stats.maxima, doc="``{statistic: [layer]}`` the largest value seen.")
    histograms = property(lambda self: self.stats.hists, doc="``{statistic: [layer, bins]}`` int64 counts.")
    top1_agree = property(lambda self: self.stats.agree, doc="``[layer]`` tokens whose top-1 is the final's.")
    top1_correct = property(lambda self: self.stats.correct, doc="``[layer]`` tokens whose top-1 is the next token.")

    # -- summaries -----------------------------------------------------------------------
    def mean(self, statistic: str) -> torch.Tensor:
        """``[layer]`` mean of ``statistic`` over the scored tokens (float64)."""
        return self.stats.mean(statistic)

    def quantile(self, statistic: str, q: float) -> torch.Tensor:
        """``[layer]`` the ``q``-quantile of ``statistic`` from its histogram (within one bin, see
        :mod:`tl_logitlens.evaluate.running`)."""
        return self.stats.quantile(statistic, q)

    @property
    def perplexity(self) -> torch.Tensor:
        """``[layer]`` ``exp(mean next-token loss)``."""
        return torch.exp(self.mean("next_token_loss"))

    @property
    def top1_agreement(self) -> torch.Tensor:
        """``[layer]`` fraction of tokens whose top-1 is the final entry's top-1."""
        return self.top1_agree.double() / max(1, self.n_tokens)

    @property
    def top1_accuracy(self) -> torch.Tensor:
        """``[layer]`` fraction of tokens whose top-1 is the true next token."""
        return self.top1_correct.double() / max(1, self.n_tokens)

    def to_dataframe(self, quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)) -> Any:
        """One row per stack entry as a pandas DataFrame.

        Columns: ``layer``, ``n_tokens``, then for each statistic ``<stat>_mean`` and
        ``<stat>_q<percent>`` (e.g. ``kl_to_final_q50``), ``perplexity``,
        ``top1_agreement`` and ``top1_accuracy``.
        """
        import pandas as pd

        columns: Dict[str, Any] = {"layer": list(self.labels), "n_tokens": [self.n_tokens] * len(self.labels)}
        for stat in STATISTICS:
            columns[f"{stat}_mean"] = self.mean(stat).tolist()
            for q in quantiles:
                columns[f"{stat}_q{100 * q:g}".replace(".", "_")] = self.quantile(stat, q).tolist()
        columns["perplexity"] = self.perplexity.tolist()
        columns["top1_agreement"] = self.top1_agreement.tolist()
        columns["top1_accuracy"] = self.top1_accuracy.tolist()
        return pd.DataFrame(columns)

    def plot(
        self,
        *,
        ax: Any = None,
        statistics: Sequence[str] = STATISTICS,
        band: Tuple[float, float] = (0.25, 0.75),
        title: Optional[str] = None,
        **kwargs: Any,
    ) -> Any:
        """Per-layer curves: each statistic's mean with a band between two quantiles.

        Draws with :func:`tl_logitlens.plots.plot_layer_curves` and returns its ``Figure``.
        ``band=(0.25, 0.75)`` shades the interquartile range; other keyword arguments
        (``ylabel``, ``logy``) go to the plotting function.
        """
        from ..plots import plot_layer_curves

        curves = {}
        for stat in statistics:
            curves[stat] = (self.mean(stat), self.quantile(stat, band[0]), self.quantile(stat, band[1]))
        if title is None:
            title = f"{self.lens_name} lens over {self.n_tokens:,} tokens"
        kwargs.setdefault("ylabel", "nats")
        return plot_layer_curves(self.labels, curves, ax=ax, title=title, **kwargs)

    def show(self, **kwargs: Any) -> Any:
        """Display the interactive plotly view in a notebook and return the Figure
        (:mod:`tl_logitlens.plots.interactive`)."""
        from ..plots.interactive import show

        return show(self, **kwargs)

    def to_html(self, path: Any, **kwargs: Any) -> Any:
        """Write the interactive view to ``path`` as a self-contained page (no network needed to open it)."""
        from ..plots.interactive import to_html

        return to_html(self, path, **kwargs)

    def __repr__(self) -> str:
        kl = ", ".join(f"{v:.3g}" for v in self.mean("kl_to_final").tolist())
        return (
            f"LensEvaluation({len(self.labels)} entries, {self.n_tokens} tokens, "
            f"{self.n_sequences} sequences, mean KL to final [{kl}])"
        )

    # -- persistence ---------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """Everything stored, as JSON-ready Python values (histograms sparse: ``[[bin, count], ...]``)."""
        return {
            "format": _FORMAT,
            "labels": list(self.labels),
            "norm": self.norm,
            "lens_name": self.lens_name,
            "seconds": float(self.seconds),
            "meta": dict(self.meta),
            **self.stats.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> LensEvaluation:
        """Inverse of :meth:`to_dict`; a malformed dict is refused naming the field."""
        if not isinstance(data, Mapping):
            raise LensInputError(f"not a saved LensEvaluation: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != _FORMAT:
            raise LensInputError(f"not a saved LensEvaluation (format {data.get('format')!r}, expected {_FORMAT!r})")
        try:
            with reading_field("labels"):
                labels = [str(label) for label in data["labels"]]
            stats = RunningStats.from_dict(data, len(labels))
            with reading_field("norm"):
                norm = str(data["norm"])
            with reading_field("seconds"):
                seconds = float(data.get("seconds", 0.0))
            with reading_field("meta"):
                meta = dict(data.get("meta", {}))
            lens_name = str(data.get("lens_name", "logit"))  # files from before named lenses
        except FieldError as err:
            lacks = err.problem.startswith("lacks")
            hint = "; the file is damaged or was not written by LensEvaluation.save" if lacks else ""
            raise LensInputError(f"malformed saved LensEvaluation: {err}{hint}") from None
        return cls(labels=labels, stats=stats, norm=norm, seconds=seconds, meta=meta, lens_name=lens_name)


def evaluate_lens(
    model: Any,
    data: Any,
    *,
    lens: Optional[Callable[[torch.Tensor, str], torch.Tensor]] = None,
    norm: str = "recompute",
    batch_size: int = 8,
    max_tokens: Optional[int] = None,
    progress: bool = True,
    distributed: Optional[bool] = None,
) -> LensEvaluation:
    """Evaluate the logit lens over a dataset, one batch at a time, in bounded memory.

    For every batch the model runs with hooks on the residual stream only (and stops
    before ``ln_final``), every stack entry ``0_pre .. final_post`` is read through the
    final norm and the unembedding by the readout kernel, and the per-token KL to the
    final layer, next-token loss, entropy and top-1 hits are folded into running sums and
    histograms (see the module docstring for the quantiles' precision). Memory does not
    grow with the number of batches.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` in eval mode.
        data: token ids ``[n, seq]`` (e.g. a ``.pt`` tensor from ``torch.load``), taken
            ``batch_size`` rows at a time; a list (or any iterable) of strings, tokenised
            with the model's tokenizer ``batch_size`` at a time and right-padded; or an
            iterable of batches (a torch ``DataLoader``), each a tensor ``[b, seq]``, a
            dict with ``input_ids`` (and optionally a right-padded ``attention_mask``) or a
            list of strings. Padding is never scored. A sequence longer than the model's
            context is split into windows of ``n_ctx`` tokens overlapping by one (every
            token still scored once), with a warning; ``meta`` then holds
            ``split_sequences``, ``windows`` and ``n_ctx``. Strings are always the text
            itself: a string that names an existing file is read as text, with a warning
            naming it (pass the file's text, or use the command line's ``--data``).
        lens: a :class:`~tl_logitlens.lenses.Lens` (e.g. a
            :class:`~tl_logitlens.lenses.TunedLens`) or any callable
            ``f(vectors [batch, pos, d_model], label) -> vectors`` applied to each entry
            (``label`` such as ``"3_pre"``, ``"final_post"``) before the norm; KL stays
            measured against the model's own final distribution. ``None`` or a
            ``LogitLens``: the plain logit lens.
        norm: ``"recompute"`` (the logit lens), ``"cached"`` or ``"none"``.
        batch_size: sequences per forward pass for tensor and string data.
        max_tokens: stop after exactly this many scored tokens (``None``: all the data).
        progress: show a tqdm progress bar with the tokens-per-second rate (rank 0 only).
        distributed: inside an initialised ``torch.distributed`` process group (``None``:
            detected; ``True``: required; ``False``: ignore it), each rank evaluates its
            shard of ``data`` and the statistics are merged exactly, so every rank returns
            the same result as one process on all the data (shard rule and the split of
            ``max_tokens``: :mod:`tl_logitlens.distributed`). Only rank 0 shows progress and
            warns; a rank that fails makes every rank raise.

    Returns:
        :class:`LensEvaluation` with per-entry means, quantiles, perplexity and top-1
        rates over the scored tokens (every position with a true next token).

    Example::

        >>> import torch
        >>> import tl_logitlens as tll
        >>> from tl_logitlens.evaluate import evaluate_lens
        >>> model = tll.demo_model()
        >>> tokens = torch.cat([tll.demo.induction_prompt(model, seed=s) for s in range(4)])
        >>> ev = evaluate_lens(model, tokens, batch_size=2, progress=False)
        >>> list(ev.to_dataframe()["layer"])
        ['0_pre', '1_pre', 'final_post']
        >>> bool(ev.top1_agreement[-1] == 1.0)
        True
    """
    view = resolve_model(model)
    batch_size, max_tokens = check_stream_args(norm, batch_size, max_tokens)
    check_lens(lens, view, stack_labels(view.n_layers, False))
    warn_file_names(data, "evaluate_lens")
    named = lens_name(lens)  # before a LogitLens becomes None below
    if is_identity(lens):
        lens = None

    run = stream_lenses(
        view,
        data,
        [lens],
        norm=norm,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
        desc="evaluate_lens",
        distributed=distributed,
    )
    finish_pass(run, "evaluate_lens")
    return evaluation_of(run, 0, norm, named, lens is not None)


def finish_pass(run: Run, who: str) -> None:
    """Refuse a pass that read nothing, and warn (at the caller's caller) about split sequences."""
    running = run.running[0]
    if running.n_sequences == 0:
        raise LensInputError("data is empty: no sequences were read")
    if run.counts["split"] and run.main:  # under a process group, rank 0 warns for all
        n_ctx = run.n_ctx
        warnings.warn(
            f"{who}: {run.counts['split']} sequence(s) longer than the model's context of {n_ctx} "
            f"tokens were split into {run.counts['windows']} windows of at most {n_ctx} tokens (overlapping "
            "by one, so every token is scored once; a window's first tokens see only that window). "
            "The counts are in the result's meta.",
            UserWarning,
            stacklevel=3,
        )
    if running.n_tokens == 0:
        raise LensInputError("no token was scored: every sequence is shorter than two tokens")


def evaluation_of(run: Run, i: int, norm: str, name: str, transformed: bool) -> LensEvaluation:
    """The :class:`LensEvaluation` of lens ``i`` of a finished pass."""
    meta: Dict[str, Any] = {"model": run.view.model_name, "lens": transformed}
    if run.ranks is not None:
        meta["ranks"] = run.ranks
    if run.counts["split"]:
        meta["split_sequences"] = run.counts["split"]
        meta["windows"] = run.counts["windows"]
        meta["n_ctx"] = run.n_ctx
    return LensEvaluation(
        labels=list(run.labels), stats=run.running[i], norm=norm, seconds=run.seconds, meta=meta, lens_name=name
    )
