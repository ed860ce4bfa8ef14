"""Direct logit attribution: how much each piece of the residual stream writes to an answer.

With the final norm's scale fixed at its forward-pass value (``norm="cached"``), the
readout is linear, so the logit (or logit difference ``answer - wrong``) splits exactly:

    model_value = sum over pieces  piece @ readout_direction(u) / scale  +  constant

where ``u = W_U[:, answer] - W_U[:, wrong]``, ``readout_direction`` folds in the norm's
weight and centring, and ``constant`` holds what no piece writes: ``b_U`` and the norm's
bias along ``u``. Pieces are contracted with the direction from their factored form
(activations times output weights), so ``[component, batch, pos, d_model]`` is never built.

Model families. What a model does after the unembedding is read by
:mod:`tl_logitlens.model_access.logits`. A linear logit scale (Granite divides by
``logits_scaling``, Cohere multiplies by ``logit_scale``) is folded into ``u`` and ``b_U``, so
``model_value`` is the model's own logit, exactly. A soft cap (Gemma 2:
``cap * tanh(logit / cap)``) is not linear: the pieces add up exactly to the pre-cap logit
(difference), ``model_value``, and :attr:`Attribution.logit_transform` names the cap beside
:attr:`Attribution.capped_value`, the capped value the model reports. A transform of any other
shape is refused, named. A block whose outputs pass through a post-norm (Gemma 2/3, OLMo 2) or a
multiplier (Granite) on their way to the stream has its pieces read through them
(:mod:`tl_logitlens.stacks`): the post-norm is linearised at the scale the forward pass
computed, as the final norm is here.

Precision. Everything is computed in float32 (float64 for a float64 model) from the
activations the model stored. ``model_value`` is the float32 reading of the final stream the
model stored, so the identity above holds to float32 precision in every dtype. A
bfloat16 or float16 model rounds its stream after every addition, so its pieces gain a
``rounding`` entry (:mod:`tl_logitlens.stacks`), whose largest size is
:attr:`Attribution.rounding_error`. When the model was run here, its own logits are
compared with ``model_value`` (with a soft cap: with ``capped_value``); they may differ by the
rounding of the model's last steps:

    |logit_model - model_value| <= 2 * eps * sum_t (|logit_t| + |n| @ |W_U[:, t]|) + 1e-4 * (1 + |model_value|)

over the answer (and wrong) token ``t``, with ``n`` the normalised final stream (``W_U``
carrying the linear logit scale, if any; a soft cap's slope is at most 1) and
``eps = torch.finfo(logits.dtype).eps``: the normalised stream and the logits are each
rounded once to the model's dtype. A larger difference is refused: the model does
something after ``ln_final`` that this reading misses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from numbers import Integral
from typing import Any, List, NamedTuple, Optional, Tuple

import torch

from .errors import LensInputError, UnsupportedModelError
from .inputs import (
    PositionSpec,
    activation_shape,
    gather_positions,
    per_prompt_ids,
    position_index,
    resolve_inputs,
    run_or_read,
)
from .kernel import is_half
from .model_access import cache_tensor, compute_device
from .renamed import renamed_keywords
from .stacks import STACK_KINDS, head_source_values, piece_groups, required_hooks, source_hooks
from .tokentext import token_text

#: The final-norm readings under which the pieces add up (see direct_logit_attribution).
ATTRIBUTION_NORMS = ("cached", "none")

# The labels ``top()`` ranks after by="head" / by="neuron" (other pieces only when asked).
_KIND_LABEL = {"head": re.compile(r"L\d+H\d+"), "neuron": re.compile(r"L\d+(E\d+|S)?N\d+")}


@dataclass
class Attribution:
    """Direct logit attribution of one logit, or a logit difference, to stack components.

    ``...`` below is ``[batch]``, or ``[batch, pos]`` when several positions were read.

    Attributes:
        values: ``[component, ...]`` each component's direct contribution.
        labels: component labels (``embed``, ``0_attn_out``, ``L1H3``, ``L0N17``, ...).
        model_value: ``[...]`` the model's own logit (difference) (with ``norm="none"``: the
            unnormalised value ``final_stream @ u + b_U``), with a linear logit scale applied
            (Granite, Cohere) and before a soft cap (Gemma 2: see ``logit_transform``).
        constant: ``[...]`` the terms no component writes: ``b_U`` and the final norm's bias.
        norm: ``"cached"`` or ``"none"``, how the final norm was applied.
        by: the stack kind (``"accumulated"``, ``"component"``, ``"head"``, ``"neuron"``).
        answer_ids, wrong_ids: ``[batch]`` (``wrong_ids`` is ``None`` for a plain logit).
        positions: ``[batch, pos]`` absolute positions read.
        n_layers, n_heads: model sizes, for :meth:`by_head`.
        rounding_error: the largest ``|rounding|`` entry (bfloat16 and float16 models: what
            the model's own roundings add to the value), ``0.0`` without one.
        lengths: ``[batch]`` each prompt's real length. Cells at padding positions (reached
            by ``positions=None`` or a slice over a right-padded batch) are NaN in
            ``values``, ``model_value`` and ``constant``; :meth:`mean`, :meth:`top`,
            :meth:`residual_error` and :meth:`to_dataframe` leave them out.
        source_values: with ``by_source=True``, ``[layer, head, src, ...]`` each head's value
            split over the source positions it read (see :meth:`by_source`); else ``None``.
        source_rounding: ``[layer, head, ...]`` for a bfloat16 or float16 model with
            ``by_source=True``: the part of each head's value that its model's rounding of
            ``hook_z`` adds, so that ``source_values.sum(2) + source_rounding ==
            by_head()``; ``None`` otherwise (the pieces add up to float precision).
        input_ids: ``[batch, seq]`` the input tokens, or ``None`` when only a cache was given.
        logit_transform: ``None``, or the soft cap the model applies after ``model_value``
            (e.g. ``"logit -> 30 * tanh(logit / 30) (a soft cap)"``): the cap is not linear, so
            the pieces add up to the pre-cap logit (difference), exactly, and ``capped_value``
            is what the model reports.
        capped_value: ``[...]`` with a soft cap, the model's own logit (difference) after it
            (each logit capped, then subtracted); ``None`` without one.

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
    rounding_error: float = 0.0
    lengths: Optional[torch.Tensor] = None
    norm: str = "cached"
    source_values: Optional[torch.Tensor] = None
    source_rounding: Optional[torch.Tensor] = None
    input_ids: Optional[torch.Tensor] = None
    logit_transform: Optional[str] = None
    capped_value: Optional[torch.Tensor] = None

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

    @renamed_keywords(k="top_k")
    def top(self, top_k: int = 10, include_other: bool = False) -> List[Tuple[str, float]]:
        """The ``top_k`` components with the largest mean absolute effect, as ``(label, mean value)``.

        The mean runs over every real (batch, position) cell; padding is left out. ``top_k``
        (``k=`` is its old spelling) must be a positive int; fewer are returned when there are fewer components. After
        ``by="head"`` (``by="neuron"``) only heads ``L{l}H{h}`` (neurons ``L{l}N{i}``) are
        ranked, since those are what was asked for; ``include_other=True`` ranks the
        embeddings, MLP or attention layers and bias terms of the same stack among them.
        """
        if isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 1:
            raise LensInputError(f"top_k must be a positive int (how many components to list), got {top_k!r}")
        real = self.real().reshape(-1)
        mean = self.values.reshape(self.values.shape[0], -1)[:, real].mean(1)
        pattern = _KIND_LABEL.get(self.by)
        keep = [
            i for i, label in enumerate(self.labels) if include_other or pattern is None or pattern.fullmatch(label)
        ]
        picked = torch.tensor(keep, dtype=torch.long)
        order = picked[mean[picked].abs().argsort(descending=True)[: int(top_k)]]
        return [(self.labels[i], float(mean[i])) for i in order.tolist()]

    def by_head(self) -> torch.Tensor:
        """Head attributions as ``[layer, head, ...]`` (needs ``by="head"``)."""
        if self.by != "head":
            raise LensInputError(f"by_head() needs an attribution with by='head', this one is by={self.by!r}")
        index = {label: i for i, label in enumerate(self.labels)}
        rows = [index[f"L{layer}H{head}"] for layer in range(self.n_layers) for head in range(self.n_heads)]
        picked = self.values[rows]
        return picked.reshape(self.n_layers, self.n_heads, *picked.shape[1:])

    def by_source(self) -> torch.Tensor:
        """Each head's attribution split over the source positions it attended to.

        ``[layer, head, src, batch]`` for one destination position per prompt (an int
        ``positions``, the default ``-1``), ``[layer, head, src, batch, pos]`` for several
        (``pos`` indexes :attr:`positions`); ``src`` is the absolute input position
        ``0 .. seq-1``. Entry ``[l, h, s, b]`` is ``pattern[dest, s] * (v[s] @ W_O[h])`` read
        along the answer direction with the same norm and scale as the head's own value,
        ``v`` holding the value bias (a pattern row sums to 1, so ``b_V`` is shared among
        the sources by attention weight). Summed over ``src`` (plus
        :attr:`source_rounding` for a half-precision model) it is :meth:`by_head`. Sources
        after the destination are 0; padding destinations are NaN. Needs
        ``direct_logit_attribution(..., by="head", by_source=True)``.

        Example::

            >>> import tl_logitlens as tll
            >>> model = tll.demo_model()
            >>> tokens = tll.demo.induction_prompt(model)
            >>> att = tll.direct_logit_attribution(model, tokens[:, :-1], answers=int(tokens[0, -1]),
            ...                                    by="head", by_source=True)
            >>> tuple(att.by_source().shape)                    # [layer, head, src, batch]
            (2, 4, 24, 1)
            >>> bool((att.by_source().sum(2) - att.by_head()).abs().max() < 1e-5)
            True
        """
        if self.source_values is None:
            raise LensInputError(
                "by_source() needs an attribution made with by='head', by_source=True: "
                "tll.direct_logit_attribution(..., by='head', by_source=True)"
            )
        return self.source_values

    def source_tokens(self) -> Optional[List[List[str]]]:
        """The source positions' input tokens as text, ``[batch][src]`` (``None`` when only a cache was given)."""
        if self.input_ids is None:
            return None
        n_src = self.by_source().shape[2]
        return [[token_text(self.tokenizer, int(i)) for i in row[:n_src].tolist()] for row in self.input_ids]

    def to_dataframe(self) -> Any:
        """One row per (component, batch[, pos]) with ``value``, plus ``model_value`` and ``constant``.

        Columns: ``component``, ``batch``, ``pos`` (absolute position), ``value``,
        ``model_value``, ``constant``; rows run component, then batch, then position.
        Padding positions are left out.
        Built column by column, so a neuron attribution of 400k rows takes a fraction of a second.

        Example::

            >>> import tl_logitlens as tll
            >>> model = tll.demo_model()
            >>> tokens = tll.demo.induction_prompt(model)
            >>> att = tll.direct_logit_attribution(model, tokens[:, :-1], answers=int(tokens[0, -1]))
            >>> frame = att.to_dataframe()
            >>> list(frame["component"]) == att.labels, list(frame.columns)
            (True, ['component', 'batch', 'pos', 'value', 'model_value', 'constant'])
        """
        import numpy as np
        import pandas as pd

        values = self.values if self.values.ndim == 3 else self.values.unsqueeze(-1)
        model_value = self.model_value if self.model_value.ndim == 2 else self.model_value.unsqueeze(-1)
        constant = self.constant if self.constant.ndim == 2 else self.constant.unsqueeze(-1)
        n_comp, batch, n_pos = values.shape
        cells = batch * n_pos
        real = np.tile(self.real().reshape(-1).numpy(), n_comp)  # padding cells are left out
        return pd.DataFrame(
            {
                "component": np.repeat(np.array(self.labels, dtype=object), cells)[real],
                "batch": np.tile(np.repeat(np.arange(batch, dtype=np.int64), n_pos), n_comp)[real],
                "pos": np.tile(self.positions.reshape(batch, n_pos).numpy().astype(np.int64).reshape(-1), n_comp)[real],
                "value": values.numpy().astype(np.float64).reshape(-1)[real],
                "model_value": np.tile(model_value.numpy().astype(np.float64).reshape(-1), n_comp)[real],
                "constant": np.tile(constant.numpy().astype(np.float64).reshape(-1), n_comp)[real],
            }
        )

    def __repr__(self) -> str:
        labels = self.labels if len(self.labels) <= 2 else [self.labels[0], "...", self.labels[-1]]
        shown = "[" + ", ".join(x if x == "..." else repr(x) for x in labels) + "]"
        pos = self.values.shape[2] if self.values.ndim == 3 else None
        what = "logit difference" if self.wrong_ids is not None else "logit"
        if self.logit_transform is not None:
            what += " before the soft cap"  # the pieces add up to the pre-cap value (capped_value: after it)
        return (
            f"Attribution(by={self.by!r}, labels={shown} ({len(self.labels)}), batch={self.values.shape[1]}, "
            f"pos={pos}, of={what!r}, residual_error={self.residual_error():.2g})"
        )

    def plot(self, **kwargs: Any) -> Any:
        """:func:`tl_logitlens.plot_attribution` on this result."""
        from .plots import plot_attribution

        return plot_attribution(self, **kwargs)

    def show(self, **kwargs: Any) -> Any:
        """Display the interactive plotly view in a notebook and return the Figure
        (:mod:`tl_logitlens.plots.interactive`)."""
        from .plots.interactive import show

        return show(self, **kwargs)

    def to_html(self, path: Any, **kwargs: Any) -> Any:
        """Write the interactive view to ``path`` as a self-contained page (no network needed to open it)."""
        from .plots.interactive import to_html

        return to_html(self, path, **kwargs)


def direct_logit_attribution(
    model: Any = None,
    input: Any = None,
    *,
    cache: Any = None,
    answers: Any,
    wrong: Any = None,
    by: str = "component",
    positions: PositionSpec = -1,
    norm: str = "cached",
    by_source: bool = False,
    pixel_values: Optional[torch.Tensor] = None,
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
        norm: ``"cached"`` (default): the final norm with the scale the forward pass used at
            that position, which is linear, so the pieces add up to the model's own logit
            (difference). ``"none"``: no norm, each piece dotted with ``W_U``'s columns as it
            is (the raw reading of the original logit lens); the pieces then add up to the
            unnormalised value ``final_stream @ u + b_U``, which is not the model's logit.
            ``"recompute"`` is refused: each piece normalised by its own statistics is not
            linear, so the pieces would not add up (read layers that way with
            :func:`tl_logitlens.logit_lens`).
        by_source: with ``by="head"``, also split each head's value over the source
            positions it attended to (:meth:`Attribution.by_source`); reads each layer's
            ``attn.hook_pattern`` and ``attn.hook_v`` as well.
        pixel_values: a vision-language model's images, as its processor makes them (see
            :func:`tl_logitlens.logit_lens`). The pieces then include ``image_embed``: the
            projected image features the model wrote into the stream at image positions in
            place of the image tokens' embeddings (``embed`` is zero there, ``image_embed``
            zero at text positions), so every position, text or image, adds up exactly.

    Returns:
        :class:`Attribution` with ``values [component, batch]`` (``[component, batch, pos]``
        for several positions), for which ``values.sum(0) + constant == model_value``; for a
        bfloat16 or float16 model the last component is ``rounding`` (module docstring).

    Example::

        >>> import tl_logitlens as tll
        >>> model = tll.demo_model()
        >>> tokens = tll.demo.induction_prompt(model)
        >>> att = tll.direct_logit_attribution(
        ...     model, tokens[:, :-1], answers=int(tokens[0, -1]), wrong=int(tokens[0, 1])
        ... )
        >>> att.labels[:4], tuple(att.values.shape)
        (['embed', '0_attn_out', '0_mlp_out', '1_attn_out'], (5, 1))
    """
    _check_options(by, by_source, norm)  # before any forward pass
    view, tokens, cache = resolve_inputs(model, input, cache, pixel_values)
    _check_linear_logits(view)
    names = required_hooks(view, by) + (source_hooks(view) if by_source else [])
    batch, seq = activation_shape(view, cache, tokens, names, f"direct_logit_attribution(by={by!r})")
    answer_ids = per_prompt_ids(view, answers, batch, "answer")
    wrong_ids = None if wrong is None else per_prompt_ids(view, wrong, batch, "wrong")
    lengths = tokens.lengths if tokens is not None else torch.full((batch,), seq)
    index, drop = position_index(positions, lengths, seq)
    logits, cache = run_or_read(view, tokens, cache, names)

    groups = piece_groups(view, cache, by, index)
    readout = _readout(view, cache, logits, index, groups[0].acts.dtype, answer_ids, wrong_ids, norm)
    values, labels, sources, source_rounding = _pieces(view, cache, index, groups, readout, by_source)

    values, model_value, constant, capped, sources, source_rounding = _mark_padding(
        index, lengths, values, readout.model_value, readout.constant, readout.capped_value, sources, source_rounding
    )
    rounding_error = _rounding_error(values, labels)
    if drop:
        values, model_value, constant, capped, sources, source_rounding = (
            None if t is None else t[..., 0] for t in (values, model_value, constant, capped, sources, source_rounding)
        )
    cpu = lambda t: None if t is None else t.float().cpu()  # noqa: E731
    return Attribution(
        values=cpu(values),
        labels=labels,
        model_value=cpu(model_value),
        constant=cpu(constant),
        logit_transform=None if capped is None else view.logit_transform.describe(),
        capped_value=cpu(capped),
        by=by,
        answer_ids=answer_ids,
        wrong_ids=wrong_ids,
        positions=index,
        n_layers=view.n_layers,
        n_heads=view.n_heads,
        tokenizer=view.tokenizer,
        rounding_error=rounding_error,
        lengths=lengths,
        norm=norm,
        source_values=cpu(sources),
        source_rounding=cpu(source_rounding),
        input_ids=None if tokens is None else tokens.ids,
    )


def _check_options(by: str, by_source: Any, norm: str) -> None:
    """Refuse a bad ``by``, ``by_source`` or ``norm`` (in that order), before any model is touched."""
    if by not in STACK_KINDS:
        raise LensInputError(f"by must be one of {STACK_KINDS}, got {by!r}")
    if not isinstance(by_source, bool):
        raise LensInputError(f"by_source must be True or False, got {by_source!r}")
    if by_source and by != "head":
        raise LensInputError(
            f"by_source=True splits heads over their source positions, so it needs by='head' (got by={by!r})"
        )
    if norm not in ATTRIBUTION_NORMS:
        why = (
            ": each piece normalised by its own statistics is not linear, so the pieces would not add "
            "up; tll.logit_lens(norm='recompute') reads the stream that way"
            if norm == "recompute"
            else ""
        )
        raise LensInputError(f"norm must be one of {ATTRIBUTION_NORMS} for direct logit attribution, got {norm!r}{why}")


def _check_linear_logits(view: Any) -> None:
    """Refuse a model whose logits pass through a transform that is neither a linear scale nor a soft cap.

    A linear scale (Granite, Cohere) is folded into the answer direction; under a soft cap
    (Gemma 2) the pre-cap logit is attributed. Anything else is refused, named.
    """
    transform = view.logit_transform
    if transform.opaque is not None:
        raise UnsupportedModelError(
            f"this model's logits pass through {transform.describe()}: on a probe of logits from -80 to 80 it "
            "matched no linear scale and no soft cap, so a logit is not a sum of per-piece terms and direct "
            "logit attribution would be wrong. tll.logit_lens applies the transform as the model does."
        )


class _Readout(NamedTuple):
    """The linear reading of the answer at the read positions: a piece's value is ``piece @ direction / scale``."""

    direction: torch.Tensor  # [batch, d_model]: u (times the logit scale), with the final norm's weight and centring
    scale: torch.Tensor  # [batch, pos]: the final norm's scale (ones for norm="none")
    constant: torch.Tensor  # [batch, pos]: what no piece writes (b_U and the norm's bias along u)
    model_value: torch.Tensor  # [batch, pos]: the value the pieces add up to (before a soft cap)
    capped_value: Optional[torch.Tensor]  # [batch, pos]: the model's value after its soft cap, or None


class _Columns(NamedTuple):
    """The answer and wrong tokens' unembedding columns ``[batch, d_model]`` and biases ``[batch]`` (with the
    model's linear logit scale folded in: ``logit = n @ column + bias``)."""

    answer: torch.Tensor
    answer_bias: torch.Tensor
    wrong: Optional[torch.Tensor]
    wrong_bias: Optional[torch.Tensor]

    def direction(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(u [batch, d_model], b_diff [batch])``: the answer's column and bias, minus the wrong token's."""
        if self.wrong is None:
            return self.answer, self.answer_bias
        return self.answer - self.wrong, self.answer_bias - self.wrong_bias


def _answer_columns(
    view: Any,
    answer_ids: torch.Tensor,
    wrong_ids: Optional[torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
) -> _Columns:
    """``W_U[:, ids].T`` and ``b_U[ids]`` (zeros without one) of the answer and wrong tokens, times the logit scale.

    Only these columns leave W_U's dtype and device.
    """
    W_U, b_U = view.W_U, view.b_U
    scale = view.logit_transform.scale  # Granite's 1 / logits_scaling, Cohere's logit_scale: exact, linear

    def column(ids: torch.Tensor) -> torch.Tensor:
        return W_U[:, ids.to(W_U.device)].T.to(device=device, dtype=dtype) * scale

    def bias(ids: torch.Tensor) -> torch.Tensor:
        if b_U is None:
            return torch.zeros(ids.shape[0], device=device, dtype=dtype)
        return b_U[ids.to(b_U.device)].to(device=device, dtype=dtype) * scale

    if wrong_ids is None:
        return _Columns(column(answer_ids), bias(answer_ids), None, None)
    return _Columns(column(answer_ids), bias(answer_ids), column(wrong_ids), bias(wrong_ids))


def _readout(
    view: Any,
    cache: Any,
    logits: Optional[torch.Tensor],
    index: torch.Tensor,
    dtype: torch.dtype,
    answer_ids: torch.Tensor,
    wrong_ids: Optional[torch.Tensor],
    norm: str,
) -> _Readout:
    """The answer direction and the model's value at ``index [batch, pos]``, read through the final norm as
    ``norm`` says; the model's own logits, when it was run here, are checked against that value."""
    device = compute_device(view)
    fnorm = view.final_norm.to(dtype, device)
    columns = _answer_columns(view, answer_ids, wrong_ids, dtype, device)
    u, b_diff = columns.direction()
    final = gather_positions(cache_tensor(cache, view.final_resid_hook), index).to(device=device, dtype=dtype)

    # The model's value: its stored final stream read exactly as the model reads it, in
    # float32, so the pieces (with the rounding entry in half precision) add up to it.
    normed = fnorm.apply(final, "recompute")  # [batch, pos, d_model]
    model_value = (normed * u.unsqueeze(1)).sum(-1) + b_diff.unsqueeze(1)
    capped = _capped_value(view.logit_transform, normed, columns)
    if logits is not None:
        _check_model_logits(logits, index, normed, answer_ids, wrong_ids, columns, capped)

    if norm == "cached":  # the final norm with the forward pass's own scale: linear
        scale = fnorm.scale(final)[..., 0]  # [batch, pos]
        direction = fnorm.readout_direction(u)
        constant = fnorm.bias_term(u) + b_diff
    else:  # "none": the raw stream along W_U's columns, no norm at all
        scale = torch.ones(final.shape[:2], device=device, dtype=dtype)
        direction = u
        constant = b_diff
        model_value = (final * u.unsqueeze(1)).sum(-1) + b_diff.unsqueeze(1)
    capped_value = capped if view.logit_transform.soft_cap is not None else None
    return _Readout(direction, scale, constant.unsqueeze(1).expand_as(scale), model_value, capped_value)


def _capped_value(transform: Any, normed: torch.Tensor, columns: _Columns) -> torch.Tensor:
    """``[batch, pos]``: the model's logit (difference) as it reports it, each logit through its soft cap
    (the plain, scaled logit (difference) without one)."""

    def logit(column: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return transform.cap((normed * column.unsqueeze(1)).sum(-1) + bias.unsqueeze(1))

    value = logit(columns.answer, columns.answer_bias)
    if columns.wrong is not None:
        value = value - logit(columns.wrong, columns.wrong_bias)
    return value


def _pieces(
    view: Any, cache: Any, index: torch.Tensor, groups: List[Any], readout: _Readout, by_source: bool
) -> Tuple[torch.Tensor, List[str], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(values [component, batch, pos], labels, sources, source_rounding)``: each piece along the readout
    direction, and with ``by_source`` each head's value split over its sources (:func:`_split_heads`)."""
    values = torch.cat([g.project(readout.direction) for g in groups], dim=0) / readout.scale
    labels = [label for g in groups for label in g.labels]
    sources = source_rounding = None
    if by_source:
        sources, source_rounding = _split_heads(view, cache, index, readout.direction, readout.scale, values, labels)
    return values, labels, sources, source_rounding


def _mark_padding(
    index: torch.Tensor, lengths: torch.Tensor, *tensors: Optional[torch.Tensor]
) -> List[Optional[torch.Tensor]]:
    """``tensors`` (each ending in ``[batch, pos]``; ``None`` passes through) with NaN at padding positions."""
    # Padding positions (positions=None or a slice over a right-padded batch) hold no token:
    # mark them NaN so that no number is read from them.
    padding = (index >= lengths.unsqueeze(1)).to(tensors[0].device)
    if not bool(padding.any()):
        return list(tensors)
    return [None if t is None else t.masked_fill(padding.to(t.device), float("nan")) for t in tensors]


def _rounding_error(values: torch.Tensor, labels: List[str]) -> float:
    """The largest size of the ``rounding`` entry of ``values [component, ...]`` over real cells; 0 without one."""
    if "rounding" not in labels:
        return 0.0
    # Padding cells are NaN by now, and no rounding is read from them.
    return float(torch.nan_to_num(values[labels.index("rounding")].abs(), nan=0.0).max())


def _split_heads(
    view: Any,
    cache: Any,
    index: torch.Tensor,
    direction: torch.Tensor,
    scale: torch.Tensor,
    values: torch.Tensor,
    labels: List[str],
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(pieces [layer, head, src, batch, n], rounding [layer, head, batch, n] or None)``: each
    head's value ``values [component, batch, n]`` split over its sources.

    The pieces must add up to the head's value, which was read from ``hook_z``: the model
    computed ``z = pattern @ v`` itself and stored it rounded to its dtype, so the gap may be
    ``4 * eps * size`` (``size`` from :func:`tl_logitlens.stacks.head_source_values`, ``eps``
    the stored values' dtype's) plus ``1e-6 * (1 + |head value|)``. A larger gap means the
    pattern and values do not make the heads' outputs (the model mixes values some other
    way) and the split is refused. A half-precision model keeps the gap as its
    ``source_rounding``.
    """
    pieces, size = head_source_values(view, cache, index, direction, scale)
    rows = [labels.index(f"L{layer}H{head}") for layer in range(view.n_layers) for head in range(view.n_heads)]
    heads = values[rows].reshape(view.n_layers, view.n_heads, *values.shape[1:])
    gap = heads - pieces.sum(2)
    stored = cache_tensor(cache, view.attn_v_hook(0)).dtype
    bound = 4 * torch.finfo(stored).eps * size + 1e-6 * (1 + heads.abs())
    if not bool((gap.abs() <= bound).all()):
        at = int((gap.abs() / bound).reshape(-1).argmax())
        layer, head = divmod(at // (gap.numel() // (view.n_layers * view.n_heads)), view.n_heads)
        raise UnsupportedModelError(
            f"head L{layer}H{head}'s attention pattern and values do not add up to its output (hook_z): "
            f"a gap of {gap.abs().reshape(-1)[at].item():.3g} in its attribution where {stored} rounding "
            f"explains {bound.reshape(-1)[at].item():.3g}. This model mixes values in a way the "
            "head-by-source split does not capture; use by_source=False."
        )
    return pieces, (gap if is_half(stored) else None)


def _check_model_logits(
    logits: torch.Tensor,
    index: torch.Tensor,
    normed: torch.Tensor,
    answer_ids: torch.Tensor,
    wrong_ids: Optional[torch.Tensor],
    columns: _Columns,
    expected: torch.Tensor,
) -> None:
    """The model's own logit (difference) must match the reading of its stored stream within its dtype's rounding.

    Tolerance in the module docstring; ``normed [batch, pos, d_model]`` is the normalised
    final stream, ``columns`` the answer and wrong tokens' columns (logit scale folded in),
    ``expected [batch, pos]`` the reading's logit (difference) after any soft cap (whose slope
    is at most 1, so it shrinks a rounding error, never grows it).
    """
    batch, n_pos = index.shape
    picked = gather_positions(logits.detach(), index)  # [batch, pos, d_vocab] on the logits' device
    eps = torch.finfo(logits.dtype).eps

    def own(ids: torch.Tensor) -> torch.Tensor:
        at = ids.to(picked.device).view(batch, 1, 1).expand(batch, n_pos, 1)
        return picked.gather(2, at)[..., 0].to(device=expected.device, dtype=expected.dtype)

    def size(column: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
        return logit.abs() + torch.einsum("bpd,bd->bp", normed.abs(), column.abs())

    theirs = own(answer_ids)
    budget = size(columns.answer, theirs)
    if wrong_ids is not None:
        wrong_logit = own(wrong_ids)
        theirs = theirs - wrong_logit
        budget = budget + size(columns.wrong, wrong_logit)
    tol = 2 * eps * budget + 1e-4 * (1 + expected.abs())
    gap = (theirs - expected).abs()
    if not bool((gap <= tol).all()):
        at = int((gap / tol).reshape(-1).nan_to_num(float("inf")).argmax())
        raise UnsupportedModelError(
            f"the model's own logit (difference) differs from the reading of its final residual "
            f"stream by {gap.reshape(-1)[at].item():.3g}, more than the {tol.reshape(-1)[at].item():.3g} "
            f"that {logits.dtype} rounding explains: the model does something after ln_final (an "
            "extra head module, or a logit transform its adapter does not declare) that direct logit "
            "attribution does not see."
        )
