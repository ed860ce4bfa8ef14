"""Residual stacks: the stream at every layer, and the pieces that wrote it.

A stack is ``[component, batch, pos, d_model]`` with one label per component. Four ways
to cut the stream (``by``):

- ``"accumulated"``: the stream itself before each layer, ``0_pre .. final_post``
  (with ``L_mid`` entries between attention and MLP when ``incl_mid=True``).
- ``"component"``: ``embed``, ``pos_embed`` (absolute positions only; read as
  ``0_pre - embed`` where no hook holds them, as in XGLM), ``image_embed``
  (vision-language models: the image features at image positions), and every ``L_attn_out`` and
  ``L_mlp_out``. They add up to the final stream.
- ``"head"``: every head's write ``LxHy = z[..., y, :] @ W_O[y]`` from ``attn.hook_z``
  (never ``hook_result``, which is off by default and costs memory), each layer's
  attention bias ``L_attn_bias``, and the non-attention components.
- ``"neuron"``: every neuron's write ``LxNy = post[..., y] * W_out[y]`` from
  ``mlp.hook_post``, each ``L_mlp_bias``, and the non-MLP components. An expert layer
  gives ``LxEeNy`` (routed expert ``e``'s neuron ``y``, times the router's weight),
  ``LxSNy`` (the shared expert's neuron ``y``, times its gate) and ``L_Ee_bias`` /
  ``L_shared_bias`` (:mod:`tl_logitlens.model_access.experts`).

Families. A block output that reaches the stream through a post-norm (Gemma 2/3/4, OLMo 2)
or a multiplier (Granite) is read as the model wrote it
(:class:`~tl_logitlens.model_access.SublayerWrite`): the multiplier and the norm's gain
(and centring) are folded into the output weights, and the post-norm's scale at each
position, taken from the forward pass, divides the activations. At that fixed scale the norm
is linear, so the pieces add up exactly to the block's write; each piece is read as the model
scaled it in this forward pass. A post-norm's own bias is the piece ``L_attn_norm_bias`` /
``L_mlp_norm_bias``.

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
half-precision accumulation. A larger gap means the decomposition misses a write, and the
stack is refused, naming what was read and any block part that was not (Gemma 4's per-layer
inputs, say).

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
from .model_access import (
    ExpertLayer,
    ModelView,
    SublayerWrite,
    cache_tensor,
    compute_device,
    model_from_cache,
    read_experts,
)
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


def entry_hooks(view: ModelView, layers: Any) -> List[Tuple[str, str]]:
    """Stack entries to patch or read in a forward pass, with the hook holding each: ``[(label, hook)]``.

    Integers index the entries ``0_pre .. final_post`` (negative from the end); labels may
    also name the ``L_mid`` entries (the stream between attention and MLP). ``None``: every
    entry ``0_pre .. final_post``.

    Example::

        >>> from tl_logitlens.demo import demo_model
        >>> from tl_logitlens.model_access import view
        >>> for label, hook in entry_hooks(view(demo_model()), [0, "1_mid", -1]):
        ...     print(label, hook)
        0_pre blocks.0.hook_resid_pre
        1_mid blocks.1.hook_resid_mid
        final_post blocks.1.hook_resid_post
    """
    plain = stack_labels(view.n_layers, False)
    everything = stack_labels(view.n_layers, True)
    if layers is None:
        picked = plain
    else:
        if type(layers).__module__ == "numpy" or isinstance(layers, torch.Tensor):
            layers = layers.tolist()
        items = list(layers) if isinstance(layers, (list, tuple, range)) else [layers]
        if not items:
            resolve_layers(items, plain)  # refuses an empty list with its own message
        picked = [
            everything[resolve_layers([item], everything)[0]]
            if isinstance(item, str)
            else plain[resolve_layers([item], plain)[0]]
            for item in items
        ]
    incl_mid = any(label.endswith("_mid") for label in picked)
    labels = stack_labels(view.n_layers, incl_mid)
    hooks = required_hooks(view, "accumulated", incl_mid)  # refuses mids of parallel or attention-only models
    return [(label, hooks[labels.index(label)]) for label in picked]


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
    names = [view.embed_hook] + _position_hooks(view)
    if view.takes_images:  # the stream entering block 0 holds the image features (_image_groups)
        names.append(view.resid_hook(0, "pre"))
    for layer in range(view.n_layers):
        if by == "head":
            names += [view.attn_z_hook(layer)] + view.write(layer, "attn").hooks
        else:
            names.append(view.attn_out_hook(layer))
        if not view.has_mlp:
            continue
        if by == "neuron":
            experts = view.expert_layer(layer)
            names += [view.mlp_in_hook(layer) if experts else view.mlp_post_hook(layer)] + view.write(
                layer, "mlp"
            ).hooks
        else:
            names.append(view.mlp_out_hook(layer))
    return names + [final]


def _position_hooks(view: ModelView) -> List[str]:
    """The position embedding's hook; or, where positions are added without one, the first stream (read as
    ``0_pre - embed``); nothing for models without absolute positions."""
    if not view.has_pos_embed:
        return []
    return [view.pos_embed_hook or view.resid_hook(0, "pre")]


class _Reader:
    """Activations of a cache at the positions ``index [batch, n]``, in the compute dtype on the compute device.

    Every activation is read at the positions on its own device (a split model keeps its layers'
    caches apart) and only that slice moves to the compute device, the unembedding's, in float32
    (float64 for a float64 model).
    """

    def __init__(self, view: ModelView, cache: Any, index: torch.Tensor):
        self.cache, self.index = cache, index
        self.dtype = compute_dtype(view.W_U.dtype)
        self.device = compute_device(view)

    def raw(self, name: str) -> torch.Tensor:
        """``name`` at the positions, in its own dtype and on its own device."""
        x = gather_positions(cache_tensor(self.cache, name), self.index)
        require_finite(x, f"activation {name!r}")
        return x

    def __call__(self, name: str) -> torch.Tensor:
        return self.raw(name).to(device=self.device, dtype=self.dtype)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return w.to(device=self.device, dtype=self.dtype)

    def written(self, write: SublayerWrite, acts: torch.Tensor) -> torch.Tensor:
        """``acts [batch, n, ...]`` divided by the post-norm's scale at each position (as they are without one)."""
        scale = write.scale(self)
        if scale is None:
            return acts
        return acts / scale.reshape(*scale.shape, *([1] * (acts.ndim - 2)))


def piece_groups(view: ModelView, cache: Any, by: str, index: torch.Tensor, incl_mid: bool = False) -> List[PieceGroup]:
    """The stack of kind ``by`` as factored groups, at positions ``index [batch, n]``.

    Activations are read as :class:`_Reader` says. A block output that passes through a
    post-norm or a multiplier before it is added (:class:`~tl_logitlens.model_access.SublayerWrite`)
    has both folded into its pieces: the multiplier and the norm's gain (and centring) into the
    output weights, the norm's scale at each position into the activations. For a
    half-precision model a ``rounding`` group comes last (see the module docstring).
    """
    read = _Reader(view, cache, index)
    if by == "accumulated":
        names = required_hooks(view, by, incl_mid)
        return [PieceGroup(stack_labels(view.n_layers, incl_mid), torch.stack([read(n) for n in names], dim=2))]
    groups = _embedding_groups(view, read)
    for layer in range(view.n_layers):
        groups += _attention_groups(view, read, layer, by)
        if view.has_mlp:
            groups += _mlp_groups(view, read, layer, by)
    stored = cache_tensor(cache, view.final_resid_hook)
    rounding = _check_sum(view, groups, read(view.final_resid_hook), by, stored.dtype)
    return groups + ([rounding] if rounding is not None else [])


def _embedding_groups(view: ModelView, read: _Reader) -> List[PieceGroup]:
    embed = read(view.embed_hook)
    groups = [PieceGroup(["embed"], embed.unsqueeze(2))]
    if view.has_pos_embed:
        if view.pos_embed_hook is not None:
            positions = read(view.pos_embed_hook)
        else:  # added inside the embedding step without a hook of its own (XGLM): what the first stream adds
            positions = read(view.resid_hook(0, "pre")) - embed
        groups.append(PieceGroup(["pos_embed"], positions.unsqueeze(2)))
    if view.takes_images:
        groups = _image_groups(view, read, embed, groups)
    return groups


def _image_groups(view: ModelView, read: _Reader, embed: torch.Tensor, groups: List[PieceGroup]) -> List[PieceGroup]:
    """``groups`` (``embed`` first, then ``pos_embed`` if any) with ``embed`` zero at image positions and an
    ``image_embed`` piece: a vision-language model writes its projected image features into the stream at
    the image tokens' positions *in place of* their embeddings. The image positions are where the stream
    entering block 0 differs from the token (plus position) embedding, compared in the stored dtype: at a
    text position the model passed the embedding on unchanged."""
    stored = read.raw(view.resid_hook(0, "pre"))
    written = read.raw(view.embed_hook).to(stored.device)
    if view.has_pos_embed and view.pos_embed_hook is not None:
        written = written + read.raw(view.pos_embed_hook).to(stored.device)
    image = (stored != written).any(-1, keepdim=True).to(embed.device)  # [batch, n, 1]
    positions = groups[1].acts[:, :, 0] if len(groups) > 1 else 0
    image_embed = (read(view.resid_hook(0, "pre")) - positions).masked_fill(~image, 0)
    groups[0] = PieceGroup(["embed"], embed.masked_fill(image, 0).unsqueeze(2))
    return groups + [PieceGroup(["image_embed"], image_embed.unsqueeze(2))]


def _attention_groups(view: ModelView, read: _Reader, layer: int, by: str) -> List[PieceGroup]:
    """Layer ``layer``'s attention: its write (``by != "head"``), or each head's and the output bias."""
    if by != "head":
        return [PieceGroup([f"{layer}_attn_out"], read(view.attn_out_hook(layer)).unsqueeze(2))]
    write = view.write(layer, "attn")
    W_O, b_O = view.attn_output_weights(layer)
    z = read(view.attn_z_hook(layer))
    z = z.reshape(*z.shape[:2], view.n_heads, -1)
    groups = [
        PieceGroup([f"L{layer}H{h}" for h in range(view.n_heads)], read.written(write, z), write.fold(read.weight(W_O)))
    ]
    return groups + _bias_groups(read, write, f"{layer}_attn", b_O)


def _bias_groups(read: _Reader, write: SublayerWrite, prefix: str, bias: Optional[torch.Tensor]) -> List[PieceGroup]:
    """A sublayer's output bias (``{prefix}_bias``) and its post-norm's bias (``{prefix}_norm_bias``), as written."""
    batch, n_pos = read.index.shape
    groups = []
    if bias is not None:
        ones = torch.ones(batch, n_pos, 1, 1, device=read.device, dtype=read.dtype)
        groups.append(
            PieceGroup([f"{prefix}_bias"], read.written(write, ones), write.fold(read.weight(bias)).view(1, 1, -1))
        )
    norm_bias = write.bias()
    if norm_bias is not None:
        groups.append(_bias_group(f"{prefix}_norm_bias", read.weight(norm_bias), batch, n_pos))
    return groups


def _mlp_groups(view: ModelView, read: _Reader, layer: int, by: str) -> List[PieceGroup]:
    """Layer ``layer``'s MLP: its write (``by != "neuron"``), or each neuron's (each expert's) and the biases."""
    if by != "neuron":
        return [PieceGroup([f"{layer}_mlp_out"], read(view.mlp_out_hook(layer)).unsqueeze(2))]
    write = view.write(layer, "mlp")
    experts = view.expert_layer(layer)
    if experts is not None:
        return _expert_groups(view, read, layer, experts, write)
    W_out, b_out = view.mlp_output_weights(layer)
    post = read.written(write, read(view.mlp_post_hook(layer)))
    labels = [f"L{layer}N{i}" for i in range(W_out.shape[0])]
    groups = [PieceGroup(labels, post.unsqueeze(-1), write.fold(read.weight(W_out)).unsqueeze(1))]
    return groups + _bias_groups(read, write, f"{layer}_mlp", b_out)


def _expert_groups(
    view: ModelView, read: _Reader, layer: int, experts: ExpertLayer, write: SublayerWrite
) -> List[PieceGroup]:
    """An expert layer's pieces: ``L{l}E{e}N{n}`` (routed expert ``e``'s neuron ``n`` times the router's weight),
    ``{l}_E{e}_bias``, ``L{l}SN{n}`` (the shared expert's neuron ``n`` times its gate), ``{l}_shared_bias``.

    The expert block runs again on its own input at the read positions
    (:func:`~tl_logitlens.model_access.read_experts`): the routing is the model's own.
    """
    x = read.raw(view.mlp_in_hook(layer))
    batch, n_pos = read.index.shape
    device = experts.experts.down_proj.device
    reading = read_experts(experts, x.reshape(-1, x.shape[-1]).to(device))
    E, d_expert = experts.n_experts, experts.d_expert
    router = read.weight(reading.router_weights).view(batch, n_pos, E, 1)
    acts = (router * read.weight(reading.acts).view(batch, n_pos, E, d_expert)).view(batch, n_pos, E * d_expert, 1)
    down = write.fold(read.weight(experts.down_weights())).reshape(E * d_expert, 1, -1)
    labels = [f"L{layer}E{e}N{n}" for e in range(E) for n in range(d_expert)]
    groups = [PieceGroup(labels, read.written(write, acts), down)]
    bias = experts.down_bias()
    if bias is not None:
        labels = [f"{layer}_E{e}_bias" for e in range(E)]
        groups.append(PieceGroup(labels, read.written(write, router), write.fold(read.weight(bias)).unsqueeze(1)))
    if reading.shared_acts is not None:
        gate = read.weight(reading.shared_gate).view(batch, n_pos, 1)
        shared = (gate * read.weight(reading.shared_acts).view(batch, n_pos, -1)).unsqueeze(-1)
        weight = write.fold(read.weight(experts.shared_weights())).unsqueeze(1)
        groups.append(
            PieceGroup([f"L{layer}SN{n}" for n in range(weight.shape[0])], read.written(write, shared), weight)
        )
        shared_bias = experts.shared_bias()
        if shared_bias is not None:
            groups.append(
                PieceGroup(
                    [f"{layer}_shared_bias"],
                    read.written(write, gate.unsqueeze(-1)),
                    write.fold(read.weight(shared_bias)).view(1, 1, -1),
                )
            )
    return groups


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
    view: ModelView, groups: List[PieceGroup], final: torch.Tensor, by: str, stored_dtype: torch.dtype
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
                f"against values up to {size:.3g}). {_what_was_read(view, by)}"
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
            f"{gap.abs().max().item():.3g}), so the model's precision is not the cause. {_what_was_read(view, by)}"
        )
    return PieceGroup(["rounding"], gap.unsqueeze(2))


def _what_was_read(view: ModelView, by: str) -> str:
    """What the decomposition assumed of this model, for a refusal: the pieces read, and how blocks write."""
    pieces = {
        "head": "each head and attention output bias, and each block's MLP write",
        "neuron": "each block's attention write, and each MLP neuron (or expert neuron) and output bias",
    }.get(by, "each block's attention and MLP writes")
    writes = sorted(
        {
            f"{kind} outputs through {view.write(layer, kind).describe()}"
            for layer in range(view.n_layers)
            for kind in ("attn", "mlp")
            if (kind == "attn" or view.has_mlp) and not view.write(layer, kind).is_identity
        }
    )
    how = f" ({'; '.join(writes)})" if writes else ""
    name = type(getattr(view.model, "original_model", view.model)).__name__
    extra = sorted({part for layer in range(view.n_layers) for part in view.unread_block_parts(layer)})
    other = (
        f"its blocks also hold {', '.join(extra)}, which change the stream and are not read here"
        if extra
        else "also writes to its stream in some other way (a block output this package does not know of)"
    )
    return (
        f"The pieces read were the embeddings, {pieces}{how}; {name}: "
        f"{other}, so attributions would be wrong. Read the stream with tll.logit_lens instead."
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
    destination (ones for ``norm="none"``). A head output that passes through a post-norm or a
    multiplier on its way to the stream (:meth:`ModelView.write`) has the multiplier and the
    norm's gain folded into ``W_O`` and is divided by the norm's scale at the destination.

    Returns ``(pieces [layer, head, src, batch, n], size [layer, head, batch, n])`` in the
    compute dtype on the compute device (``src`` runs over every input position; a source
    after the destination has weight 0). ``size = sum_src |pattern| * (|v| @ |W_O[h] @
    direction|) / scale`` bounds how far the model's own rounding of ``z`` can move the
    head's value away from the sum of its pieces.
    """
    dtype = direction.dtype
    device = direction.device
    batch, n_pos = index.shape
    read = _Reader(view, cache, index)
    out, sizes = [], []
    for layer in range(view.n_layers):
        pattern = cache_tensor(cache, view.attn_pattern_hook(layer))  # [batch, head, dest, src]
        at = index.to(pattern.device).view(batch, 1, n_pos, 1).expand(batch, pattern.shape[1], n_pos, pattern.shape[3])
        pattern = pattern.gather(2, at).to(device=device, dtype=dtype)  # [batch, head, n, src]
        require_finite(pattern, f"activation {view.attn_pattern_hook(layer)!r}")
        W_O, _ = view.attn_output_weights(layer)
        v = _values(cache_tensor(cache, view.attn_v_hook(layer)), pattern.shape[-1], W_O.shape[1])
        v = v.to(device=device, dtype=dtype)
        require_finite(v, f"activation {view.attn_v_hook(layer)!r}")
        n_kv = v.shape[2]
        if view.n_heads % n_kv:
            raise UnsupportedModelError(
                f"layer {layer} has {view.n_heads} query heads but {n_kv} value heads, which does not divide: "
                "the head-by-source split cannot tell which values each head reads; use by_source=False."
            )
        write = view.write(layer, "attn")  # a post-norm or multiplier on the way to the stream
        W_O = write.fold(W_O.to(device=device, dtype=dtype))
        pulled = torch.einsum("hkd,bd->bhk", W_O, direction)  # [batch, head, d_head]
        pulled = pulled.view(batch, n_kv, view.n_heads // n_kv, -1)
        along = torch.einsum("bsgk,bgrk->bgrs", v, pulled).reshape(batch, view.n_heads, -1)  # [batch, head, src]
        post = write.scale(read)  # the post-norm's scale at each destination, or None
        dest_scale = scale if post is None else scale * post  # [batch, n]
        pieces = pattern * along.unsqueeze(2) / dest_scale.view(batch, 1, n_pos, 1)
        out.append(pieces.permute(1, 3, 0, 2))  # [head, src, batch, n]
        magnitude = torch.einsum("bsgk,bgrk->bgrs", v.abs(), pulled.abs()).reshape(batch, view.n_heads, -1)
        size = torch.einsum("bhns,bhs->hbn", pattern.abs(), magnitude) / dest_scale.abs().unsqueeze(0)
        sizes.append(size)
    return torch.stack(out), torch.stack(sizes)


def _values(v: torch.Tensor, n_src: int, d_value: int) -> torch.Tensor:
    """The values ``[batch, src, n_kv, d_value]`` whatever layout the bridge cached them in: flat heads
    ``[batch, src, n_kv * d_value]``, or head-major ``[batch, n_kv, src, d_value]`` (DeepSeek's latent attention)."""
    if v.ndim == 3:
        return v.reshape(v.shape[0], v.shape[1], -1, d_value)
    if v.shape[1] != n_src and v.shape[2] == n_src:
        return v.transpose(1, 2)
    return v
