"""The logit lens: what each layer of the residual stream predicts.

Every entry of the accumulated stack (``0_pre .. final_post``, optionally ``L_mid``) is
read through the final norm and the unembedding by the readout kernel, with the model's
final stream as the reference for KL. The ``final_post`` entry with ``norm="recompute"``
is the model's own prediction; the package checks that against the model's logits
whenever it runs the model itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .errors import LensInputError, UnsupportedModelError
from .inputs import (
    PositionSpec,
    Tokens,
    activation_shape,
    check_modes,
    gather_positions,
    next_token_ids,
    position_index,
    resolve_inputs,
    run_or_read,
    token_items,
    token_list,
)
from .kernel import Readout, check_chunk_size, is_half, read_rows, reshape_readout
from .kernel.tiles import tile_width
from .lenses import apply_lens, check_lens, is_identity, lens_name
from .model_access import ModelView
from .stacks import piece_groups, required_hooks, resolve_layers, stack_labels
from .tokentext import token_text

# Max |p_ours - p_model| on the final entry's top tokens before the lens refuses to
# claim it reproduces the model (float32 arithmetic gives ~1e-6; float32 and float64 models
# are held to it). A bfloat16 or float16 model rounds its normalised stream n and its logits
# l to its dtype (unit roundoff u = eps / 2, eps = torch.finfo(dtype).eps), which moves
# logit j by at most u * (|l_j| + sum_i |n_i| |W_U[i, j]|) and log Z by the softmax-weighted
# mean of those; with the slack of a half-precision accumulation, the package allows
#   delta_j = 2 * eps * (|l_j| + |n| @ |W_U[:, j]|),   delta_Z = sum_j p_j * delta_j,
# so |p_ours - p_model| <= max(p_ours, p_model) * expm1(delta_j + delta_Z) for each top
# token j (and never less than _REPRODUCE_ATOL). See reproduce_tolerance.
_REPRODUCE_ATOL = 1e-3


@dataclass
class LensResult:
    """What each stack entry predicts. ``pos`` is absent when an int position was asked for.

    Attributes:
        labels: stack entry labels, ``0_pre .. final_post`` (``L_mid`` with ``incl_mid``).
        input_ids: ``[batch, seq]`` the (right-padded) input tokens, or ``None`` when only a
            cache was given.
        lengths: ``[batch]`` each prompt's real length.
        positions: ``[batch, pos]`` the positions read (absolute indices into the input).
        readout: the kernel's :class:`~tl_logitlens.kernel.Readout`, shaped
            ``[layer, batch, pos, ...]``; the statistics below are read from it.
        top_ids, top_probs, top_logits: ``[layer, batch, pos, k]``.
        entropy: ``[layer, batch, pos]`` full-vocabulary entropy, nats.
        kl_to_final: ``[layer, batch, pos]`` KL(final || layer), nats.
        next_token_loss: ``[layer, batch, pos]`` cross-entropy of the true next input token;
            NaN where there is none (last token, padding, or no input tokens known).
        next_ids: ``[batch, pos]`` the true next token ids, ``-1`` where there is none.
        target_ids, target_logits, target_probs: ``[layer, batch, pos, t]`` with targets.
        target_ranks: ``[layer, batch, pos, t]``, 0-based over the full vocabulary; ties do
            not count against the target. With ``targets="next"``, a cell with no next token
            (each prompt's last token, padding) has ``target_ids`` ``-1``, NaN logit and
            probability, and rank ``-1``.
        group_names: the token groups' names with ``targets={"name": [tokens...], ...}``, in
            the order given; else ``None``.
        group_probs, group_logits: ``[layer, batch, pos, group]`` with token groups: each
            group's summed probability and the log-sum-exp of its members' logits (see
            :meth:`groups_dataframe`).
        norm, unembed: the modes the result was read with.
        lens_name: the lens's name (``"logit"`` with no lens or a
            :class:`~tl_logitlens.lenses.LogitLens`, ``"tuned"`` for a
            :class:`~tl_logitlens.lenses.TunedLens`, ``"custom"`` for a nameless callable).
        tokenizer: used to decode token ids (``None`` -> ``#id`` strings).

    Example::

        >>> import tl_logitlens as tll
        >>> model = tll.demo_model()
        >>> result = tll.logit_lens(model, tll.demo.induction_prompt(model), targets="next")
        >>> result.labels[0], result.labels[-1], tuple(result.entropy.shape[:2])
        ('0_pre', 'final_post', (3, 1))
    """

    labels: List[str]
    input_ids: Optional[torch.Tensor]
    lengths: torch.Tensor
    positions: torch.Tensor
    readout: Readout
    next_ids: torch.Tensor
    norm: str = "recompute"
    unembed: str = "W_U"
    tokenizer: Any = field(default=None, repr=False)
    lens_name: str = "logit"
    group_names: Optional[List[str]] = None

    # The statistics live in the readout; these name them as the lens does.
    top_ids = property(lambda self: self.readout.top_ids, doc="``[layer, batch, pos, k]`` top token ids.")
    top_probs = property(lambda self: self.readout.top_probs, doc="``[layer, batch, pos, k]``.")
    top_logits = property(lambda self: self.readout.top_logits, doc="``[layer, batch, pos, k]``.")
    entropy = property(lambda self: self.readout.entropy, doc="``[layer, batch, pos]`` nats.")
    kl_to_final = property(lambda self: self.readout.kl_to_reference, doc="``[layer, batch, pos]`` KL(final || layer).")
    next_token_loss = property(
        lambda self: self.readout.next_token_loss, doc="``[layer, batch, pos]`` nats, NaN where no next token."
    )
    target_ids = property(lambda self: self.readout.target_ids, doc="``[layer, batch, pos, t]`` or ``None``.")
    target_logits = property(lambda self: self.readout.target_logits, doc="``[layer, batch, pos, t]`` or ``None``.")
    target_probs = property(lambda self: self.readout.target_probs, doc="``[layer, batch, pos, t]`` or ``None``.")
    target_ranks = property(lambda self: self.readout.target_ranks, doc="``[layer, batch, pos, t]`` or ``None``.")
    group_probs = property(lambda self: self.readout.group_probs, doc="``[layer, batch, pos, group]`` or ``None``.")
    group_logits = property(lambda self: self.readout.group_logits, doc="``[layer, batch, pos, group]`` or ``None``.")

    @property
    def has_pos_axis(self) -> bool:
        """Whether the results keep a position axis (False after an int ``positions``)."""
        return self.entropy.ndim == 3

    def decode(self, token_id: int) -> str:
        """One token id as the vocabulary spells it, never empty (``#id`` without a tokenizer).

        See :func:`tl_logitlens.tokentext.token_text`: sentencepiece pieces keep their
        word-start ``▁`` (a bare ``▁`` stays ``"▁"``), other tokens are their decoded text
        (``" the"``), and a token with no visible text is ``⟨id⟩``. The string names the
        same token back when passed as ``targets=`` or ``answers=``.
        """
        return token_text(self.tokenizer, int(token_id))

    def top_tokens(self) -> list:
        """Top-k tokens as :meth:`decode` spells them, nested like ``top_ids``: ``[layer][batch][pos][k]``."""

        def walk(ids: torch.Tensor) -> Any:
            if ids.ndim == 1:
                return [self.decode(i) for i in ids.tolist()]
            return [walk(row) for row in ids]

        return walk(self.top_ids)

    def input_tokens(self) -> Optional[List[List[str]]]:
        """The input tokens at the read positions, spelt by :meth:`decode`: ``[batch][pos]``; None without input."""
        if self.input_ids is None:
            return None
        picked = gather_positions(self.input_ids, self.positions)
        return [[self.decode(i) for i in row.tolist()] for row in picked]

    def _cell_columns(self, n_layer: int, per_cell: int) -> Tuple[Any, Any, Dict[str, Any]]:
        """The non-padding cells ``(b_idx, j_idx)`` (row-major) and the table columns that name
        them (``layer``, ``batch``, ``pos``, ``input_token``), for ``per_cell`` rows per cell and layer."""
        import numpy as np

        valid = (self.positions < self.lengths.unsqueeze(1)).numpy()  # [batch, pos]: not padding
        b_idx, j_idx = np.nonzero(valid)  # row-major: batch, then position
        n_cells = len(b_idx)
        tokens = self.input_tokens()
        if tokens is None:
            input_token = np.full(n_layer * n_cells * per_cell, None, dtype=object)
        else:
            cell_tokens = np.empty(n_cells, dtype=object)
            cell_tokens[:] = [tokens[b][j] for b, j in zip(b_idx.tolist(), j_idx.tolist())]
            input_token = np.tile(np.repeat(cell_tokens, per_cell), n_layer)
        return (
            b_idx,
            j_idx,
            {
                "layer": np.repeat(np.array(self.labels, dtype=object), n_cells * per_cell),
                "batch": np.tile(np.repeat(b_idx.astype(np.int64), per_cell), n_layer),
                "pos": np.tile(np.repeat(self.positions.numpy()[b_idx, j_idx].astype(np.int64), per_cell), n_layer),
                "input_token": input_token,
            },
        )

    def to_dataframe(self) -> Any:
        """One row per (layer, batch, position, top-k rank) as a pandas DataFrame.

        Columns: ``layer``, ``batch``, ``pos`` (absolute position), ``input_token``,
        ``rank``, ``token_id``, ``token``, ``prob``, ``logit``, and the per-cell metrics
        ``entropy``, ``kl_to_final``, ``next_token_loss`` (and ``target_*`` of the first
        target when targets were given). Rows run layer, then batch, then position, then
        rank; padding positions are left out. Built column by column (each distinct token
        decoded once), so 400k rows take a fraction of a second.

        Example::

            >>> import tl_logitlens as tll
            >>> model = tll.demo_model()
            >>> result = tll.logit_lens(model, tll.demo.induction_prompt(model), top_k=2)
            >>> frame = result.to_dataframe()
            >>> len(frame) == 3 * 25 * 2, list(frame.columns[:4])
            (True, ['layer', 'batch', 'pos', 'input_token'])
        """
        import numpy as np
        import pandas as pd

        expand = (lambda t: t) if self.has_pos_axis else (lambda t: t.unsqueeze(2))  # noqa: E731
        top_ids = expand(self.top_ids)
        n_layer, batch, n_pos, k = top_ids.shape
        b_idx, j_idx, cell_columns = self._cell_columns(n_layer, k)
        n_cells = len(b_idx)

        def per_row(t: torch.Tensor) -> np.ndarray:
            """``[layer, batch, pos, k]`` -> the kept rows, in row order."""
            return t.numpy()[:, b_idx, j_idx].reshape(-1)

        def per_cell(t: torch.Tensor) -> np.ndarray:
            """``[layer, batch, pos]`` -> repeated over the k rows of each cell."""
            return np.repeat(t.numpy()[:, b_idx, j_idx].reshape(-1), k)

        ids = per_row(top_ids).astype(np.int64)
        names = {i: self.decode(i) for i in np.unique(ids).tolist()}
        columns = {
            **cell_columns,
            "rank": np.tile(np.arange(k, dtype=np.int64), n_layer * n_cells),
            "token_id": ids,
            "token": np.array([names[i] for i in ids.tolist()], dtype=object),
            "prob": per_row(expand(self.top_probs)).astype(np.float64),
            "logit": per_row(expand(self.top_logits)).astype(np.float64),
            "entropy": per_cell(expand(self.entropy)).astype(np.float64),
            "kl_to_final": per_cell(expand(self.kl_to_final)).astype(np.float64),
            "next_token_loss": per_cell(expand(self.next_token_loss)).astype(np.float64),
        }
        if self.target_ids is not None:
            columns["target_id"] = per_cell(expand(self.target_ids)[..., 0]).astype(np.int64)
            columns["target_prob"] = per_cell(expand(self.target_probs)[..., 0]).astype(np.float64)
            columns["target_rank"] = per_cell(expand(self.target_ranks)[..., 0]).astype(np.int64)
        return pd.DataFrame(columns)

    def groups_dataframe(self) -> Any:
        """One row per (layer, batch, position, token group) as a pandas DataFrame.

        The token groups get their own table (``to_dataframe`` has one row per top-k token,
        so a group's columns there would repeat ``k`` times). Columns: ``layer``, ``batch``,
        ``pos`` (absolute position), ``input_token``, ``group``, ``prob`` (summed
        probability of the group's tokens), ``logit`` (log-sum-exp of their logits). Rows
        run layer, then batch, then position, then group; padding positions are left out.
        Needs ``logit_lens(..., targets={"name": [tokens...], ...})``.

        Example::

            >>> import tl_logitlens as tll
            >>> model = tll.demo_model()
            >>> tokens = tll.demo.induction_prompt(model)
            >>> result = tll.logit_lens(model, tokens, targets={"cat": ["cat"], "animals": ["cat", "goat", "ape"]})
            >>> frame = result.groups_dataframe()
            >>> len(frame) == 3 * 25 * 2, list(frame.columns)
            (True, ['layer', 'batch', 'pos', 'input_token', 'group', 'prob', 'logit'])
        """
        import numpy as np
        import pandas as pd

        if self.group_names is None:
            raise LensInputError(
                'groups_dataframe() needs token groups: tll.logit_lens(..., targets={"name": [tokens...], ...})'
            )
        expand = (lambda t: t) if self.has_pos_axis else (lambda t: t.unsqueeze(2))  # noqa: E731
        probs, logits = expand(self.group_probs), expand(self.group_logits)
        n_layer, _, _, n_group = probs.shape
        b_idx, j_idx, cell_columns = self._cell_columns(n_layer, n_group)
        n_cells = len(b_idx)
        return pd.DataFrame(
            {
                **cell_columns,
                "group": np.tile(np.array(self.group_names, dtype=object), n_layer * n_cells),
                "prob": probs.numpy()[:, b_idx, j_idx].reshape(-1).astype(np.float64),
                "logit": logits.numpy()[:, b_idx, j_idx].reshape(-1).astype(np.float64),
            }
        )

    def __repr__(self) -> str:
        labels = self.labels if len(self.labels) <= 2 else [self.labels[0], "...", self.labels[-1]]
        shown = "[" + ", ".join(x if x == "..." else repr(x) for x in labels) + "]"
        pos = self.positions.shape[1] if self.has_pos_axis else None
        targets = 0 if self.target_ids is None else self.target_ids.shape[-1]
        return (
            f"LensResult(labels={shown} ({len(self.labels)}), batch={self.lengths.shape[0]}, pos={pos}, "
            f"top_k={self.top_ids.shape[-1]}, targets={targets}, norm={self.norm!r}, unembed={self.unembed!r}"
            + ("" if self.group_names is None else f", groups={self.group_names!r}")
            + ("" if self.lens_name == "logit" else f", lens={self.lens_name!r}")
            + ")"
        )

    def plot(self, **kwargs: Any) -> Any:
        """:func:`tl_logitlens.plot_lens` on this result."""
        from .plots import plot_lens

        return plot_lens(self, **kwargs)

    def show(self, **kwargs: Any) -> Any:
        """Display the interactive plotly view in a notebook and return the Figure
        (:mod:`tl_logitlens.plots.interactive`)."""
        from .plots.interactive import show

        return show(self, **kwargs)

    def to_html(self, path: Any, **kwargs: Any) -> Any:
        """Write the interactive view to ``path`` as a self-contained page (no network needed to open it)."""
        from .plots.interactive import to_html

        return to_html(self, path, **kwargs)


def _token_groups(view: ModelView, targets: Any) -> tuple:
    """``(names, [[ids], ...])`` for ``targets={"name": [tokens...], ...}``, ``(None, None)``
    for any other targets; validated before any forward pass."""
    if not isinstance(targets, Mapping):
        return None, None
    if not targets:
        raise LensInputError('targets is an empty dict; token groups need at least one: {"name": [tokens...]}')
    names, groups = [], []
    for name, members in targets.items():
        if not isinstance(name, str) or not name:
            raise LensInputError(
                f'token group names must be non-empty strings, got {name!r}; pass targets={{"name": [tokens...], ...}}'
            )
        if isinstance(members, Mapping) or (token_items(members, f"token group {name!r}") == []):
            raise LensInputError(
                f"token group {name!r} must list at least one token (text, vocabulary piece or id), got {members!r}"
            )
        ids = token_list(view, members, f"token in group {name!r}")
        if len(set(ids)) != len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            raise LensInputError(
                f"token group {name!r} names token id(s) {twice} more than once, which would count their "
                "probability twice; list each token once"
            )
        names.append(name)
        groups.append(ids)
    return names, groups


def _row_targets(
    view: ModelView, targets: Any, tokens: Optional[Tokens], index: torch.Tensor
) -> Optional[torch.Tensor]:
    """Targets as ``[batch, n_pos, t]`` ids, validated before any forward pass (token groups: ``None``)."""
    if targets is None or isinstance(targets, Mapping):
        return None
    batch, n_pos = index.shape
    if isinstance(targets, str) and targets == "next":
        if tokens is None:
            raise LensInputError("targets='next' needs the input tokens: pass input= along with cache=")
        return None  # filled from next_ids
    if type(targets).__module__ == "numpy" and getattr(targets, "ndim", 0) >= 1:
        targets = torch.as_tensor(targets)
    if isinstance(targets, torch.Tensor) and targets.ndim >= 1:
        if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
            raise LensInputError(f"targets must hold integer token ids, got dtype {targets.dtype}")
        ids = targets.long().cpu()
        if ids.ndim == 1 and ids.shape[0] == batch:
            ids = ids.unsqueeze(1).expand(batch, n_pos)
        elif ids.ndim == 2 and ids.shape == (batch, n_pos):
            pass
        elif ids.ndim == 2 and tokens is not None and ids.shape == tuple(tokens.ids.shape):
            ids = gather_positions(ids, index)
        else:
            raise LensInputError(
                f"targets tensor has shape {tuple(targets.shape)}; expected [batch]={batch}, "
                f"[batch, positions read]=({batch}, {n_pos}) or [batch, seq]"
            )
        if int(ids.min()) < 0 or int(ids.max()) >= view.d_vocab:
            raise LensInputError(
                f"targets ids must lie in [0, {view.d_vocab}); got {int(ids.min())} .. {int(ids.max())}"
            )
        return ids.unsqueeze(-1)
    token_items(targets, "targets")  # refuses mappings and sets with a message
    ids = torch.tensor(token_list(view, targets, "target"))
    return ids.expand(batch, n_pos, ids.shape[0])


def logit_lens(
    model: Any = None,
    input: Union[str, List[str], torch.Tensor, None] = None,
    *,
    cache: Any = None,
    layers: Optional[Sequence[Union[int, str]]] = None,
    incl_mid: bool = False,
    positions: PositionSpec = None,
    norm: str = "recompute",
    unembed: str = "W_U",
    lens: Optional[Callable[[torch.Tensor, str], torch.Tensor]] = None,
    top_k: int = 5,
    targets: Any = None,
    chunk_size: Optional[int] = None,
    pixel_values: Optional[torch.Tensor] = None,
) -> LensResult:
    """Read every layer's residual stream through the final norm and unembedding.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` in eval mode; may be
            omitted when ``cache`` records its model.
        input: a string, a list of strings (right-padded; each prompt keeps its own
            length), or token ids ``[batch, pos]``. Omit it to read ``cache`` only.
        cache: an ``ActivationCache`` you already have (from ``model.run_with_cache``).
        layers: stack entries to read, by index (negative allowed) or label.
        incl_mid: add ``L_mid`` entries (stream between attention and MLP).
        positions: ``None`` (all), an int (axis dropped; negative counts from each
            prompt's own last real token), a list of ints, a slice, or a ``[batch, n]``
            tensor of positions per prompt.
        norm: ``"recompute"`` (the logit lens), ``"cached"`` (the final stream's scale at
            that position: linear) or ``"none"`` (raw ``h @ W_U``).
        unembed: ``"W_U"`` (with ``b_U``) or ``"W_E"`` (embedding transposed: the tied reading).
        lens: a :class:`~tl_logitlens.lenses.Lens` (e.g. a trained
            :class:`~tl_logitlens.lenses.TunedLens`) or any callable
            ``f(vectors [batch, pos, d_model], label) -> vectors`` applied to each entry
            before the norm; ``label`` is the entry's label (``"3_pre"``, ``"3_mid"``,
            ``"final_post"``). ``None`` or a ``LogitLens``: the plain logit lens.
        top_k: top tokens kept per cell.
        targets: a token (its text, its vocabulary piece or its id, see
            :func:`tl_logitlens.inputs.tokens.single_token_id`), or a list of them, shared by all
            rows; a tensor of ids ``[batch]`` or ``[batch, pos]``; or ``"next"`` (the true
            next input token; NaN and rank ``-1`` where there is none); or token groups
            ``{"name": [tokens...], ...}`` (tokens named as above; groups may share tokens):
            ``group_probs`` / ``group_logits`` ``[layer, batch, pos, group]`` hold each
            group's summed probability and log-sum-exp logit, computed inside the
            kernel's tiles from the members' logits alone.
        chunk_size: rows per matrix product (``None``: the shape measured for this machine,
            :mod:`tl_logitlens.kernel.tuning`, within :func:`tl_logitlens.set_chunk_budget`'s budget).
        pixel_values: a vision-language model's images (LLaVA, Gemma 3), as its processor makes
            them: ``inputs = processor(text=..., images=..., return_tensors="pt")``, then
            ``input=inputs["input_ids"], pixel_values=inputs["pixel_values"]``. The lens reads the
            language stream at every position, image positions (where the projected image features
            entered the stream) included; they show as the image token (``<image>``) in
            :meth:`LensResult.input_tokens`, tables and figures.

    Returns:
        :class:`LensResult`, arrays ``[layer, batch, pos, ...]``.

    Example::

        >>> import tl_logitlens as tll
        >>> model = tll.demo_model()
        >>> result = tll.logit_lens(model, tll.demo.induction_prompt(model), positions=-1)
        >>> result.top_tokens()[-1][0][0] == model.tokenizer.decode([int(result.top_ids[-1, 0, 0])])
        True
    """
    view, tokens, cache = resolve_inputs(model, input, cache, pixel_values)
    check_modes(norm, unembed, top_k, view.d_vocab)
    check_chunk_size(chunk_size)  # now, not after the forward pass
    top_k = int(top_k)
    labels = stack_labels(view.n_layers, incl_mid)
    keep = resolve_layers(layers, labels)
    check_lens(lens, view, [labels[k] for k in keep])  # a lens for another model: refused before the forward pass
    named = lens_name(lens)  # before a LogitLens becomes None below
    if is_identity(lens):
        lens = None  # the plain lens, read exactly as without one (and checked against the model)
    names = required_hooks(view, "accumulated", incl_mid)
    batch, seq = activation_shape(view, cache, tokens, names, "logit_lens")
    lengths = tokens.lengths if tokens is not None else torch.full((batch,), seq)
    index, drop = position_index(positions, lengths, seq)
    cells = cell_targets(view, targets, tokens, index)

    logits, cache = run_or_read(view, tokens, cache, names)

    (group,) = piece_groups(view, cache, "accumulated", index, incl_mid)
    vectors = group.vectors()  # [entry, batch, pos, d_model]
    reference = vectors[-1]
    vectors = vectors[keep]
    if lens is not None:
        vectors = torch.stack([apply_lens(lens, vectors[i], labels[k]) for i, k in enumerate(keep)])
    result = lens_result(
        view,
        cells,
        vectors,
        reference,
        [labels[k] for k in keep],
        tokens=tokens,
        lengths=lengths,
        drop=drop,
        norm=norm,
        unembed=unembed,
        top_k=int(top_k),
        chunk_size=chunk_size,
        lens_name=named,
        # The final stream, read untransformed, is its own KL reference: unembedded once.
        reference_entry=keep.index(len(labels) - 1) if lens is None and len(labels) - 1 in keep else None,
    )
    if logits is not None and norm == "recompute" and unembed == "W_U" and lens is None and keep[-1] == len(labels) - 1:
        k = result.top_ids.shape[-1]
        final_ids, final_probs = result.top_ids[-1].reshape(-1, k), result.top_probs[-1].reshape(-1, k)
        check_reproduces_model(logits, index, final_ids, final_probs, view, reference)
    return result


@dataclass
class CellTargets:
    """What every cell ``[batch, pos]`` is read for besides its top tokens, checked before any forward pass.

    Attributes:
        index: ``[batch, n]`` the positions read.
        target_ids: ``[batch, n, t]`` target ids, or ``None`` (no targets, or token groups).
        group_names, groups: the token groups' names and member ids, or ``None``.
        next_ids: ``[batch, n]`` the true next input token, ``-1`` where there is none.
        next_target: the targets are ``"next"`` (cells without a next token are blanked).
    """

    index: torch.Tensor
    target_ids: Optional[torch.Tensor]
    group_names: Optional[List[str]]
    groups: Optional[List[List[int]]]
    next_ids: torch.Tensor
    next_target: bool


def cell_targets(view: ModelView, targets: Any, tokens: Optional[Tokens], index: torch.Tensor) -> CellTargets:
    """Resolve ``targets=`` (tokens, ids, ``"next"`` or token groups) for the cells at ``index [batch, n]``.

    Every analysis that returns a :class:`LensResult` calls this before its forward passes, so
    a bad target fails at once.
    """
    target_ids = _row_targets(view, targets, tokens, index)
    group_names, groups = _token_groups(view, targets)
    next_ids = next_token_ids(tokens, index) if tokens is not None else torch.full_like(index, -1)
    next_target = isinstance(targets, str) and targets == "next"
    if next_target:
        target_ids = next_ids.clamp_min(0).unsqueeze(-1)  # read as 0, blanked after where there is none
    return CellTargets(index, target_ids, group_names, groups, next_ids, next_target)


def lens_result(
    view: ModelView,
    cells: CellTargets,
    vectors: torch.Tensor,
    reference: Optional[torch.Tensor],
    labels: List[str],
    *,
    tokens: Optional[Tokens],
    lengths: torch.Tensor,
    drop: bool,
    norm: str,
    unembed: str,
    top_k: int,
    chunk_size: Optional[int],
    lens_name: str,
    reference_entry: Optional[int] = None,
) -> LensResult:
    """Read ``vectors [entry, batch, n, d_model]`` (one entry per label) with the kernel into a :class:`LensResult`.

    ``reference [batch, n, d_model]`` is the distribution ``kl_to_final`` is measured from
    (``None``: no reference, and ``kl_to_final`` is NaN); ``reference_entry`` the index of the
    entry that is the reference itself (then read once). ``drop`` removes the position axis
    (an int ``positions=``).
    """
    batch, n_pos = cells.index.shape
    n_rows, n_entries = batch * n_pos, vectors.shape[0]
    target_ids = cells.target_ids
    flat = read_rows(
        view.unembedding(unembed),
        vectors.reshape(n_entries, n_rows, view.d_model),
        norm=norm,
        top_k=top_k,
        target_ids=None if target_ids is None else target_ids.reshape(n_rows, -1),
        reference=None if reference is None else reference.reshape(n_rows, view.d_model),
        reference_entry=reference_entry,
        next_tokens=cells.next_ids.reshape(n_rows),
        chunk_size=chunk_size,
        token_groups=cells.groups,
    )
    if reference is None:
        flat.kl_to_reference = torch.full(flat.entropy.shape, float("nan"), dtype=flat.entropy.dtype)
    if cells.next_target:
        # No next token (last token, padding): no target, so no logit, probability or rank.
        none = (cells.next_ids.reshape(1, n_rows, 1) < 0).expand_as(flat.target_ids)
        flat.target_ids = flat.target_ids.masked_fill(none, -1)
        flat.target_logits = flat.target_logits.masked_fill(none, float("nan"))
        flat.target_probs = flat.target_probs.masked_fill(none, float("nan"))
        flat.target_ranks = flat.target_ranks.masked_fill(none, -1)

    shaped = reshape_readout(flat, (n_entries, batch, n_pos))
    if drop:
        shaped = dataclasses.replace(
            shaped, **{name: None if value is None else value[:, :, 0] for name, value in vars(shaped).items()}
        )
    return LensResult(
        labels=list(labels),
        input_ids=None if tokens is None else tokens.ids,
        lengths=lengths,
        positions=cells.index,
        readout=shaped,
        next_ids=cells.next_ids[:, 0] if drop else cells.next_ids,
        norm=norm,
        unembed=unembed,
        tokenizer=view.tokenizer,
        lens_name=lens_name,
        group_names=cells.group_names,
    )


def reproduce_tolerance(
    view: ModelView, logits: torch.Tensor, final: torch.Tensor, top_ids: torch.Tensor
) -> torch.Tensor:
    """Relative tolerance ``[rows, k]`` of each top token's probability: ``|p_ours - p_model| <= p * tolerance``.

    ``logits [rows, d_vocab]`` the model's own at the rows read, ``final [rows, d_model]``
    the stored final stream there, ``top_ids [rows, k]``. The formula is beside
    ``_REPRODUCE_ATOL``; it is zero for float32 and float64 models (the absolute floor holds
    them). ``|n| @ |W_U|`` weighted by the model's probabilities is read a tile of the
    unembedding at a time, on W_U's device, without a float32 copy of it.
    """
    if not is_half(logits.dtype):
        return torch.zeros(top_ids.shape)
    eps = torch.finfo(logits.dtype).eps
    W_U = view.W_U
    device = W_U.device
    n_abs = view.final_norm.to(torch.float32, device).apply(final.to(device).float(), "recompute").abs()
    out = torch.empty(top_ids.shape)
    step = 1024
    with torch.no_grad():
        for r in range(0, logits.shape[0], step):
            lg = logits[r : r + step].to(device).float()  # [c, d_vocab]
            p = torch.softmax(lg, -1)
            n = n_abs[r : r + step]
            ids = top_ids[r : r + step].to(device)
            top_size = torch.einsum("cd,dck->ck", n, W_U[:, ids].abs().float())
            delta_top = 2 * eps * (lg.gather(1, ids).abs() + top_size)
            weighted = torch.zeros_like(n)  # sum_j p_j |W_U[:, j]|
            width = tile_width(W_U.shape[1], None)
            for a in range(0, W_U.shape[1], width):
                z = a + width
                weighted += p[:, a:z] @ W_U[:, a:z].abs().float().T
            delta_z = 2 * eps * ((p * lg.abs()).sum(-1) + (n * weighted).sum(-1))
            out[r : r + step] = torch.expm1(delta_top + delta_z.unsqueeze(1)).cpu()
    return out


def check_reproduces_model(
    logits: torch.Tensor,
    index: torch.Tensor,
    top_ids: torch.Tensor,
    top_probs: torch.Tensor,
    view: ModelView,
    final: torch.Tensor,
) -> None:
    """The final entry must be the model's own prediction; refuse loudly if it is not.

    ``final [batch, n, d_model]`` is the stored final stream at the rows read; the
    tolerance derives from the logits' dtype (:func:`reproduce_tolerance`).
    """
    picked = gather_positions(logits.detach(), index)  # [batch, n, d_vocab]
    picked = picked.reshape(-1, picked.shape[-1])
    # The model's probabilities of our top tokens, a block of rows at a time (bounded memory).
    theirs = torch.cat(
        [
            torch.exp(
                block.float().gather(1, ids.to(block.device)) - torch.logsumexp(block.float(), -1, keepdim=True)
            ).cpu()
            for block, ids in zip(picked.split(1024), top_ids.split(1024))
        ]
    )
    gaps = (theirs - top_probs).abs()  # [rows, k]
    relative = reproduce_tolerance(view, picked, final.reshape(-1, final.shape[-1]), top_ids)
    tol = (torch.maximum(theirs, top_probs) * relative).clamp_min(_REPRODUCE_ATOL)
    if not bool((gaps <= tol).all()):
        at = int((gaps / tol).nan_to_num(float("inf")).argmax())
        gap, bound = gaps.reshape(-1)[at].item(), tol.reshape(-1)[at].item()
        raise UnsupportedModelError(
            f"the lens's final entry differs from the model's own prediction by {gap:.3g} in "
            f"probability, more than the {bound:.3g} that {logits.dtype} rounding explains: the "
            "model transforms its stream or logits in a way this package does not reproduce (an extra "
            "head module or a logit transform), so no layer's reading can be trusted."
        )
