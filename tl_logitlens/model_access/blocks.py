"""How each block's attention and MLP outputs reach the residual stream, family by family.

Most families add a sublayer's output to the stream as it is. Two kinds of family change it on the
way, and :class:`SublayerWrite` describes both as ``write = multiplier * post_norm(out)``:

- a constant multiplier: Granite's ``residual_multiplier`` (the bridge's
  ``ScaledResidualBlockBridge.residual_contribution_scale``);
- a post-norm: Gemma 2/3, OLMo 2/3, GLM-4 and EXAONE 4 normalise each output before adding it
  (``ln1_post`` after attention, ``ln2_post`` after the MLP).

A post-norm is not linear in ``out``, but it is linear at a fixed scale: with ``s`` the scale the
forward pass computed at that position (``sqrt(mean(out**2) + eps)`` for an RMSNorm, of the centred
output for a LayerNorm), ``post_norm(out) = centre(out) / s * weight (+ bias)``, and so every piece of
``out`` (a head, a neuron, a bias) maps to ``centre(piece) / s * weight``, and the pieces add up exactly
to what the block wrote. This is the same linearisation as the final norm's ``"cached"`` mode: each
piece is read as the model scaled it in that forward pass, not as it would be scaled alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..kernel import FinalNorm
from .norms import inner_module, read_norm

#: The two sublayers of a block, and the name of each one's post-norm.
POST_NORMS = {"attn": "ln1_post", "mlp": "ln2_post"}

# The parts of a bridge's block that the pieces account for; any other part may write to the stream.
_READ_PARTS = {"ln1", "ln2", "ln1_post", "ln2_post", "attn", "mlp"}


@dataclass(frozen=True)
class SublayerWrite:
    """What happens to a sublayer's output ``out`` before it is added: ``multiplier * post_norm(out)``.

    Attributes:
        multiplier: a constant factor (Granite's ``residual_multiplier``); 1.0 for most families.
        post_norm: the post-norm as a checked :class:`~tl_logitlens.kernel.FinalNorm`, or ``None``.
        scale_hook: the hook holding the post-norm's scale ``[batch, pos, 1]`` (``hook_scale``), or
            ``None``, when the scale is computed from ``input_hook``.
        input_hook: the hook holding the post-norm's input ``[batch, pos, d_model]`` (read when the
            norm has no ``hook_scale``).

    Example::

        >>> import torch
        >>> write = SublayerWrite(multiplier=0.5)
        >>> write.fold(torch.ones(2, 3)).tolist()
        [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
    """

    multiplier: float = 1.0
    post_norm: Optional[FinalNorm] = None
    scale_hook: Optional[str] = None
    input_hook: Optional[str] = None

    @property
    def is_identity(self) -> bool:
        """The output is added as it is."""
        return self.post_norm is None and self.multiplier == 1.0

    @property
    def hooks(self) -> list:
        """The hooks a reading of this write needs on top of the sublayer's own."""
        return [h for h in (self.scale_hook or self.input_hook,) if h is not None and self.post_norm is not None]

    def fold(self, weight: torch.Tensor) -> torch.Tensor:
        """An output weight ``[..., d_model]`` with the multiplier and the post-norm's linear part (centring and
        gain; the ``1 / s`` is applied to the activations) folded in, in the weight's dtype."""
        if self.post_norm is not None:
            weight = self.post_norm.to(weight.dtype, weight.device).linear(weight, torch.ones((), dtype=weight.dtype))
        return weight * self.multiplier if self.multiplier != 1.0 else weight

    def scale(self, read: Any) -> Optional[torch.Tensor]:
        """The post-norm's scale ``[batch, pos]`` from ``read(hook) -> [batch, pos, ...]`` (``None`` without one)."""
        if self.post_norm is None:
            return None
        if self.scale_hook is not None:
            return read(self.scale_hook)[..., 0]
        x = read(self.input_hook)
        return self.post_norm.to(x.dtype, x.device).scale(x)[..., 0]

    def bias(self) -> Optional[torch.Tensor]:
        """The post-norm's own bias times the multiplier ``[d_model]`` (a piece of its own), or ``None``."""
        if self.post_norm is None or self.post_norm.bias is None:
            return None
        return self.post_norm.bias * self.multiplier

    def describe(self) -> str:
        """The write in words, for messages."""
        parts = []
        if self.post_norm is not None:
            parts.append(f"a {self.post_norm.kind} post-norm")
        if self.multiplier != 1.0:
            parts.append(f"a multiplier {self.multiplier:g}")
        return " and ".join(parts) or "nothing"


def sublayer_write(model: Any, layer: int, kind: str) -> SublayerWrite:
    """The :class:`SublayerWrite` of block ``layer``'s ``kind`` (``"attn"`` or ``"mlp"``) sublayer."""
    block = model.blocks[layer]
    multiplier = float(getattr(block, "residual_contribution_scale", 1.0) or 1.0)
    name = POST_NORMS[kind]
    post = getattr(block, name, None)
    if not isinstance(post, torch.nn.Module) or isinstance(inner_module(post), torch.nn.Identity):
        return SublayerWrite(multiplier)  # none (a folded HookedTransformer keeps an Identity in its place)
    norm = read_norm(post, model, f"blocks.{layer}.{name}", getattr(model.cfg, "normalization_type", None))
    hooks = getattr(model, "hook_dict", {})
    scale_hook = f"blocks.{layer}.{name}.hook_scale"
    if scale_hook in hooks:
        return SublayerWrite(multiplier, norm, scale_hook=scale_hook)
    return SublayerWrite(multiplier, norm, input_hook=f"blocks.{layer}.{name}.hook_in")


def unread_block_parts(model: Any, layer: int) -> list:
    """Parts of block ``layer`` that the pieces do not read and that may write to the stream: bridge
    submodules beyond the norms, attention and MLP (Gemma 4's ``per_layer_input_gate``), and a
    ``layer_scalar`` that multiplies the whole stream (Gemma 4), where not 1. For refusals."""
    block = model.blocks[layer]
    parts = sorted(set(getattr(block, "submodules", None) or {}) - _READ_PARTS)
    inner = getattr(block, "original_component", None)
    scalar = getattr(inner, "layer_scalar", None)
    if isinstance(scalar, torch.Tensor) and not bool((scalar == 1).all()):
        parts.append(f"layer_scalar={scalar.flatten()[0].item():.4g} (it multiplies the whole stream)")
    return parts
