"""The model as the analyses see it: :class:`ModelView`, read once per call by :func:`view`.

A view holds the unembedding, the embedding, the final norm as parameters (checked against the
model's own module on a probe vector), the per-layer output weights, hook names, the tokenizer
(or its absence), what the model does to its logits after the unembedding (:mod:`.logits`), how
each block's outputs reach the stream (post-norms and multipliers, :mod:`.blocks`) and its expert
layers (:mod:`.experts`); it is the one place that knows these family quirks. :func:`view`
refuses architectures that cannot be read exactly and models in training mode, before any
forward pass. Version facts absorbed here: a folded ``HookedTransformer`` has a parameter-free
``LNPre``/``RMSPre`` final norm, while a folded bridge keeps ``LN``/``RMS`` with unit weight and
zero bias; the bridge keeps HF's norm module (``weight``/``bias``/``eps`` or
``variance_epsilon``) and omits absent biases instead of holding zeros.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ..errors import LensInputError, ModelStateError, UnsupportedModelError
from ..kernel import FinalNorm, Unembedding
from ..tokentext import token_text
from .blocks import SublayerWrite, sublayer_write, unread_block_parts
from .experts import ExpertLayer, find_expert_layer
from .logits import LogitTransform, read_logit_transform
from .norms import final_norm, norm_check_rtol  # noqa: F401 - norm_check_rtol is part of this module's API
from .versions import is_supported_model

#: How a stack entry is unembedded: the unembedding, or the transposed embedding (the tied reading).
UNEMBED_MODES = ("W_U", "W_E")

_ENCODER_CLASS_NAMES = ("HookedEncoder", "HookedEncoderDecoder", "HookedAudioEncoder")
_NON_ATTENTION_BLOCK_WORDS = ("ssm", "mamba", "mixer", "conv", "delta")


def compute_device(view: ModelView) -> torch.device:
    """Where the package computes: the unembedding's own device (the last one of a split model)."""
    return view.W_U.device


def input_device(view: ModelView) -> torch.device:
    """Where a forward pass takes its token ids: the embedding's device (the first of a split model)."""
    return view.W_E.device


@dataclass
class ModelView:
    """What the analyses need to know about one model, read once per call.

    Attributes:
        model: the wrapped ``HookedTransformer`` or ``TransformerBridge``.
        n_layers, n_heads, d_model, d_head, d_vocab: sizes from the config.
        has_pos_embed: an absolute position embedding is added to the stream (learned or a
            fixed table); :attr:`pos_embed_hook` is ``None`` when no hook holds it on its own.
        has_mlp: blocks have an MLP (False for attention-only models).
        parallel: attention and MLP read the same stream (no meaningful ``resid_mid``).
        final_norm: :class:`~tl_logitlens.kernel.FinalNorm` of ``ln_final``.
        logit_transform: what the model does to its logits after the unembedding
            (:class:`~tl_logitlens.model_access.logits.LogitTransform`: a linear scale, a soft cap).
        tokenizer: the model's tokenizer, or ``None``.
        n_ctx: the context length, or ``None`` when the config does not say.
        model_name: the config's ``model_name`` (``""`` when unnamed).
        has_experts: the config declares experts (which layers have them: :meth:`expert_layer`).
        takes_images: a vision-language model (``cfg.is_multimodal``): its forward pass takes
            ``pixel_values`` and writes the projected image features into the language stream
            at its image tokens' positions, in place of their embeddings.
        image_token_id: the token that marks an image position (LLaVA's ``<image>``), or ``None``.
        tokens_per_image: how many image tokens one image fills, where the config fixes it
            (LLaVA, Gemma 3); else ``None``.
        image_token_types: the forward pass takes ``token_type_ids`` marking the image tokens
            with 1 (Gemma 3: an image's tokens attend to each other both ways, which its
            processor asks for this way); the runs pass them, made from the image tokens.
    """

    model: Any
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_vocab: int
    has_pos_embed: bool
    has_mlp: bool
    parallel: bool
    final_norm: FinalNorm
    logit_transform: LogitTransform
    tokenizer: Any
    n_ctx: Optional[int] = None
    model_name: str = ""
    has_experts: bool = False
    takes_images: bool = False
    image_token_id: Optional[int] = None
    tokens_per_image: Optional[int] = None
    image_token_types: bool = False
    _read: Dict[Tuple[str, int, str], Any] = field(default_factory=dict, repr=False)

    @property
    def output_transform(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """The logit transform as the kernel applies it (``None`` for none; ``elementwise = True`` when it acts
        on each logit alone, else it is given whole ``[rows, d_vocab]`` blocks)."""
        return self.logit_transform.kernel_transform()

    # -- weights ------------------------------------------------------------------------
    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding ``[d_model, d_vocab]``."""
        return self.model.W_U.detach()

    @property
    def b_U(self) -> Optional[torch.Tensor]:
        """Unembedding bias ``[d_vocab]`` or ``None``."""
        b_U = getattr(self.model, "b_U", None)
        return None if b_U is None else b_U.detach()

    @property
    def W_E(self) -> torch.Tensor:
        """Token embedding ``[d_vocab, d_model]``."""
        return self.model.W_E.detach()

    def unembedding(self, unembed: str = "W_U") -> Unembedding:
        """What the kernel reads vectors through: ``"W_U"`` (with ``b_U`` and the model's logit
        transform) or ``"W_E"`` (the embedding transposed: the tied reading, no bias, no transform).

        ``W`` stays in the model's own dtype and on its own device; the kernel casts it a tile at
        a time.
        """
        if unembed == "W_U":
            return Unembedding(self.W_U, self.b_U, self.final_norm, self.output_transform)
        if unembed == "W_E":
            W_E = self.W_E
            if W_E.shape[0] != self.d_vocab:
                raise LensInputError(
                    f"unembed='W_E' needs an embedding with one row per output token, but W_E has "
                    f"{W_E.shape[0]} rows and W_U {self.d_vocab} columns; use unembed='W_U'."
                )
            return Unembedding(W_E.T, None, self.final_norm, None)
        raise LensInputError(f"unembed must be one of {UNEMBED_MODES}, got {unembed!r}")

    def attn_output_weights(self, layer: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(W_O [n_heads, d_head, d_model], b_O [d_model] or None)`` of one layer."""
        attn = self.model.blocks[layer].attn
        try:
            W_O = attn.W_O.detach()
        except Exception as err:  # noqa: BLE001 - a bridge that cannot give W_O raises its own kind of error
            raise UnsupportedModelError(
                f"layer {layer}'s attention ({type(attn).__name__}) gives no per-head output weights W_O "
                f"({type(err).__name__}: {err}), so its heads cannot be read; use by='component'."
            ) from err
        if W_O.ndim == 2:  # some bridges expose [n_heads * d_head, d_model] (d_head: the value width)
            W_O = W_O.reshape(self.n_heads, -1, self.d_model)
        b_O = _optional_param(attn, "b_O")
        return W_O, b_O

    def mlp_output_weights(self, layer: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(W_out [d_mlp, d_model], b_out [d_model] or None)`` of one layer."""
        mlp = self.model.blocks[layer].mlp
        return mlp.W_out.detach(), _optional_param(mlp, "b_out")

    # -- how blocks write (read on first use: an analysis that needs none of it pays nothing) -----------
    def write(self, layer: int, kind: str) -> SublayerWrite:
        """How block ``layer``'s ``kind`` (``"attn"`` or ``"mlp"``) output reaches the stream: post-norm, multiplier."""
        key = ("write", layer, kind)
        if key not in self._read:
            self._read[key] = sublayer_write(self.model, layer, kind)
        return self._read[key]

    def unread_block_parts(self, layer: int) -> list:
        """Parts of block ``layer`` that may change the stream and that no piece reads (for refusals)."""
        return unread_block_parts(self.model, layer)

    def expert_layer(self, layer: int) -> Optional[ExpertLayer]:
        """Block ``layer``'s sparse expert block, or ``None`` for a dense MLP (raises for an unreadable one)."""
        key = ("experts", layer, "")
        if key not in self._read:
            mlp = self.model.blocks[layer].mlp
            if not self.has_experts and type(mlp).__name__ != "MoEBridge":
                self._read[key] = None
            elif not hasattr(mlp, "original_component"):
                raise UnsupportedModelError(
                    f"layer {layer} mixes experts ({type(mlp).__name__}); by='neuron' reads expert layers "
                    "of TransformerBridge models only. Boot the model with TransformerBridge.boot_transformers, "
                    "or use by='component' or by='head'."
                )
            else:
                self._read[key] = find_expert_layer(mlp, self.d_model, layer)
        return self._read[key]

    # -- hook names -----------------------------------------------------------------------
    def resid_hook(self, layer: int, where: str) -> str:
        """``blocks.{layer}.hook_resid_{where}`` for where in pre/mid/post."""
        return f"blocks.{layer}.hook_resid_{where}"

    @property
    def final_resid_hook(self) -> str:
        """The stream ``ln_final`` reads."""
        return self.resid_hook(self.n_layers - 1, "post")

    embed_hook = "hook_embed"

    @property
    def pos_embed_hook(self) -> Optional[str]:
        """The hook holding the position embedding, or ``None`` (none added, or no hook holds it: XGLM
        adds a sinusoidal table inside its embedding step, read as ``0_pre - embed``)."""
        hooks = getattr(self.model, "hook_dict", None)
        if not self.has_pos_embed or (hooks is not None and "hook_pos_embed" not in hooks):
            return None
        return "hook_pos_embed"

    def mlp_in_hook(self, layer: int) -> str:
        """What a layer's MLP (or expert block) reads ``[batch, pos, d_model]``."""
        return f"blocks.{layer}.mlp.hook_in"

    def attn_z_hook(self, layer: int) -> str:
        """Each head's mixed values ``[batch, pos, n_heads, d_head]`` before ``W_O``."""
        return f"blocks.{layer}.attn.hook_z"

    def attn_pattern_hook(self, layer: int) -> str:
        """The attention pattern ``[batch, n_heads, dest, src]`` (rows sum to 1)."""
        return f"blocks.{layer}.attn.hook_pattern"

    def attn_v_hook(self, layer: int) -> str:
        """The values the pattern mixes, ``[batch, pos, n_kv_heads, d_head]`` (``b_V`` included; grouped-query
        attention keeps one per key-value head): ``attn.hook_v``, or where the values are normalised
        after it (Gemma 4's ``v_norm``), the norm's output."""
        normed = f"blocks.{layer}.attn.v_norm.hook_out"
        if normed in getattr(self.model, "hook_dict", {}):
            return normed
        return f"blocks.{layer}.attn.hook_v"

    def attn_out_hook(self, layer: int) -> str:
        """What a layer's attention writes to the stream."""
        return f"blocks.{layer}.hook_attn_out"

    def mlp_post_hook(self, layer: int) -> str:
        """The MLP's neuron activations ``[batch, pos, d_mlp]`` before ``W_out``."""
        return f"blocks.{layer}.mlp.hook_post"

    def mlp_out_hook(self, layer: int) -> str:
        """What a layer's MLP writes to the stream."""
        return f"blocks.{layer}.hook_mlp_out"

    # -- tokens -----------------------------------------------------------------------------
    def decode(self, token_id: int) -> str:
        """One token as the vocabulary spells it (:func:`~tl_logitlens.tokentext.token_text`); ``#id`` sans "
        "tokenizer."""
        return token_text(self.tokenizer, int(token_id))


def _optional_param(module: Any, name: str) -> Optional[torch.Tensor]:
    try:
        value = getattr(module, name)
    except AttributeError:
        return None
    return None if value is None else value.detach()


def require_eval_mode(model: Any) -> None:
    """Refuse a model with any submodule in training mode (dropout would make numbers random)."""
    roots = [model]
    original = getattr(model, "original_model", None)
    if isinstance(original, torch.nn.Module):
        roots.append(original)
    training = [
        name or type(root).__name__ for root in roots for name, module in root.named_modules() if module.training
    ]
    if training:
        shown = ", ".join(training[:3]) + (f" and {len(training) - 3} more" if len(training) > 3 else "")
        raise ModelStateError(
            f"the model is in training mode ({shown}), so dropout would make every number "
            "random; call model.eval() first."
        )


def _check_architecture(model: Any) -> None:
    name = type(model).__name__
    if name in _ENCODER_CLASS_NAMES:
        raise UnsupportedModelError(
            f"{name} is an encoder or encoder-decoder model; the logit lens and direct logit "
            "attribution here read a decoder-only residual stream. Use a decoder-only model."
        )
    if not is_supported_model(model):
        raise LensInputError(
            f"expected a transformer_lens HookedTransformer or TransformerBridge, got {name}. "
            "Load the model with TransformerLens first (e.g. TransformerBridge.boot_transformers(path))."
        )
    modules = dict(model.named_children())
    if "encoder_blocks" in modules or "decoder_blocks" in modules or "encoder" in modules:
        raise UnsupportedModelError(
            "this bridge wraps an encoder-decoder model; its decoder stream with cross-attention "
            "is not one residual stream read by ln_final. Use a decoder-only model."
        )
    if getattr(model, "unembed", None) is None:
        raise UnsupportedModelError(
            "this model has no `unembed` component (encoder-only models carry a task head); "
            "there is no W_U to read the residual stream through."
        )
    for layer, block in enumerate(model.blocks):
        kind = type(block).__name__.lower()
        if getattr(block, "attn", None) is None or any(w in kind for w in _NON_ATTENTION_BLOCK_WORDS):
            raise UnsupportedModelError(
                f"blocks.{layer} ({type(block).__name__}) is not an attention block (a state-space "
                "or convolutional mixer); its writes to the residual stream cannot be split into "
                "attention and MLP pieces. Only attention transformers are supported."
            )


def _image_inputs(model: Any) -> Tuple[bool, Optional[int], Optional[int], bool]:
    """``(takes_images, image_token_id, tokens_per_image, image_token_types)`` of a vision-language model."""
    if not getattr(model.cfg, "is_multimodal", False):
        return False, None, None, False
    original = getattr(model, "original_model", None)
    config = getattr(original, "config", None)
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    per_image = getattr(config, "mm_tokens_per_image", None)  # Gemma 3
    vision = getattr(config, "vision_config", None)
    if per_image is None and getattr(config, "model_type", None) == "llava" and vision is not None:
        # One token per patch; the "full" strategy keeps the vision tower's class token as well.
        patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
        per_image = patches + (getattr(config, "vision_feature_select_strategy", "default") == "full")
    forward = getattr(original, "forward", None)
    token_types = forward is not None and "token_type_ids" in inspect.signature(forward).parameters
    return True, None if token is None else int(token), None if per_image is None else int(per_image), token_types


def view(model: Any) -> ModelView:
    """Inspect ``model`` once: architecture checks, eval mode, final norm, sizes.

    Raises :class:`UnsupportedModelError` for architectures that cannot be read exactly
    and :class:`ModelStateError` for a model in training mode; both before any forward pass.

    Example::

        >>> from tl_logitlens.demo import demo_model
        >>> v = view(demo_model())
        >>> v.final_norm.kind
        'LN'
    """
    _check_architecture(model)
    require_eval_mode(model)
    cfg = model.cfg
    n_heads = int(cfg.n_heads)
    d_model = int(cfg.d_model)
    d_head = int(getattr(cfg, "d_head", None) or d_model // n_heads)
    takes_images, image_token_id, tokens_per_image, image_token_types = _image_inputs(model)
    has_mlp = not bool(getattr(cfg, "attn_only", False)) and all(
        getattr(block, "mlp", None) is not None for block in model.blocks
    )
    return ModelView(
        model=model,
        n_layers=int(cfg.n_layers),
        n_heads=n_heads,
        d_model=d_model,
        d_head=d_head,
        d_vocab=int(model.W_U.shape[1]),
        has_pos_embed=getattr(cfg, "positional_embedding_type", "standard") == "standard",
        has_mlp=has_mlp,
        parallel=bool(getattr(cfg, "parallel_attn_mlp", False)),
        final_norm=final_norm(model),
        logit_transform=read_logit_transform(model),
        tokenizer=getattr(model, "tokenizer", None),
        n_ctx=None if getattr(cfg, "n_ctx", None) is None else int(cfg.n_ctx),
        model_name=str(getattr(cfg, "model_name", "") or ""),
        has_experts=bool(getattr(cfg, "num_experts", None)),
        takes_images=takes_images,
        image_token_id=image_token_id,
        tokens_per_image=tokens_per_image,
        image_token_types=image_token_types,
    )
