"""What the caller passed, resolved: the model, its tokens, and the activations to read.

Every analysis accepts a model plus input, or an ``ActivationCache`` the user already made
(the model may then be omitted). This module works out which, checks a given cache holds
the hooks an analysis needs before anything is read, and otherwise runs the model once,
caching only those hooks.
"""

from __future__ import annotations

import re
from typing import Any, List, Optional, Tuple

import torch

from ..errors import LensInputError, MissingHooksError
from ..model_access import (
    ActivationCache,
    ModelView,
    cache_has,
    cache_tensor,
    input_device,
    model_from_cache,
    run_with_cache,
)
from ..model_access import (
    view as view_model,
)
from .images import attach_images, image_inputs
from .tokens import Tokens, tokenize


def resolve_model(model: Any) -> ModelView:
    """The :class:`ModelView` of a model passed to an analysis (architecture and eval-mode checks included)."""
    if isinstance(model, ActivationCache):
        raise LensInputError(
            "this analysis runs the model over data and cannot read an ActivationCache; pass the model itself"
        )
    return view_model(model)


def resolve_inputs(
    model: Any, input: Any, cache: Any, pixel_values: Any = None
) -> tuple[ModelView, Optional[Tokens], Any]:
    """Work out the model, the tokens and the cache from what the caller passed.

    ``pixel_values`` (a vision-language model's images) are checked against the tokens' image
    tokens and ride with them (:func:`~tl_logitlens.inputs.images.attach_images`).
    """
    if isinstance(model, ActivationCache):
        if cache is not None:
            raise LensInputError("pass the cache once: as cache=, or as the first argument")
        model, cache = None, model
    if model is None:
        if cache is None:
            raise LensInputError("pass a model and an input, or cache= (an ActivationCache)")
        model = model_from_cache(cache)
    view = resolve_model(model)
    if cache is not None:
        check_cache_belongs(view, cache)
    if cache is None and input is None:
        raise LensInputError("pass an input to run (text or token ids), or cache= to read")
    tokens = attach_images(view, None if input is None else tokenize(view, input), cache, pixel_values)
    if cache is not None and tokens is not None:
        final = cache_tensor(cache, view.final_resid_hook) if view.final_resid_hook in cache.cache_dict else None
        if final is not None and tuple(final.shape[:2]) != tuple(tokens.ids.shape):
            raise LensInputError(
                f"input has shape {tuple(tokens.ids.shape)} but the cache holds activations for "
                f"{tuple(final.shape[:2])} [batch, pos]; pass the tokens the cache was made from."
            )
    return view, tokens, cache


_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def check_cache_belongs(view: ModelView, cache: Any) -> None:
    """Refuse an ``ActivationCache`` made by another model, before anything is read from it.

    A cache records the model that made it; a different object is refused. Whatever it
    records, its hooks must fit this model: no block beyond ``n_layers - 1`` (a deeper
    model's ``blocks.1`` stream would otherwise be read as this model's final stream) and
    residual streams ``d_model`` wide.
    """
    if not isinstance(cache, ActivationCache):
        raise LensInputError(
            f"cache must be a transformer_lens ActivationCache, got {type(cache).__name__}; "
            "make one with `logits, cache = model.run_with_cache(tokens)`."
        )
    recorded = getattr(cache, "model", None)
    if recorded is not None and recorded is not view.model:
        raise LensInputError(
            "this ActivationCache was made by another model object than the one passed; its "
            "activations would be read through this model's norm and unembedding. Pass the model "
            "that made the cache (or omit model= and it is taken from the cache)."
        )
    names = list(cache.cache_dict.keys())
    layers = [int(m.group(1)) for m in map(_BLOCK.match, names) if m]
    if layers and max(layers) >= view.n_layers:
        raise LensInputError(
            f"the cache holds hooks of block {max(layers)}, but this model has {view.n_layers} "
            f"layers (blocks 0..{view.n_layers - 1}): it was made by a deeper model. Pass the model "
            "that made the cache."
        )
    for name in names:
        # The language stream's blocks only: a vision-language model's cache also holds its vision
        # tower's streams (``vision_encoder.encoder_layers.0.hook_resid_pre``), of another width.
        if _BLOCK.match(name) and "hook_resid_" in name:
            width = int(cache.cache_dict[name].shape[-1])
            if width != view.d_model:
                raise LensInputError(
                    f"the cache's {name} is {width} wide, but this model's d_model is {view.d_model}: "
                    "the cache was made by another model. Pass the model that made the cache."
                )
            break


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


def activation_shape(
    view: ModelView, cache: Any, tokens: Optional[Tokens], names: List[str], what: str
) -> Tuple[int, int]:
    """``(batch, seq)`` of the activations about to be read; a given cache must hold ``names``."""
    if cache is not None:
        check_cache(cache, names, what)
    if tokens is not None:
        return tuple(tokens.ids.shape)  # type: ignore[return-value]
    final = cache_tensor(cache, view.final_resid_hook)
    return final.shape[0], final.shape[1]


def run_or_read(
    view: ModelView, tokens: Optional[Tokens], cache: Any, names: List[str]
) -> Tuple[Optional[torch.Tensor], Any]:
    """``(logits, cache)``: the model run once caching ``names``, or ``(None, cache)`` as given."""
    if cache is not None:
        return None, cache
    return run_with_cache(view.model, tokens.ids.to(input_device(view)), names, image_inputs(view, tokens))
