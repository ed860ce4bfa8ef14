"""Where two runs diverge: layer by layer, how differently the lens reads a clean and a corrupted prompt.

Debugging a wrong prediction often starts from two prompts that differ in one detail (a changed
name, a changed fact). :func:`compare_runs` runs the model on both and reads every stack entry
of both runs through the same lens; per ``[entry, batch, pos]`` it returns the KL divergence
``KL(clean || corrupted)``, the Jensen-Shannon divergence and the total variation between the
two readings: the pairwise trajectory statistics of tuned-lens 0.2.0. They are computed in the
kernel's tiles (:func:`tl_logitlens.kernel.pairwise.read_pairs`), never from full logits.

A row of the heatmap that lights up marks the first layer whose reading of the two prompts
differs. It is a reading, not a causal claim: where the difference is *caused* is a question for
activation patching.

Example::

    >>> import tl_logitlens as tll
    >>> model = tll.demo_model()
    >>> runs = tll.compare_runs(model, "red cat sun", "red dog sun")
    >>> runs.js.shape[0] == len(runs.labels), float(runs.tv.max()) <= 1.0
    (True, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

from .errors import LensInputError
from .files import SavedAsJson
from .inputs import PositionSpec, position_index, resolve_inputs, run_or_read, tokenize
from .kernel.pairwise import read_pairs
from .lenses import apply_lens, check_lens, is_identity, lens_name
from .stacks import piece_groups, required_hooks, stack_labels
from .tokentext import token_text

#: The statistics :func:`compare_runs` returns, with what each measures.
STATISTICS = {
    "kl": "KL(clean || corrupted), nats",
    "js": "Jensen-Shannon divergence, nats (at most log 2)",
    "tv": "total variation (at most 1)",
}
_FORMAT = "tl_logitlens.run_comparison/1"


@dataclass
class RunComparison(SavedAsJson):
    """How differently two runs read, per stack entry, prompt and position.

    Attributes:
        labels: stack entry labels (``0_pre .. final_post``).
        kl, js, tv: ``[entry, batch, pos]`` float32 (see :data:`STATISTICS`).
        positions: ``[batch, pos]`` the absolute positions read.
        clean_tokens, corrupted_tokens: ``[batch][pos]`` the input token texts at those positions.
        lens_name: the lens both runs were read through.

    Example::

        >>> import tl_logitlens as tll
        >>> model = tll.demo_model()
        >>> runs = tll.compare_runs(model, "red cat sun", "red dog sun", positions=-1)
        >>> list(runs.to_dataframe().columns)
        ['entry', 'batch', 'pos', 'clean_token', 'corrupted_token', 'kl', 'js', 'tv']
    """

    labels: List[str]
    kl: torch.Tensor
    js: torch.Tensor
    tv: torch.Tensor
    positions: torch.Tensor
    clean_tokens: List[List[str]]
    corrupted_tokens: List[List[str]]
    lens_name: str = "logit"

    def statistic(self, name: str) -> torch.Tensor:
        """The ``[entry, batch, pos]`` tensor of ``name`` (one of :data:`STATISTICS`)."""
        if name not in STATISTICS:
            raise LensInputError(f"statistic must be one of {sorted(STATISTICS)}, got {name!r}")
        return getattr(self, name)

    def first_divergent_entry(self, statistic: str = "js", threshold: float = 0.1) -> torch.Tensor:
        """``[batch, pos]`` index of the first entry whose ``statistic`` exceeds ``threshold`` (-1: none)."""
        over = self.statistic(statistic) > threshold
        first = over.float().argmax(0)
        return torch.where(over.any(0), first, torch.full_like(first, -1))

    def to_dataframe(self) -> Any:
        """One row per (entry, batch, position): the input tokens and the three statistics."""
        import pandas as pd

        rows = []
        for e, label in enumerate(self.labels):
            for b in range(self.kl.shape[1]):
                for j in range(self.kl.shape[2]):
                    rows.append(
                        (label, b, int(self.positions[b, j]), self.clean_tokens[b][j], self.corrupted_tokens[b][j])
                        + tuple(float(getattr(self, s)[e, b, j]) for s in STATISTICS)
                    )
        return pd.DataFrame(rows, columns=["entry", "batch", "pos", "clean_token", "corrupted_token", *STATISTICS])

    def plot(self, **kwargs: Any) -> Any:
        """The heatmap of one statistic (:func:`tl_logitlens.plots.divergence.plot_divergence`)."""
        from .plots.divergence import plot_divergence

        return plot_divergence(self, **kwargs)

    def to_html(self, path: Any, *, overwrite: bool = False, **kwargs: Any) -> Any:
        """Write the interactive heatmap (every statistic on hover) to ``path`` as a self-contained page."""
        from .plots.divergence import divergence_figure
        from .plots.interactive import to_html

        return to_html(
            divergence_figure(self, **kwargs), path, title="tl_logitlens: where two runs diverge", overwrite=overwrite
        )

    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": _FORMAT,
            "labels": self.labels,
            **{s: getattr(self, s).tolist() for s in STATISTICS},
            "positions": self.positions.tolist(),
            "clean_tokens": self.clean_tokens,
            "corrupted_tokens": self.corrupted_tokens,
            "lens_name": self.lens_name,
        }

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> RunComparison:
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise LensInputError(f"not a saved RunComparison (format {_FORMAT!r} expected)")
        try:
            stats = {s: torch.tensor(data[s], dtype=torch.float32) for s in STATISTICS}
            return cls(
                labels=list(data["labels"]),
                positions=torch.tensor(data["positions"], dtype=torch.long),
                clean_tokens=data["clean_tokens"],
                corrupted_tokens=data["corrupted_tokens"],
                lens_name=str(data["lens_name"]),
                **stats,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise LensInputError(f"a saved RunComparison is missing or has a bad field: {err}") from None


def _check_pair(clean: Any, corrupted: Any) -> None:
    """Refuse token lengths that differ per prompt: the two runs are compared position by position."""
    if tuple(clean.ids.shape) != tuple(corrupted.ids.shape) or not torch.equal(clean.lengths, corrupted.lengths):
        raise LensInputError(
            f"clean and corrupted must tokenise to the same lengths, position by position; got "
            f"{clean.lengths.tolist()} and {corrupted.lengths.tolist()} tokens. Change the corrupted "
            "prompt by a same-length edit (one name for another of the same token count)."
        )


def _stream(view: Any, tokens: Any, index: torch.Tensor, lens: Any, labels: List[str]) -> torch.Tensor:
    """``[entry, batch, n, d_model]``: one run's accumulated stream at ``index``, through ``lens``."""
    _, cache = run_or_read(view, tokens, None, required_hooks(view, "accumulated", False))
    (group,) = piece_groups(view, cache, "accumulated", index, False)
    vectors = group.vectors()
    if lens is not None:
        vectors = torch.stack([apply_lens(lens, vectors[i], label) for i, label in enumerate(labels)])
    return vectors


def _texts(view: Any, tokens: Any, index: torch.Tensor) -> List[List[str]]:
    ids = tokens.ids.gather(1, index)
    return [[token_text(view.tokenizer, int(t)) for t in row] for row in ids]


def compare_runs(
    model: Any,
    clean: Any,
    corrupted: Any,
    *,
    lens: Optional[Callable[[torch.Tensor, str], torch.Tensor]] = None,
    positions: PositionSpec = None,
) -> RunComparison:
    """Per stack entry, prompt and position: KL, JS and TV between the clean and the corrupted run's readings.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` in eval mode.
        clean, corrupted: a string, a list of strings or token ids ``[batch, pos]``; both must
            tokenise to the same length per prompt (the runs are compared position by position).
        lens: a :class:`~tl_logitlens.lenses.Lens` (e.g. a tuned lens) both runs are read
            through; ``None``: the logit lens.
        positions: as for :func:`tl_logitlens.logit_lens` (``None``: every position; an int
            keeps the position axis with one position).

    Returns:
        :class:`RunComparison` with ``kl``, ``js``, ``tv`` ``[entry, batch, pos]``.

    Example::

        >>> import tl_logitlens as tll
        >>> model = tll.demo_model()
        >>> same = tll.compare_runs(model, "red cat sun", "red cat sun")
        >>> float(same.js.abs().max()) < 1e-6
        True
    """
    view, clean_tokens, _ = resolve_inputs(model, clean, None)
    if corrupted is None:
        raise LensInputError("pass the corrupted prompt to compare with (text or token ids)")
    corrupted_tokens = tokenize(view, corrupted)
    _check_pair(clean_tokens, corrupted_tokens)
    labels = stack_labels(view.n_layers, False)
    check_lens(lens, view, labels)
    named = lens_name(lens)
    if is_identity(lens):
        lens = None
    index, _ = position_index(positions, clean_tokens.lengths, clean_tokens.ids.shape[1])  # an int keeps its axis
    p = _stream(view, clean_tokens, index, lens, labels)
    q = _stream(view, corrupted_tokens, index, lens, labels)
    stats = read_pairs(view.unembedding("W_U"), p.reshape(-1, view.d_model), q.reshape(-1, view.d_model))
    shape = tuple(p.shape[:3])
    return RunComparison(
        labels=labels,
        kl=stats.kl.reshape(shape),
        js=stats.js.reshape(shape),
        tv=stats.tv.reshape(shape),
        positions=index.clone(),
        clean_tokens=_texts(view, clean_tokens, index),
        corrupted_tokens=_texts(view, corrupted_tokens, index),
        lens_name=named,
    )
