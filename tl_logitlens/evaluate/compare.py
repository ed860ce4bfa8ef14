"""Several lenses over one dataset, side by side, in one streaming pass.

:func:`compare_lenses` gives, for every lens and stack entry, the statistics of
:func:`tl_logitlens.evaluate.evaluate_lens` (KL to the final distribution, next-token loss
and perplexity, entropy, top-1 agreement with the final layer, top-1 accuracy). The model
runs once per batch for all the lenses, the captured residual stream is shared, and the
final distribution (the reference every KL is measured against) is read once per batch:
the logit lens's ``final_post`` entry is that reference, and a TunedLens reads
``final_post`` untransformed, so it shares it too. :class:`LensComparison` holds one
:class:`~tl_logitlens.evaluate.LensEvaluation` per lens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from ..errors import LensInputError
from ..files import SavedAsJson
from ..inputs import check_stream_args, resolve_model, warn_file_names
from ..lenses import check_lens, is_identity
from ..stacks import stack_labels
from .evaluation import LensEvaluation, evaluation_of, finish_pass
from .running import STATISTICS
from .stream import stream_lenses

_FORMAT = "tl_logitlens.LensComparison/1"
#: What :meth:`LensComparison.plot` draws by default: the nats of :data:`STATISTICS`, then the rate
#: (the default of :func:`tl_logitlens.plots.plot_lens_comparison`, which draws it).
PLOT_STATISTICS = STATISTICS + ("top1_agreement",)


@dataclass
class LensComparison(SavedAsJson):
    """Per-layer statistics of several lenses over the same tokens (from :func:`compare_lenses`).

    Attributes:
        evaluations: ``{name: LensEvaluation}`` in the order the lenses were given; each
            evaluation's ``lens_name`` is its name here.
        seconds: wall time of the pass.
        meta: ``model`` and, with long sequences split, ``split_sequences``, ``windows``, ``n_ctx``.

    ``comparison[name]`` is that lens's :class:`~tl_logitlens.evaluate.LensEvaluation`.

    Example::

        >>> import torch
        >>> import tl_logitlens as tll
        >>> model = tll.demo_model()
        >>> tokens = torch.cat([tll.demo.induction_prompt(model, seed=s) for s in range(2)])
        >>> cmp = tll.compare_lenses(model, tokens, {"logit": None, "tuned": tll.TunedLens(model)}, progress=False)
        >>> cmp.lenses, cmp.labels
        (['logit', 'tuned'], ['0_pre', '1_pre', 'final_post'])
        >>> list(cmp.to_dataframe().columns[:3])
        ['lens', 'layer', 'n_tokens']
    """

    evaluations: Dict[str, LensEvaluation]
    seconds: float = 0.0
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def lenses(self) -> List[str]:
        """The lenses' names, in order."""
        return list(self.evaluations)

    @property
    def labels(self) -> List[str]:
        """The stack entry labels, ``0_pre .. final_post`` (the same for every lens)."""
        return list(next(iter(self.evaluations.values())).labels)

    @property
    def n_tokens(self) -> int:
        """How many tokens every lens scored."""
        return next(iter(self.evaluations.values())).n_tokens

    def __getitem__(self, name: str) -> LensEvaluation:
        if name not in self.evaluations:
            raise KeyError(f"no lens named {name!r}; this comparison holds {self.lenses}")
        return self.evaluations[name]

    def __len__(self) -> int:
        return len(self.evaluations)

    def __iter__(self) -> Any:
        return iter(self.evaluations)

    def to_dataframe(self, quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)) -> Any:
        """Long format: one row per (lens, stack entry) as a pandas DataFrame.

        Columns: ``lens``, then those of :meth:`LensEvaluation.to_dataframe` (``layer``,
        ``n_tokens``, ``<stat>_mean``, ``<stat>_q<percent>``, ``perplexity``,
        ``top1_agreement``, ``top1_accuracy``).
        """
        import pandas as pd

        frames = []
        for name, ev in self.evaluations.items():
            frame = ev.to_dataframe(quantiles)
            frame.insert(0, "lens", name)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def show(self, **kwargs: Any) -> Any:
        """Display the interactive view (every lens's per-layer curves, a menu per statistic) in a
        notebook and return the plotly Figure."""
        from ..plots.interactive import show

        return show(self, **kwargs)

    def to_html(self, path: Any, **kwargs: Any) -> Any:
        """Write the interactive view to ``path`` as a self-contained page (no network needed to open it)."""
        from ..plots.interactive import to_html

        return to_html(self, path, **kwargs)

    def plot(
        self,
        *,
        ax: Any = None,
        statistics: Sequence[str] = PLOT_STATISTICS,
        band: Optional[Sequence[float]] = None,
        title: Optional[str] = None,
    ) -> Any:
        """Per-layer curves of every lens on one figure: one colour per statistic, one line style per lens.

        The statistics in nats (``kl_to_final``, ``next_token_loss``, ``entropy``, in the
        colours :meth:`LensEvaluation.plot` gives them) share the left axis; the top-1 rates
        (``top1_agreement``, ``top1_accuracy``, in [0, 1]) are drawn against a right axis
        (alone, on the left one). Each line is labelled ``"<lens>: <statistic>"`` and the
        legend lists them all. ``band=(0.25, 0.75)`` shades each statistic in nats between
        those quantiles (off by default: several lenses' bands overlap).

        Returns:
            The ``Figure``; ``fig.axes[0]`` (or ``ax``) holds the first kind of statistic,
            a twin axis the rates when both kinds are drawn.
        """
        from ..plots import plot_lens_comparison

        return plot_lens_comparison(self, ax=ax, statistics=statistics, band=band, title=title)

    def __repr__(self) -> str:
        parts = []
        for name, ev in self.evaluations.items():
            kl = ", ".join(f"{v:.3g}" for v in ev.mean("kl_to_final").tolist())
            parts.append(f"{name}: [{kl}]")
        return (
            f"LensComparison({len(self.evaluations)} lenses, {len(self.labels)} entries, {self.n_tokens} tokens, "
            f"mean KL to final {'; '.join(parts)})"
        )

    # -- persistence ---------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """Everything stored, as JSON-ready values (each lens as :meth:`LensEvaluation.to_dict`)."""
        return {
            "format": _FORMAT,
            "lenses": self.lenses,
            "seconds": float(self.seconds),
            "meta": dict(self.meta),
            "evaluations": {name: ev.to_dict() for name, ev in self.evaluations.items()},
        }

    @classmethod
    def from_dict(cls, data: Any) -> LensComparison:
        """Inverse of :meth:`to_dict`; a malformed dict is refused naming the field."""
        if not isinstance(data, Mapping):
            raise LensInputError(f"not a saved LensComparison: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != _FORMAT:
            raise LensInputError(f"not a saved LensComparison (format {data.get('format')!r}, expected {_FORMAT!r})")
        names = data.get("lenses")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise LensInputError("malformed saved LensComparison: field 'lenses' must be a non-empty list of names")
        saved = data.get("evaluations")
        if not isinstance(saved, Mapping):
            raise LensInputError(
                "malformed saved LensComparison: field 'evaluations' must be an object, one entry per lens"
            )
        evaluations = {}
        for name in names:
            if name not in saved:
                raise LensInputError(f"malformed saved LensComparison: field 'evaluations' lacks the lens {name!r}")
            try:
                evaluations[name] = LensEvaluation.from_dict(saved[name])
            except LensInputError as err:
                raise LensInputError(f"malformed saved LensComparison: field 'evaluations.{name}': {err}") from None
        labels = {tuple(ev.labels) for ev in evaluations.values()}
        if len(labels) != 1:
            raise LensInputError(
                "malformed saved LensComparison: field 'evaluations' holds lenses with different labels"
            )
        try:
            seconds = float(data.get("seconds", 0.0))
            meta = dict(data.get("meta", {}))
        except (TypeError, ValueError) as err:
            raise LensInputError(f"malformed saved LensComparison: field 'seconds' or 'meta' ({err})") from None
        return cls(evaluations=evaluations, seconds=seconds, meta=meta)


def _check_lenses(view: Any, lenses: Any) -> Dict[str, Any]:
    """The lenses as ``{name: lens or None}`` (identity lenses as ``None``), every check before any forward pass."""
    if not isinstance(lenses, Mapping):
        raise LensInputError(
            "lenses must be a dict of name -> lens, e.g. {'logit': None, 'tuned': tuned}; "
            f"got {type(lenses).__name__}"
        )
    if not lenses:
        raise LensInputError("lenses is empty; give at least one, e.g. {'logit': None, 'tuned': tuned}")
    out: Dict[str, Any] = {}
    for name, lens in lenses.items():
        if not isinstance(name, str) or not name:
            raise LensInputError(f"lens names must be non-empty strings (they label the results); got {name!r}")
        try:
            check_lens(lens, view, stack_labels(view.n_layers, False))
        except LensInputError as err:
            raise LensInputError(f"lens {name!r}: {err}") from None
        out[name] = None if is_identity(lens) else lens
    return out


def compare_lenses(
    model: Any,
    data: Any,
    lenses: Optional[Mapping[str, Any]] = None,
    *,
    norm: str = "recompute",
    batch_size: int = 8,
    max_tokens: Optional[int] = None,
    progress: bool = True,
    distributed: Optional[bool] = None,
) -> LensComparison:
    """Evaluate several lenses over a dataset in one streaming pass (the model runs once per batch).

    Per lens and stack entry ``0_pre .. final_post``: the statistics of
    :func:`~tl_logitlens.evaluate.evaluate_lens` (KL to the model's own final distribution,
    next-token loss and perplexity, entropy, top-1 agreement with the final layer, top-1
    accuracy), each equal to what ``evaluate_lens(model, data, lens=that)`` gives. The
    captured stream and the final distribution are computed once per batch and shared by
    every lens; the vectors of all lenses go through the kernel together.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` in eval mode.
        data: as for :func:`~tl_logitlens.evaluate.evaluate_lens` (token ids ``[n, seq]``,
            strings, or an iterable of batches such as a ``DataLoader``).
        lenses: ``{name: lens}``, each lens ``None`` or a
            :class:`~tl_logitlens.lenses.LogitLens` (the plain lens), a
            :class:`~tl_logitlens.lenses.TunedLens` for this model, or any callable
            ``(vectors, label) -> vectors``. The names label the results (``None``: the
            plain lens alone, as ``"logit"``).
        norm, batch_size, max_tokens, progress: as for ``evaluate_lens``.

        distributed: as for :func:`~tl_logitlens.evaluate.evaluate_lens`: inside an
            initialised ``torch.distributed`` process group each rank reads its shard and the
            statistics of every lens are merged exactly (``None``: detected, ``False``: off).

    Returns:
        :class:`LensComparison`, one :class:`~tl_logitlens.evaluate.LensEvaluation` per lens.

    Example::

        >>> import torch
        >>> import tl_logitlens as tll
        >>> model = tll.demo_model()
        >>> tokens = torch.cat([tll.demo.induction_prompt(model, seed=s) for s in range(4)])
        >>> cmp = tll.compare_lenses(model, tokens, {"logit": None, "tuned": tll.TunedLens(model)},
        ...                          batch_size=2, progress=False)
        >>> bool((cmp["logit"].mean("kl_to_final") - cmp["tuned"].mean("kl_to_final")).abs().max() < 1e-6)
        True
    """
    view = resolve_model(model)
    batch_size, max_tokens = check_stream_args(norm, batch_size, max_tokens)
    named = _check_lenses(view, {"logit": None} if lenses is None else lenses)
    warn_file_names(data, "compare_lenses")
    run = stream_lenses(
        view,
        data,
        list(named.values()),
        norm=norm,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
        desc="compare_lenses",
        distributed=distributed,
    )
    finish_pass(run, "compare_lenses")
    evaluations = {
        name: evaluation_of(run, i, norm, name, lens is not None) for i, (name, lens) in enumerate(named.items())
    }
    meta = dict(next(iter(evaluations.values())).meta)
    meta.pop("lens", None)
    return LensComparison(evaluations=evaluations, seconds=run.seconds, meta=meta)
