"""Residual stacks: the stream at every layer, and the pieces that wrote it.

A stack is ``[component, batch, pos, d_model]`` with one label per component. Four ways
to cut the stream (``by``):

- ``"accumulated"``: the stream itself before each layer, ``0_pre .. final_post``
  (with ``L_mid`` entries between attention and MLP when ``incl_mid=True``).
- ``"component"``: ``embed``, ``pos_embed`` (learned positions only), ``image_embed``
  (vision-language models: the image features at image positions), and every
  ``L_attn_out`` and ``L_mlp_out``. They add up to the final stream.
- ``"head"``: every head's write ``LxHy = z[..., y, :] @ W_O[y]`` from ``attn.hook_z``
  (never ``hook_result``, which is off by default and costs memory), each layer's
  attention bias ``L_attn_bias``, and the non-attention components.
- ``"neuron"``: every neuron's write ``LxNy = post[..., y] * W_out[y]`` from
  ``mlp.hook_post``, each ``L_mlp_bias``, and the non-MLP components.

Half precision. A bfloat16 or float16 model rounds its stream after every addition (and
each layer's output after its matrix product), so the pieces, read in float32 from the
cache, do not add up exactly to the final stream the model stored. The difference is then
its own labelled piece, ``rounding = final_stored - sum(pieces)`` (last), so the pieces
still add up to the stored stream; float32 and float64 models get no such piece. The gap
must stay within what the dtype's rounding can explain, element by element::

    |gap| <= eps * (sum_k |S_k| + 4 * sum_g |acts_g| @ |W_g|) + 1e-4 * max(1, max|final|)

with ``eps = torch.finfo(dtype).eps`` (twice the unit roundoff), ``S_k`` the stream after
each addition (the running sum of the pieces: each addition rounds once) and
``|acts_g| @ |W_g|`` the magnitude of each factored group's product (heads, neurons),
which the model computes and rounds in half precision; the factors leave room for a
half-precision accumulation. A larger gap means the decomposition misses a write (e.g. a
scaled embedding), and the stack is refused.

Each cut is a list of :class:`PieceGroup` factored as activations times weights, so the
same pieces can either be materialised (:func:`residual_stack`) or contracted with a
direction without ever building ``[component, batch, pos, d_model]``
(:func:`tl_logitlens.attribution.direct_logit_attribution`).
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Any, List, Optional, Tuple

import torch

from .errors import LensInputError, UnsupportedModelError
from .inputs import PositionSpec, check_cache, gather_positions, position_index
from .kernel import compute_dtype, is_half, require_finite
from .model_access import ModelView, cache_tensor, compute_device, model_from_cache
from .model_access import view as view_model

STACK_KINDS = ("accumulated", "component", "head", "neuron")

# The decomposed pieces must add up to the final stream; gaps above this fraction of the
# stream's own size mean the model writes to it in a way the decomposition misses.
_SUM_CHECK_RTOL = 1e-4


def stack_labels(n_layers: int, incl_mid: bool) -> List[str]:
    """``0_pre, [0_mid,] 1_pre, ..., final_post``."""
    labels = []
    for layer in range(n_layers):
        labels.append(f"{layer}_pre")
        if incl_mid:
            labels.append(f"{layer}_mid")
    return labels + ["final_post"]


def resolve_layers(layers: Any, labels: List[str]) -> List[int]:
    """Stack entries by index (negative allowed) or label; ``None`` keeps all."""
    if layers is None:
        return list(range(len(labels)))
    if type(layers).__module__ == "numpy" or (isinstance(layers, torch.Tensor) and not layers.dtype.is_floating_point):
        layers = layers.tolist()
    if isinstance(layers, (Integral, str)):
        layers = [layers]
    if not isinstance(layers, (list, tuple, range)):
        raise LensInputError(
            "layers must be a stack entry (an int or a label) or a list of them, "
            f"got {type(layers).__name__} {layers!r}"
        )
    picked = []
    for item in layers:
        if isinstance(item, str):
            if item not in labels:
                raise LensInputError(f"layer {item!r} is not a stack entry; entries are {labels}")
            picked.append(labels.index(item))
        elif isinstance(item, Integral) and not isinstance(item, bool):
            item = int(item)
            index = item + len(labels) if item < 0 else item
            if not 0 <= index < len(labels):
                raise LensInputError(
                    f"layer {item} is out of range: the stack has {len(labels)} entries "
                    f"(0..{len(labels) - 1} or -{len(labels)}..-1): {labels}"
                )
            picked.append(index)
        else:
            raise LensInputError(f"layers must be ints or labels, got {item!r}")
    if not picked:
        raise LensInputError("layers is empty; pass None for every stack entry")
    return picked


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

    def product_size(self) -> Optional[torch.Tensor]:
        """``|acts| @ |weight|`` ``[batch, pos, d_model]``: what bounds the product's rounding (``None`` unfactored)."""
        if self.weight is None:
            return None
        return torch.einsum("bpnk,nkd->bpd", self.acts.abs(), self.weight.abs())

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
    names = [view.embed_hook] + ([view.pos_embed_hook] if view.has_pos_embed else [])
    if view.takes_images:  # the stream entering block 0 holds the image features (_embedding_groups)
        names.append(view.resid_hook(0, "pre"))
    for layer in range(view.n_layers):
        names.append(view.attn_z_hook(layer) if by == "head" else view.attn_out_hook(layer))
        if view.has_mlp:
            names.append(view.mlp_post_hook(layer) if by == "neuron" else view.mlp_out_hook(layer))
    return names + [final]


def piece_groups(view: ModelView, cache: Any, by: str, index: torch.Tensor, incl_mid: bool = False) -> List[PieceGroup]:
    """The stack of kind ``by`` as factored groups, at positions ``index [batch, n]``.

    Every activation is read at the positions on its own device (a split model keeps its
    layers' caches apart) and only that slice moves to the compute device, the
    unembedding's, in float32 (float64 for a float64 model). For a half-precision model a
    ``rounding`` group comes last (see the module docstring).
    """
    dtype = compute_dtype(view.W_U.dtype)
    device = compute_device(view)

    def read(name: str) -> torch.Tensor:
        x = gather_positions(cache_tensor(cache, name), index)
        require_finite(x, f"activation {name!r}")
        return x.to(device=device, dtype=dtype)

    def weight(w: torch.Tensor) -> torch.Tensor:
        return w.to(device=device, dtype=dtype)

    batch, n_pos = index.shape
    if by == "accumulated":
        names = required_hooks(view, by, incl_mid)
        return [PieceGroup(stack_labels(view.n_layers, incl_mid), torch.stack([read(n) for n in names], dim=2))]

    groups = _embedding_groups(view, cache, index, read)
    for layer in range(view.n_layers):
        if by == "head":
            W_O, b_O = view.attn_output_weights(layer)
            z = read(view.attn_z_hook(layer))
            z = z.reshape(batch, n_pos, view.n_heads, -1)
            groups.append(PieceGroup([f"L{layer}H{h}" for h in range(view.n_heads)], z, weight(W_O)))
            if b_O is not None:
                groups.append(_bias_group(f"{layer}_attn_bias", weight(b_O), batch, n_pos))
        else:
            groups.append(PieceGroup([f"{layer}_attn_out"], read(view.attn_out_hook(layer)).unsqueeze(2)))
        if not view.has_mlp:
            continue
        if by == "neuron":
            if view.has_experts:
                raise UnsupportedModelError(
                    "by='neuron' needs one MLP per layer, but this model mixes experts; "
                    "use by='component' or by='head'."
                )
            W_out, b_out = view.mlp_output_weights(layer)
            post = read(view.mlp_post_hook(layer))
            labels = [f"L{layer}N{i}" for i in range(W_out.shape[0])]
            groups.append(PieceGroup(labels, post.unsqueeze(-1), weight(W_out).unsqueeze(1)))
            if b_out is not None:
                groups.append(_bias_group(f"{layer}_mlp_bias", weight(b_out), batch, n_pos))
        else:
            groups.append(PieceGroup([f"{layer}_mlp_out"], read(view.mlp_out_hook(layer)).unsqueeze(2)))
    stored = cache_tensor(cache, view.final_resid_hook)
    rounding = _check_sum(groups, read(view.final_resid_hook), by, stored.dtype)
    return groups + ([rounding] if rounding is not None else [])


def _embedding_groups(view: ModelView, cache: Any, index: torch.Tensor, read: Any) -> List[PieceGroup]:
    """``embed`` and ``pos_embed`` (learned positions only); for a vision-language model also ``image_embed``.

    A LLaVA-style model writes its projected image features into the stream at the image
    tokens' positions *in place of* their token embeddings. So there ``embed`` is zero and
    ``image_embed`` is the stream entering block 0 (less any position embedding), and at every
    other position ``image_embed`` is zero. The image positions are where that stream differs
    from the token (plus position) embedding, compared in the dtype the model stored: at a text
    position the model passed the embedding on unchanged, so the two are identical.
    """
    embed = read(view.embed_hook)
    pos = read(view.pos_embed_hook) if view.has_pos_embed else None
    if not view.takes_images:
        return [PieceGroup(["embed"], embed.unsqueeze(2))] + (
            [] if pos is None else [PieceGroup(["pos_embed"], pos.unsqueeze(2))]
        )
    stored = gather_positions(cache_tensor(cache, view.resid_hook(0, "pre")), index)
    written = gather_positions(cache_tensor(cache, view.embed_hook), index).to(stored.device)
    if pos is not None:
        written = written + gather_positions(cache_tensor(cache, view.pos_embed_hook), index).to(stored.device)
    image = (stored != written).any(-1, keepdim=True).to(embed.device)  # [batch, n, 1]
    stream = read(view.resid_hook(0, "pre"))
    image_embed = (stream if pos is None else stream - pos).masked_fill(~image, 0)
    groups = [PieceGroup(["embed"], embed.masked_fill(image, 0).unsqueeze(2))]
    groups += [] if pos is None else [PieceGroup(["pos_embed"], pos.unsqueeze(2))]
    return groups + [PieceGroup(["image_embed"], image_embed.unsqueeze(2))]


def rounding_bound(groups: List[PieceGroup], final: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Elementwise bound ``[batch, pos, d_model]`` on ``|final - sum(pieces)|`` for a model stored in ``dtype``.

    The formula is in the module docstring: each addition into the stream rounds once,
    each factored product (heads, neurons) rounds its output and its accumulation.
    """
    eps = torch.finfo(dtype).eps
    running = torch.zeros_like(final)
    streams = torch.zeros_like(final)
    products = torch.zeros_like(final)
    for group in groups:
        running = running + group.total()
        streams += running.abs()
        size = group.product_size()
        if size is not None:
            products += size
    floor = _SUM_CHECK_RTOL * max(1.0, final.abs().max().item())
    return eps * (streams + 4 * products) + floor


def _check_sum(
    groups: List[PieceGroup], final: torch.Tensor, by: str, stored_dtype: torch.dtype
) -> Optional[PieceGroup]:
    """The pieces must add up to the final stream, or the decomposition is not the model's.

    Returns the ``rounding`` group for a half-precision model (``None`` otherwise).
    """
    total = sum(group.total() for group in groups)
    gap = final - total
    size = final.abs().max().item()
    if not is_half(stored_dtype):
        worst = gap.abs().max().item()
        if worst > _SUM_CHECK_RTOL * max(1.0, size):
            raise UnsupportedModelError(
                f"the by={by!r} pieces do not add up to the final residual stream (max gap {worst:.3g} "
                f"against values up to {size:.3g}): this model writes to its stream in a way the "
                "decomposition does not capture (e.g. a scaled embedding), so attributions would be wrong."
            )
        return None
    bound = rounding_bound(groups, final, stored_dtype)
    ratio = gap.abs() / bound
    if not bool((ratio <= 1).all()):
        at = int(ratio.reshape(-1).nan_to_num(float("inf")).argmax())
        raise UnsupportedModelError(
            f"the by={by!r} pieces do not add up to the final residual stream: a gap of "
            f"{gap.abs().reshape(-1)[at].item():.3g} where {stored_dtype} rounding explains at most "
            f"{bound.reshape(-1)[at].item():.3g} (stream values up to {size:.3g}, largest gap "
            f"{gap.abs().max().item():.3g}). The model's precision is not the cause: it writes to its "
            "stream in a way the decomposition does not capture (e.g. a scaled embedding), so "
            "attributions would be wrong."
        )
    return PieceGroup(["rounding"], gap.unsqueeze(2))


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
        :class:`ResidualStack` with ``values [component, batch, pos, d_model]`` on the CPU,
        in float32 (float64 for a float64 model). For every ``by`` except
        ``"accumulated"``, ``values.sum(0)`` is the final residual stream; for a bfloat16 or
        float16 model the last component, ``rounding``, is what the model's roundings
        added (module docstring).

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
    values = torch.cat([g.vectors() for g in groups], dim=0).cpu()
    labels = [label for g in groups for label in g.labels]
    if drop:
        values = values[:, :, 0]
    return ResidualStack(values=values, labels=labels, positions=index)


# -- head-by-source pieces ------------------------------------------------------------------
def source_hooks(view: ModelView) -> List[str]:
    """The hooks the head-by-source split reads on top of the ``by="head"`` stack: each layer's
    attention pattern and values."""
    names: List[str] = []
    for layer in range(view.n_layers):
        names += [view.attn_pattern_hook(layer), view.attn_v_hook(layer)]
    return names


def head_source_values(
    view: ModelView,
    cache: Any,
    index: torch.Tensor,
    direction: torch.Tensor,
    scale: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each head's write at the positions ``index [batch, n]`` split over its source positions, along one direction.

    A head writes ``z[dest] @ W_O[h]`` with ``z[dest] = sum_src pattern[dest, src] * v[src]``,
    so its piece from source ``src`` is ``pattern[dest, src] * (v[src] @ W_O[h])``, read
    here as ``pattern[dest, src] * (v[src] . (W_O[h] @ direction)) / scale``: the direction
    ``[batch, d_model]`` is pulled into each head's value space once per prompt and the
    ``[head, src, d_model]`` vectors are never built; only ``[head, src]`` numbers are kept,
    one layer at a time. ``v`` comes from ``attn.hook_v``, which holds ``b_V``: since a
    pattern row sums to 1 the value bias is shared among the sources by their attention
    weights (no separate term). Grouped-query attention: head ``h`` reads key-value head
    ``h // (n_heads / n_kv_heads)``. ``scale [batch, n]``: the final norm's scale at each
    destination (ones for ``norm="none"``).

    Returns ``(pieces [layer, head, src, batch, n], size [layer, head, batch, n])`` in the
    compute dtype on the compute device (``src`` runs over every input position; a source
    after the destination has weight 0). ``size = sum_src |pattern| * (|v| @ |W_O[h] @
    direction|) / scale`` bounds how far the model's own rounding of ``z`` can move the
    head's value away from the sum of its pieces.
    """
    dtype = direction.dtype
    device = direction.device
    batch, n_pos = index.shape
    out, sizes = [], []
    for layer in range(view.n_layers):
        pattern = cache_tensor(cache, view.attn_pattern_hook(layer))  # [batch, head, dest, src]
        at = index.to(pattern.device).view(batch, 1, n_pos, 1).expand(batch, pattern.shape[1], n_pos, pattern.shape[3])
        pattern = pattern.gather(2, at).to(device=device, dtype=dtype)  # [batch, head, n, src]
        require_finite(pattern, f"activation {view.attn_pattern_hook(layer)!r}")
        v = cache_tensor(cache, view.attn_v_hook(layer)).to(device=device, dtype=dtype)
        if v.ndim == 3:  # some models keep the heads flat: [batch, src, n_kv * d_head]
            v = v.reshape(v.shape[0], v.shape[1], -1, view.d_head)
        require_finite(v, f"activation {view.attn_v_hook(layer)!r}")
        n_kv = v.shape[2]
        if view.n_heads % n_kv:
            raise UnsupportedModelError(
                f"layer {layer} has {view.n_heads} query heads but {n_kv} value heads, which does not divide: "
                "the head-by-source split cannot tell which values each head reads; use by_source=False."
            )
        W_O, _ = view.attn_output_weights(layer)
        pulled = torch.einsum("hkd,bd->bhk", W_O.to(device=device, dtype=dtype), direction)  # [batch, head, d_head]
        pulled = pulled.view(batch, n_kv, view.n_heads // n_kv, -1)
        along = torch.einsum("bsgk,bgrk->bgrs", v, pulled).reshape(batch, view.n_heads, -1)  # [batch, head, src]
        pieces = pattern * along.unsqueeze(2) / scale.view(batch, 1, n_pos, 1)
        out.append(pieces.permute(1, 3, 0, 2))  # [head, src, batch, n]
        magnitude = torch.einsum("bsgk,bgrk->bgrs", v.abs(), pulled.abs()).reshape(batch, view.n_heads, -1)
        size = torch.einsum("bhns,bhs->hbn", pattern.abs(), magnitude) / scale.abs().unsqueeze(0)
        sizes.append(size)
    return torch.stack(out), torch.stack(sizes)
