"""Direct logit attribution: how much each piece of the residual stream writes to an answer.

With the final norm's scale fixed at its forward-pass value (``norm="cached"``), the
readout is linear, so the logit (or logit difference ``answer - wrong``) splits exactly:

    model_value = sum over pieces  piece @ readout_direction(u) / scale  +  constant

where ``u = W_U[:, answer] - W_U[:, wrong]``, ``readout_direction`` folds in the norm's
weight and centring, and ``constant`` holds what no piece writes: ``b_U`` and the norm's
bias along ``u``. Pieces are contracted with the direction from their factored form
(activations times output weights), so ``[component, batch, pos, d_model]`` is never built.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Any, List, Optional, Tuple

import torch

from .errors import LensInputError, UnsupportedModelError
from .inputs import activation_shape, resolve_inputs, run_or_read
from .model_access import cache_tensor
from .stacks import STACK_KINDS, piece_groups, required_hooks
from .tokens import PositionSpec, gather_positions, per_prompt_ids, position_index


@dataclass
class Attribution:
    """Direct logit attribution of one logit, or a logit difference, to stack components.

    ``...`` below is ``[batch]``, or ``[batch, pos]`` when several positions were read.

    Attributes:
        values: ``[component, ...]`` each component's direct contribution.
        labels: component labels (``embed``, ``0_attn_out``, ``L1H3``, ``L0N17``, ...).
        model_value: ``[...]`` the model's own logit (difference).
        constant: ``[...]`` the terms no component writes: ``b_U`` and the final norm's bias.
        by: the stack kind (``"accumulated"``, ``"component"``, ``"head"``, ``"neuron"``).
        answer_ids, wrong_ids: ``[batch]`` (``wrong_ids`` is ``None`` for a plain logit).
        positions: ``[batch, pos]`` absolute positions read.
        n_layers, n_heads: model sizes, for :meth:`by_head`.
        lengths: ``[batch]`` each prompt's real length. Cells at padding positions (reached
            by ``positions=None`` or a slice over a right-padded batch) are NaN in
            ``values``, ``model_value`` and ``constant``; :meth:`mean`, :meth:`top`,
            :meth:`residual_error` and :meth:`to_dataframe` leave them out.

    Example::

        >>> import tl_logitlens as tll
        >>> model = tll.demo_model()
        >>> tokens = tll.demo.induction_prompt(model)          # <bos> + 12 words, repeated
        >>> att = tll.direct_logit_attribution(model, tokens[:, :-1], answers=int(tokens[0, -1]), by="head")
        >>> att.residual_error() < 1e-4
        True
    """

    values: torch.Tensor
    labels: List[str]
    model_value: torch.Tensor
    constant: torch.Tensor
    by: str
    answer_ids: torch.Tensor
    wrong_ids: Optional[torch.Tensor]
    positions: torch.Tensor
    n_layers: int
    n_heads: int
    tokenizer: Any = None
    lengths: Optional[torch.Tensor] = None

    def real(self) -> torch.Tensor:
        """``[...]`` bool: which cells are real tokens (False at padding positions)."""
        positions = self.positions if self.model_value.ndim == 2 else self.positions[:, :1]
        if self.lengths is None:
            return torch.ones(positions.shape, dtype=torch.bool).reshape(self.model_value.shape)
        return (positions < self.lengths.unsqueeze(1)).reshape(self.model_value.shape)

    def residual_error(self) -> float:
        """``max |sum(values) + constant - model_value|`` over real cells (for ``"accumulated"``: the final entry)."""
        total = self.values[-1] if self.by == "accumulated" else self.values.sum(0)
        return (total + self.constant - self.model_value).abs()[self.real()].max().item()

    def mean(self) -> torch.Tensor:
        """Mean over the batch, padding cells left out: ``[component]`` (or ``[component, pos]``).

        A position that is padding in every prompt has no value: NaN.
        """
        return torch.nanmean(self.values.masked_fill(~self.real(), float("nan")), dim=1)

    def top(self, k: int = 10) -> List[Tuple[str, float]]:
        """The ``k`` components with the largest mean absolute effect, as ``(label, mean value)``.

        The mean runs over every real (batch, position) cell; padding is left out. ``k``
        must be a positive int; fewer are returned when there are fewer components.
        """
        if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
            raise LensInputError(f"k must be a positive int (how many components to list), got {k!r}")
        real = self.real().reshape(-1)
        mean = self.values.reshape(self.values.shape[0], -1)[:, real].mean(1)
        order = mean.abs().argsort(descending=True)[: int(k)]
        return [(self.labels[i], float(mean[i])) for i in order.tolist()]

    def by_head(self) -> torch.Tensor:
        """Head attributions as ``[layer, head, ...]`` (needs ``by="head"``)."""
        if self.by != "head":
            raise LensInputError(f"by_head() needs an attribution with by='head', this one is by={self.by!r}")
        index = {label: i for i, label in enumerate(self.labels)}
        rows = [index[f"L{layer}H{head}"] for layer in range(self.n_layers) for head in range(self.n_heads)]
        picked = self.values[rows]
        return picked.reshape(self.n_layers, self.n_heads, *picked.shape[1:])

    def to_dataframe(self) -> Any:
        """One row per (component, batch[, pos]) with ``value``, plus ``model_value`` and ``constant``; padding left out."""
        import pandas as pd

        values = self.values if self.values.ndim == 3 else self.values.unsqueeze(-1)
        model_value = self.model_value if self.model_value.ndim == 2 else self.model_value.unsqueeze(-1)
        constant = self.constant if self.constant.ndim == 2 else self.constant.unsqueeze(-1)
        real = self.real().reshape(values.shape[1], values.shape[2])
        records = []
        for c, label in enumerate(self.labels):
            for b in range(values.shape[1]):
                for j in range(values.shape[2]):
                    if not real[b, j]:
                        continue  # padding
                    records.append({
                        "component": label,
                        "batch": b,
                        "pos": int(self.positions[b, j]),
                        "value": float(values[c, b, j]),
                        "model_value": float(model_value[b, j]),
                        "constant": float(constant[b, j]),
                    })
        return pd.DataFrame.from_records(records)

    def plot(self, **kwargs: Any) -> Any:
        """:func:`tl_logitlens.plot_attribution` on this result."""
        from .plots import plot_attribution

        return plot_attribution(self, **kwargs)


def direct_logit_attribution(
    model: Any = None,
    input: Any = None,
    *,
    cache: Any = None,
    answers: Any,
    wrong: Any = None,
    by: str = "component",
    positions: PositionSpec = -1,
) -> Attribution:
    """Attribute a logit, or the logit difference ``answers - wrong``, to stack components.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` in eval mode (may be
            omitted when ``cache`` records its model).
        input: text, a list of texts, or token ids ``[batch, pos]``; or omit and pass ``cache``.
        cache: an ``ActivationCache`` you already made.
        answers: the correct token: one string or id shared by all prompts, a list with one
            per prompt, or a ``[batch]`` tensor.
        wrong: the same forms; the attribution is then to ``logit(answer) - logit(wrong)``.
        by: ``"component"`` (embeddings, attention and MLP layers), ``"head"``,
            ``"neuron"`` or ``"accumulated"`` (the stream at each layer).
        positions: where to read; default ``-1`` is each prompt's own last real token. With
            ``None`` or a slice over a right-padded batch, padding cells are NaN (see
            :class:`Attribution`).

    Returns:
        :class:`Attribution` with ``values [component, batch]`` (``[component, batch, pos]``
        for several positions), for which ``values.sum(0) + constant == model_value``.

    Example::

        >>> import tl_logitlens as tll
        >>> model = tll.demo_model()
        >>> tokens = tll.demo.induction_prompt(model)
        >>> att = tll.direct_logit_attribution(model, tokens[:, :-1], answers=int(tokens[0, -1]), wrong=int(tokens[0, 1]))
        >>> att.labels[:4], tuple(att.values.shape)
        (['embed', '0_attn_out', '0_mlp_out', '1_attn_out'], (5, 1))
    """
    if by not in STACK_KINDS:
        raise LensInputError(f"by must be one of {STACK_KINDS}, got {by!r}")
    view, tokens, cache = resolve_inputs(model, input, cache)
    if view.output_transform is not None:
        raise UnsupportedModelError(
            "this model applies a non-linear transform to its logits (a logit soft-cap), so a logit "
            "is not a sum of per-component terms; direct logit attribution would be wrong. "
            "Use tll.logit_lens, which applies the transform, instead."
        )
    names = required_hooks(view, by)
    batch, seq = activation_shape(view, cache, tokens, names, f"direct_logit_attribution(by={by!r})")
    answer_ids = per_prompt_ids(view, answers, batch, "answer")
    wrong_ids = None if wrong is None else per_prompt_ids(view, wrong, batch, "wrong")
    lengths = tokens.lengths if tokens is not None else torch.full((batch,), seq)
    index, drop = position_index(positions, lengths, seq)
    logits, cache = run_or_read(view, tokens, cache, names)

    groups = piece_groups(view, cache, by, index)
    dtype = groups[0].acts.dtype
    fnorm = view.final_norm.to(dtype)
    W_U = view.W_U.to(dtype)
    b_U = view.b_U
    u = W_U[:, answer_ids].T  # [batch, d_model]
    if wrong_ids is not None:
        u = u - W_U[:, wrong_ids].T
    u = u.to(groups[0].acts.device)
    final = gather_positions(cache_tensor(cache, view.final_resid_hook), index).to(dtype)
    scale = fnorm.scale(final)[..., 0]  # [batch, pos]
    direction = fnorm.readout_direction(u)
    values = torch.cat([g.project(direction) for g in groups], dim=0) / scale

    constant = fnorm.bias_term(u)
    if b_U is not None:
        b_U = b_U.to(dtype)
        constant = constant + b_U[answer_ids] - (b_U[wrong_ids] if wrong_ids is not None else 0)
    constant = constant.unsqueeze(1).expand_as(scale)

    if logits is not None:
        picked = gather_positions(logits.detach().to(dtype), index)  # [batch, pos, d_vocab]

        def logit_of(ids: torch.Tensor) -> torch.Tensor:
            return picked.gather(2, ids.view(batch, 1, 1).expand(batch, index.shape[1], 1))[..., 0]

        model_value = logit_of(answer_ids)
        if wrong_ids is not None:
            model_value = model_value - logit_of(wrong_ids)
    else:
        # Only a cache: the model's value is its final stream read exactly as the model reads it.
        model_value = (fnorm.apply(final, "recompute") * u.unsqueeze(1)).sum(-1)
        if b_U is not None:
            model_value = model_value + (b_U[answer_ids] - (b_U[wrong_ids] if wrong_ids is not None else 0)).unsqueeze(1)

    # Padding positions (positions=None or a slice over a right-padded batch) hold no token:
    # mark them NaN so that no number is read from them.
    padding = (index >= lengths.unsqueeze(1)).to(values.device)
    if bool(padding.any()):
        values = values.masked_fill(padding, float("nan"))
        model_value = model_value.masked_fill(padding.to(model_value.device), float("nan"))
        constant = constant.masked_fill(padding.to(constant.device), float("nan"))
    if drop:
        values, model_value, constant = values[..., 0], model_value[..., 0], constant[..., 0]
    return Attribution(
        values=values.float().cpu(),
        labels=[label for g in groups for label in g.labels],
        model_value=model_value.float().cpu(),
        constant=constant.float().cpu(),
        by=by,
        answer_ids=answer_ids,
        wrong_ids=wrong_ids,
        positions=index,
        n_layers=view.n_layers,
        n_heads=view.n_heads,
        tokenizer=view.tokenizer,
        lengths=lengths,
    )
