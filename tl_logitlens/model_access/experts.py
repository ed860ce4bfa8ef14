"""Mixture-of-experts layers read expert by expert and neuron by neuron.

A sparse expert block (Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE, DeepSeek V2/V3, GLM-4-MoE, ERNIE 4.5
MoE, MiniMax-M2, GPT-OSS in ``transformers`` 5) writes, for each token ``t``::

    y(t) = sum_e w_e(t) * (a_e(t) @ D_e + b_e)  +  g(t) * (s(t) @ D_s + b_s)

``w_e(t)``: the router's weight for expert ``e`` (zero for experts it did not pick); ``a_e(t)
[d_expert]``: expert ``e``'s neuron activations, the input of its down projection ``D_e [d_expert,
d_model]`` (bias ``b_e`` where the family has one); ``s(t)``, ``D_s``, ``b_s``: the same for the shared
expert of Qwen2-MoE and DeepSeek, scaled by ``g(t)`` (Qwen2-MoE's sigmoid gate; 1 without one). Every
term is linear in its activations, so ``w_e(t) * a_e(t)[n] * D_e[n]`` is one exact piece per (expert,
neuron).

Nothing here re-implements a family's routing or its experts. :func:`read_experts` runs the model's
own expert block on the block's input at the positions asked for (its routing decisions are the
model's) with forward hooks on the experts module (the router's indices and weights, and the routed
output) and on the shared expert (its down projection's input and its output). The activations
``a_e`` come from the experts module itself, called through ``torch.func.functional_call`` with its
down projection swapped for a selector of ``d_model`` neurons at a time, so the module's own gate, up
projection and activation function compute them; the model's parameters are never modified. The
(expert, neuron) terms are then checked to add up to what the block wrote, within its dtype's
rounding.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from ..errors import UnsupportedModelError


@dataclass
class ExpertLayer:
    """One sparse expert block of a bridge's model.

    Attributes:
        block: the Hugging Face expert block (the module the bridge's ``blocks.{l}.mlp`` wraps).
        experts: its experts module, called ``experts(hidden [T, d_model], index [T, k], weights [T, k])``,
            holding every expert's down projection in one 3-D ``down_proj``.
        shared: the shared expert (an MLP whose ``down_proj`` is a linear layer), or ``None``.
        n_experts, d_expert: the experts and the neurons of each.
        transposed: ``down_proj`` is stored ``[expert, d_expert, d_model]`` (else ``[expert, d_model, d_expert]``).
    """

    block: torch.nn.Module
    experts: torch.nn.Module
    shared: Optional[torch.nn.Module]
    n_experts: int
    d_expert: int
    transposed: bool

    def down_weights(self) -> torch.Tensor:
        """Each expert's down projection ``[expert, d_expert, d_model]`` (row ``n``: what neuron ``n`` writes)."""
        down = self.experts.down_proj.detach()
        return down if self.transposed else down.transpose(1, 2)

    def down_bias(self) -> Optional[torch.Tensor]:
        """Each expert's down-projection bias ``[expert, d_model]``, or ``None``."""
        bias = getattr(self.experts, "down_proj_bias", None)
        return bias.detach() if isinstance(bias, torch.Tensor) and getattr(self.experts, "has_bias", True) else None

    def shared_weights(self) -> Optional[torch.Tensor]:
        """The shared expert's down projection ``[d_shared, d_model]``, or ``None``."""
        return None if self.shared is None else _linear_weight(self.shared.down_proj).T

    def shared_bias(self) -> Optional[torch.Tensor]:
        """The shared expert's down-projection bias ``[d_model]``, or ``None``."""
        if self.shared is None:
            return None
        bias = getattr(_inner(self.shared.down_proj), "bias", None)
        return None if bias is None else bias.detach()


def _inner(module: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face module inside a bridge component (or the module itself)."""
    while isinstance(getattr(module, "original_component", None), torch.nn.Module):
        module = module.original_component
    return module


def _linear_weight(module: torch.nn.Module) -> torch.Tensor:
    """A linear layer's ``[out, in]`` weight (a bridge's ``LinearBridge`` or the ``nn.Linear`` it wraps)."""
    return _inner(module).weight.detach()


def find_expert_layer(mlp: Any, d_model: int, layer: int) -> Optional[ExpertLayer]:
    """The :class:`ExpertLayer` behind a bridge's ``blocks.{layer}.mlp``, ``None`` for a dense MLP.

    Raises :class:`UnsupportedModelError` for an expert block of a shape this module cannot read
    per neuron (experts that are not called with the router's indices and weights, or whose down
    projections are not one 3-D parameter), naming the module.
    """
    block = _inner(mlp)
    experts = getattr(block, "experts", None)
    if type(mlp).__name__ != "MoEBridge" and experts is None:
        return None  # a dense MLP
    if getattr(mlp, "bound_dense", False):
        return None  # a dense layer of a model that interleaves dense and expert layers
    if experts is None:
        raise _unreadable(layer, block, "its experts are not one `experts` module")
    experts = _inner(experts)
    down = getattr(experts, "down_proj", None)
    if not isinstance(down, torch.Tensor) or down.ndim != 3:
        raise _unreadable(layer, block, f"{type(experts).__name__} keeps no 3-D down_proj of every expert")
    if len(inspect.signature(experts.forward).parameters) < 3:
        raise _unreadable(
            layer, block, f"{type(experts).__name__} is not called with the router's expert indices and weights"
        )
    if getattr(experts, "has_post_expert_norm", False):
        raise _unreadable(layer, block, "each expert's output passes through a norm, which is not linear")
    transposed = getattr(experts, "is_transposed", None)
    if transposed is None:
        transposed = down.shape[2] == d_model and down.shape[1] != d_model
    shared = next((getattr(block, n) for n in ("shared_expert", "shared_experts") if hasattr(block, n)), None)
    if shared is not None and getattr(shared, "down_proj", None) is None:
        raise _unreadable(layer, block, f"its shared expert {type(shared).__name__} has no down_proj layer")
    d_expert = down.shape[1] if transposed else down.shape[2]
    return ExpertLayer(block, experts, shared, int(down.shape[0]), int(d_expert), bool(transposed))


def _unreadable(layer: int, block: torch.nn.Module, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"layer {layer}'s expert block ({type(block).__name__}) cannot be split into (expert, neuron) pieces: "
        f"{why}. Use by='component' or by='head' for this model."
    )


@dataclass
class ExpertReading:
    """One expert layer read at ``T`` tokens (model dtype, the experts' device).

    Attributes:
        router_weights: ``[T, expert]`` the router's weight of each expert at each token (0 where not picked).
        acts: ``[T, expert, d_expert]`` every expert's neuron activations (before the router's weight).
        shared_acts: ``[T, d_shared]`` the shared expert's neuron activations, or ``None``.
        shared_gate: ``[T]`` what the block multiplies the shared expert's output by (1 without a gate).
        output: ``[T, d_model]`` what the block wrote.
    """

    router_weights: torch.Tensor
    acts: torch.Tensor
    shared_acts: Optional[torch.Tensor]
    shared_gate: Optional[torch.Tensor]
    output: torch.Tensor


def read_experts(layer: ExpertLayer, x: torch.Tensor) -> ExpertReading:
    """Run ``layer``'s expert block on its input ``x [T, d_model]`` and read it expert by expert (module docstring).

    Example::

        >>> import torch
        >>> class Experts(torch.nn.Module):                   # the transformers-5 shape, two experts
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.gate_up_proj = torch.nn.Parameter(torch.randn(2, 6, 4))
        ...         self.down_proj = torch.nn.Parameter(torch.randn(2, 4, 3))
        ...     def forward(self, hidden, index, weights):
        ...         out = torch.zeros_like(hidden)
        ...         for k in range(index.shape[1]):
        ...             for t in range(hidden.shape[0]):
        ...                 e = int(index[t, k])
        ...                 gate, up = (self.gate_up_proj[e] @ hidden[t]).chunk(2)
        ...                 out[t] += weights[t, k] * (self.down_proj[e] @ (torch.relu(gate) * up))
        ...         return out
        >>> class Block(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.experts = Experts()
        ...     def forward(self, h):
        ...         flat = h.reshape(-1, 4)
        ...         index = torch.zeros(flat.shape[0], 1, dtype=torch.long)
        ...         return self.experts(flat, index, torch.full((flat.shape[0], 1), 0.5)).reshape(h.shape)
        >>> layer = find_expert_layer(Block(), d_model=4, layer=0)
        >>> x = torch.randn(5, 4)
        >>> r = read_experts(layer, x)
        >>> pieces = torch.einsum("te,tei,eid->td", r.router_weights, r.acts, layer.down_weights())
        >>> bool(torch.allclose(pieces, r.output, atol=1e-5))
        True
    """
    seen: Dict[str, Any] = {}
    handles = [
        layer.experts.register_forward_pre_hook(
            lambda m, args, kwargs: seen.__setitem__("routing", _call_args(m, args, kwargs)), with_kwargs=True
        ),
        layer.experts.register_forward_hook(lambda m, args, out: seen.__setitem__("routed", _first(out))),
    ]
    if layer.shared is not None:
        handles += [
            layer.shared.down_proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("shared_in", args[0])),
            layer.shared.register_forward_hook(lambda m, args, out: seen.__setitem__("shared_out", _first(out))),
        ]
    try:
        with torch.no_grad():
            output = _first(layer.block(x.unsqueeze(0))).reshape(-1, x.shape[-1])
    finally:
        for handle in handles:
            handle.remove()
    hidden, index, weights = seen["routing"]
    router = _dense_weights(index, weights, layer.n_experts, hidden.shape[0])
    acts = _expert_acts(layer, hidden, weights.dtype)
    shared_acts = shared_gate = None
    if layer.shared is not None:
        shared_acts = seen["shared_in"].reshape(hidden.shape[0], -1)
        shared_gate = _shared_gate(output, seen["routed"], seen["shared_out"].reshape(output.shape))
    reading = ExpertReading(router, acts, shared_acts, shared_gate, output)
    _check_reading(layer, reading)
    return reading


def _check_reading(layer: ExpertLayer, reading: ExpertReading) -> None:
    """The (expert, neuron) terms must add up to what the block wrote, within its dtype's rounding.

    In float64: ``sum_e w_e (a_e @ D_e + b_e) + g (s @ D_s + b_s)`` against the block's output; the
    bound is ``4 * eps * (sum of the terms' magnitudes + |output|) + 1e-5 * max(1, max|output|)``
    (``eps`` of the model's dtype). A larger gap means the block adds something its experts do not
    account for (a scale after the experts, a norm, a term of its own).
    """
    w = reading.router_weights.double().unsqueeze(-1)  # [T, E, 1]
    terms = w * reading.acts.double()  # [T, E, d_expert]
    down = layer.down_weights().double()  # [E, d_expert, d_model]
    total = torch.einsum("tei,eid->td", terms, down)
    size = torch.einsum("tei,eid->td", terms.abs(), down.abs())
    bias = layer.down_bias()
    if bias is not None:
        total = total + torch.einsum("te,ed->td", w[..., 0], bias.double())
        size = size + torch.einsum("te,ed->td", w[..., 0].abs(), bias.double().abs())
    if reading.shared_acts is not None:
        gated = reading.shared_gate.double().unsqueeze(-1) * reading.shared_acts.double()
        shared = layer.shared_weights().double()
        total, size = total + gated @ shared, size + gated.abs() @ shared.abs()
        shared_bias = layer.shared_bias()
        if shared_bias is not None:
            total = total + reading.shared_gate.double().unsqueeze(-1) * shared_bias.double()
    output = reading.output.double()
    eps = torch.finfo(reading.output.dtype).eps
    bound = 4 * eps * (size + output.abs()) + 1e-5 * max(1.0, output.abs().max().item())
    gap = (total - output).abs()
    if not bool((gap <= bound).all()):
        raise UnsupportedModelError(
            f"{type(layer.block).__name__}'s experts do not add up to what the block wrote (a gap of "
            f"{gap.max().item():.3g} where {reading.output.dtype} rounding explains "
            f"{bound.reshape(-1)[int((gap / bound).argmax())].item():.3g}): the block adds something its routed "
            "and shared experts do not account for (a scale or a norm after them), so (expert, neuron) pieces "
            "would be wrong. Use by='component' or by='head' for this model."
        )


def _call_args(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
    """``(hidden, index, weights)``: the experts module's first three arguments, however they were passed."""
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    return tuple(bound.arguments.values())[:3]


def _first(out: Any) -> torch.Tensor:
    """A module's output tensor (some expert blocks also return the router's scores)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _dense_weights(index: torch.Tensor, weights: torch.Tensor, n_experts: int, n_tokens: int) -> torch.Tensor:
    """``[T, expert]`` router weights from the top-k ``index``/``weights [T, k]`` the experts module was called with."""
    if weights.shape == index.shape:
        dense = torch.zeros(n_tokens, n_experts + 1, dtype=torch.float64, device=weights.device)
        dense.scatter_add_(1, index.long().clamp(0, n_experts), weights.double())
        return dense[:, :n_experts].to(
            weights.dtype
        )  # an index of n_experts is a "no expert" slot; one pick each: exact
    if weights.shape[-1] == n_experts:  # already one weight per expert
        return weights.reshape(n_tokens, n_experts)
    raise UnsupportedModelError(
        f"the experts module was called with router weights {tuple(weights.shape)} and indices "
        f"{tuple(index.shape)}, neither one weight per pick nor one per expert; cannot tell each expert's weight."
    )


def _expert_acts(layer: ExpertLayer, hidden: torch.Tensor, weight_dtype: torch.dtype) -> torch.Tensor:
    """``[T, expert, d_expert]``: every expert's neuron activations at every token, from the experts module itself.

    Each token is sent to every expert with weight 1, and the down projection is replaced by a
    selector that copies ``d_model`` of the ``d_expert`` activations into the output, so one
    call per ``d_model`` neurons returns the activations exactly (a product with 0/1 entries).
    """
    n_tokens, d_model = hidden.shape
    E, d_expert = layer.n_experts, layer.d_expert
    down = layer.experts.down_proj
    every = hidden.repeat(E, 1)  # [E * T, d_model]: token t for expert e at row e * T + t
    index = torch.arange(E, device=hidden.device).repeat_interleave(n_tokens).unsqueeze(1)
    ones = torch.ones(E * n_tokens, 1, dtype=weight_dtype, device=hidden.device)
    chunks = []
    for start in range(0, d_expert, d_model):
        width = min(d_model, d_expert - start)
        select = torch.zeros(d_expert, d_model, dtype=down.dtype, device=down.device)
        select[start + torch.arange(width), torch.arange(width)] = 1
        swap = {"down_proj": (select if layer.transposed else select.T).expand(E, -1, -1).contiguous()}
        if layer.down_bias() is not None:
            swap["down_proj_bias"] = torch.zeros_like(layer.experts.down_proj_bias)
        with torch.no_grad():
            out = torch.func.functional_call(layer.experts, swap, (every, index, ones), strict=False)
        chunks.append(_first(out).reshape(E, n_tokens, d_model)[..., :width])
    return torch.cat(chunks, -1).transpose(0, 1)  # [T, E, d_expert]


def _shared_gate(output: torch.Tensor, routed: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """``[T]``: the factor ``g`` with ``output = routed + g * shared`` (least squares per token, in float64).

    Qwen2-MoE multiplies its shared expert by a sigmoid gate, DeepSeek adds it as it is;
    reading ``g`` off the block's own output needs neither rule. Whatever ``g * shared`` misses
    of ``output - routed`` shows up in the caller's check that the pieces add up.
    """
    rest = (output.double() - routed.reshape(output.shape).double()).reshape(output.shape[0], -1)
    s = shared.double().reshape(output.shape[0], -1)
    norm = (s * s).sum(-1)
    return torch.where(norm > 0, (rest * s).sum(-1) / norm.clamp_min(1e-300), torch.zeros_like(norm))
