"""Residual stacks: the stream at every layer, and the pieces that wrote it.

A stack is ``[component, batch, pos, d_model]`` with one label per component. Four ways
to cut the stream (``by``):

- ``"accumulated"``: the stream itself before each layer, ``0_pre .. final_post``
  (with ``L_mid`` entries between attention and MLP when ``incl_mid=True``).
- ``"component"``: ``embed``, ``pos_embed`` (learned positions only), and every
  ``L_attn_out`` and ``L_mlp_out``. They add up to the final stream.
- ``"head"``: every head's write ``LxHy = z[..., y, :] @ W_O[y]`` from ``attn.hook_z``
  (never ``hook_result``, which is off by default and costs memory), each layer's
  attention bias ``L_attn_bias``, and the non-attention components.
- ``"neuron"``: every neuron's write ``LxNy = post[..., y] * W_out[y]`` from
  ``mlp.hook_post``, each ``L_mlp_bias``, and the non-MLP components.

Each cut is a list of :class:`PieceGroup` factored as activations times weights, so the
same pieces can either be materialised (:func:`residual_stack`) or contracted with a
direction without ever building ``[component, batch, pos, d_model]``
(:func:`tl_logitlens.attribution.direct_logit_attribution`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from .errors import LensInputError, MissingHooksError, UnsupportedModelError
from .model_access import ModelView, cache_has, cache_tensor, model_from_cache, view as view_model
from .readout import require_finite
from .tokens import PositionSpec, gather_positions, position_index

STACK_KINDS = ("accumulated", "component", "head", "neuron")

# The decomposed pieces must add up to the final stream; gaps above this fraction of the
# stream's own size mean the model writes to it in a way the decomposition misses.
_SUM_CHECK_RTOL = 1e-4


@dataclass
class PieceGroup:
    """Pieces of the residual stream that share one factorisation.

    ``acts [batch, pos, n, k]`` and ``weight [n, k, d_model]`` give piece ``i`` as
    ``acts[..., i, :] @ weight[i]``; with ``weight=None`` the acts are the vectors
    themselves (``k = d_model``).
    """

    labels: List[str]
    acts: torch.Tensor
    weight: Optional[torch.Tensor] = None

    def vectors(self) -> torch.Tensor:
        """The pieces ``[n, batch, pos, d_model]``."""
        if self.weight is None:
            return self.acts.permute(2, 0, 1, 3)
        return torch.einsum("bpnk,nkd->nbpd", self.acts, self.weight)

    def total(self) -> torch.Tensor:
        """The sum of the pieces ``[batch, pos, d_model]``."""
        if self.weight is None:
            return self.acts.sum(2)
        return torch.einsum("bpnk,nkd->bpd", self.acts, self.weight)

    def project(self, direction: torch.Tensor) -> torch.Tensor:
        """Each piece dotted with one direction per prompt ``[batch, d_model]``: ``[n, batch, pos]``."""
        if self.weight is None:
            return torch.einsum("bpnd,bd->nbp", self.acts, direction)
        # Pull the direction into each piece's own space once per prompt (n*k*d), then
        # contract the activations: the [n, batch, pos, d_model] pieces are never built.
        pulled = torch.einsum("nkd,bd->bnk", self.weight, direction)
        return torch.einsum("bpnk,bnk->nbp", self.acts, pulled)


def _bias_group(label: str, bias: torch.Tensor, batch: int, pos: int) -> PieceGroup:
    return PieceGroup([label], bias.reshape(1, 1, 1, -1).expand(batch, pos, 1, -1))


def required_hooks(view: ModelView, by: str, incl_mid: bool = False) -> List[str]:
    """The hook names a stack of kind ``by`` reads (plus the final stream, always)."""
    if by not in STACK_KINDS:
        raise LensInputError(f"by must be one of {STACK_KINDS}, got {by!r}")
    final = view.final_resid_hook
    if by == "accumulated":
        if incl_mid and view.parallel:
            raise UnsupportedModelError(
                "incl_mid=True asks for the stream between attention and MLP, but this model runs "
                "them in parallel on the same stream, so there is no such point; use incl_mid=False."
            )
        if incl_mid and not view.has_mlp:
            raise LensInputError(
                "incl_mid=True asks for the stream between attention and MLP, but this model is "
                "attention-only, so that stream is the next layer's resid_pre; use incl_mid=False."
            )
        names = []
        for layer in range(view.n_layers):
            names.append(view.resid_hook(layer, "pre"))
            if incl_mid:
                names.append(view.resid_hook(layer, "mid"))
        return names + [final]
    names = ["hook_embed"] + (["hook_pos_embed"] if view.has_pos_embed else [])
    for layer in range(view.n_layers):
        names.append(f"blocks.{layer}.attn.hook_z" if by == "head" else f"blocks.{layer}.hook_attn_out")
        if view.has_mlp:
            names.append(f"blocks.{layer}.mlp.hook_post" if by == "neuron" else f"blocks.{layer}.hook_mlp_out")
    return names + [final]


def check_cache(cache: Any, names: List[str], what: str) -> None:
    """Raise :class:`MissingHooksError` naming every hook ``names`` needs that ``cache`` lacks."""
    missing = [name for name in names if not cache_has(cache, name)]
    if missing:
        shown = missing[:6] + ([f"... {len(missing) - 6} more"] if len(missing) > 6 else [])
        raise MissingHooksError(
            f"{what} needs hooks this cache does not hold: {shown}. Make the cache with "
            "`logits, cache = model.run_with_cache(tokens)` (no names_filter), or with a "
            f"names_filter that keeps these names."
        )


def piece_groups(view: ModelView, cache: Any, by: str, index: torch.Tensor, incl_mid: bool = False) -> List[PieceGroup]:
    """The stack of kind ``by`` as factored groups, at positions ``index [batch, n]``."""
    dtype = torch.float64 if view.W_U.dtype == torch.float64 else torch.float32

    def read(name: str) -> torch.Tensor:
        x = gather_positions(cache_tensor(cache, name), index).to(dtype)
        require_finite(x, f"activation {name!r}")
        return x

    batch, n_pos = index.shape
    if by == "accumulated":
        labels = []
        for layer in range(view.n_layers):
            labels.append(f"{layer}_pre")
            if incl_mid:
                labels.append(f"{layer}_mid")
        labels.append("final_post")
        names = required_hooks(view, by, incl_mid)
        return [PieceGroup(labels, torch.stack([read(n) for n in names], dim=2))]

    groups = [PieceGroup(["embed"], read("hook_embed").unsqueeze(2))]
    if view.has_pos_embed:
        groups.append(PieceGroup(["pos_embed"], read("hook_pos_embed").unsqueeze(2)))
    for layer in range(view.n_layers):
        if by == "head":
            W_O, b_O = view.attn_output_weights(layer)
            z = read(f"blocks.{layer}.attn.hook_z")
            z = z.reshape(batch, n_pos, view.n_heads, -1)
            groups.append(PieceGroup([f"L{layer}H{h}" for h in range(view.n_heads)], z, W_O.to(dtype)))
            if b_O is not None:
                groups.append(_bias_group(f"{layer}_attn_bias", b_O.to(dtype), batch, n_pos))
        else:
            groups.append(PieceGroup([f"{layer}_attn_out"], read(f"blocks.{layer}.hook_attn_out").unsqueeze(2)))
        if not view.has_mlp:
            continue
        if by == "neuron":
            if getattr(view.model.cfg, "num_experts", None):
                raise UnsupportedModelError(
                    "by='neuron' needs one MLP per layer, but this model mixes experts; "
                    "use by='component' or by='head'."
                )
            W_out, b_out = view.mlp_output_weights(layer)
            post = read(f"blocks.{layer}.mlp.hook_post")
            labels = [f"L{layer}N{i}" for i in range(W_out.shape[0])]
            groups.append(PieceGroup(labels, post.unsqueeze(-1), W_out.to(dtype).unsqueeze(1)))
            if b_out is not None:
                groups.append(_bias_group(f"{layer}_mlp_bias", b_out.to(dtype), batch, n_pos))
        else:
            groups.append(PieceGroup([f"{layer}_mlp_out"], read(f"blocks.{layer}.hook_mlp_out").unsqueeze(2)))
    _check_sum(groups, read(view.final_resid_hook), by)
    return groups


def _check_sum(groups: List[PieceGroup], final: torch.Tensor, by: str) -> None:
    """The pieces must add up to the final stream, or the decomposition is not the model's."""
    total = sum(group.total() for group in groups)
    gap = (total - final).abs().max().item()
    size = final.abs().max().item()
    if gap > _SUM_CHECK_RTOL * max(1.0, size):
        raise UnsupportedModelError(
            f"the by={by!r} pieces do not add up to the final residual stream (max gap {gap:.3g} "
            f"against values up to {size:.3g}): this model writes to its stream in a way the "
            "decomposition does not capture (e.g. a scaled embedding), so attributions would be wrong."
        )


@dataclass
class ResidualStack:
    """A stack of residual-stream vectors with labels.

    Attributes:
        values: ``[component, batch, pos, d_model]`` (``pos`` dropped for an int position).
        labels: one TransformerLens-style label per component (``0_pre``, ``embed``,
            ``2_attn_out``, ``L1H3``, ``L0N17``, ``1_mlp_bias``, ...).
        positions: the position index ``[batch, n]`` the values were taken at.

    Example::

        >>> import tl_logitlens as tll
        >>> model = tll.demo_model()
        >>> _, cache = model.run_with_cache(tll.demo.induction_prompt(model))
        >>> stack = tll.residual_stack(cache, by="component", positions=[0, -1])
        >>> stack.labels[:2], tuple(stack.values.shape[1:])
        (['embed', '0_attn_out'], (1, 2, 64))
    """

    values: torch.Tensor
    labels: List[str]
    positions: torch.Tensor


def residual_stack(
    cache: Any,
    by: str = "accumulated",
    *,
    incl_mid: bool = False,
    positions: PositionSpec = None,
) -> ResidualStack:
    """Cut the residual stream held in an ``ActivationCache`` into a labelled stack.

    Args:
        cache: an ``ActivationCache`` from ``model.run_with_cache`` (it records its model).
        by: ``"accumulated"``, ``"component"``, ``"head"`` or ``"neuron"`` (module docstring).
        incl_mid: with ``"accumulated"``, add the stream between attention and MLP.
        positions: ``None`` (all), an int (axis dropped), a list of ints or a slice.

    Returns:
        :class:`ResidualStack` with ``values [component, batch, pos, d_model]``. For every
        ``by`` except ``"accumulated"``, ``values.sum(0)`` is the final residual stream.

    Example::

        >>> import tl_logitlens as tll
        >>> model = tll.demo_model()
        >>> _, cache = model.run_with_cache(tll.demo.induction_prompt(model))
        >>> stack = tll.residual_stack(cache, by="head", positions=-1)
        >>> stack.labels[:3], tuple(stack.values.shape[1:])
        (['embed', 'L0H0', 'L0H1'], (1, 64))
    """
    model = model_from_cache(cache)
    view = view_model(model)
    names = required_hooks(view, by, incl_mid)
    check_cache(cache, names, f"residual_stack(by={by!r})")
    final = cache_tensor(cache, view.final_resid_hook)
    lengths = torch.full((final.shape[0],), final.shape[1])
    index, drop = position_index(positions, lengths, final.shape[1])
    groups = piece_groups(view, cache, by, index, incl_mid)
    values = torch.cat([g.vectors() for g in groups], dim=0)
    labels = [label for g in groups for label in g.labels]
    if drop:
        values = values[:, :, 0]
    return ResidualStack(values=values, labels=labels, positions=index)
