"""Images for a vision-language model: ``pixel_values`` checked against the prompt's image tokens.

A LLaVA-style model reads an image where its prompt holds image tokens (``<image>``), one token
per image feature: its processor, ``processor(text=..., images=..., return_tensors="pt")``, writes
the prompt with each ``<image>`` expanded to that many tokens and the images as ``pixel_values``.
An analysis takes both (``input=inputs["input_ids"], pixel_values=inputs["pixel_values"]``);
they are checked here, before any forward pass, and ride with the tokens to the one run of the
model, where the projected image features replace the image tokens' embeddings in the stream.

Example::

    >>> import torch
    >>> from tl_logitlens.demo import demo_model
    >>> from tl_logitlens.model_access import view
    >>> from tl_logitlens.inputs import tokenize
    >>> v = view(demo_model())
    >>> attach_images(v, tokenize(v, "red cat"), None, torch.zeros(1, 3, 8, 8))
    Traceback (most recent call last):
    ...
    tl_logitlens.errors.LensInputError: pixel_values were given, but this model takes no images ...
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import torch

from ..errors import LensInputError
from ..model_access import ModelView
from .tokens import Tokens


def _image_token_count(view: ModelView, tokens: Optional[Tokens]) -> int:
    """How many image tokens the real (unpadded) positions of ``tokens`` hold."""
    if tokens is None or view.image_token_id is None:
        return 0
    real = torch.arange(tokens.ids.shape[1]) < tokens.lengths.unsqueeze(1)
    return int(((tokens.ids == view.image_token_id) & real).sum())


def attach_images(view: ModelView, tokens: Optional[Tokens], cache: Any, pixel_values: Any) -> Optional[Tokens]:
    """``tokens`` with ``pixel_values`` attached for the model's run, after every cheap check.

    Refused, each with its mend: images for a model that takes none; images beside a ``cache``
    (nothing is run); images that are not a floating-point tensor with an image axis, or hold
    NaN/inf; images for a prompt without image tokens; a prompt whose image-token count is not
    the images' (where the config fixes the tokens per image); and image tokens with no images,
    which the model would read as the image token's own embedding.
    """
    marked = _image_token_count(view, tokens)
    spelled = (
        "" if view.image_token_id is None else f" ({view.decode(view.image_token_id)!r}, id {view.image_token_id})"
    )
    if pixel_values is None:
        if cache is None and marked:
            raise LensInputError(
                f"the input holds {marked} image tokens{spelled} but no pixel_values were given: the model "
                "would read the image token's own embedding there, not an image. Pass the images as "
                "pixel_values= (the processor's output) with the input."
            )
        return tokens
    if not view.takes_images:
        raise LensInputError(
            "pixel_values were given, but this model takes no images (its config is not multimodal); "
            "pass text or token ids alone."
        )
    if cache is not None:
        raise LensInputError(
            "pixel_values are read when the model runs, but cache= already holds the activations: pass "
            "them to model.run_with_cache(tokens, pixel_values=...) when you make the cache, or pass "
            "input= and pixel_values= without cache=."
        )
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.dtype.is_floating_point:
        got = pixel_values.dtype if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise LensInputError(
            f"pixel_values must be a floating-point tensor [images, channels, height, width] as the model's "
            f"processor makes it, got {got}"
        )
    if pixel_values.ndim < 4:
        raise LensInputError(
            f"pixel_values must be shaped [images, channels, height, width] (the processor's output), got "
            f"{tuple(pixel_values.shape)}; a single image needs its leading axis: pixel_values[None]"
        )
    if not bool(torch.isfinite(pixel_values).all()):
        bad = int((~torch.isfinite(pixel_values)).sum())
        raise LensInputError(
            f"pixel_values hold {bad} NaN or inf values; the model would read them as an image. Pass the "
            "images as the model's processor makes them."
        )
    if not marked:
        raise LensInputError(
            f"pixel_values were given, but the input holds no image tokens{spelled}, so the model would "
            "not read the images. Make the input with the model's processor: processor(text=..., "
            "images=..., return_tensors='pt'), and pass its input_ids and pixel_values."
        )
    per_image = view.tokens_per_image
    if per_image is not None and marked != pixel_values.shape[0] * per_image:
        raise LensInputError(
            f"the input holds {marked} image tokens{spelled}, but pixel_values hold {pixel_values.shape[0]} "
            f"image(s) of {per_image} tokens each ({pixel_values.shape[0] * per_image}). The processor "
            f"expands each image token of the text to {per_image}: make the input with processor(text=..., "
            "images=..., return_tensors='pt') and pass its input_ids and pixel_values."
        )
    return dataclasses.replace(tokens, pixel_values=pixel_values)


def image_inputs(view: ModelView, tokens: Tokens) -> Dict[str, torch.Tensor]:
    """The forward pass's inputs beside the token ids: ``{}`` for text, else ``pixel_values`` and, where
    the model takes them (:attr:`~tl_logitlens.model_access.ModelView.image_token_types`: Gemma 3),
    ``token_type_ids [batch, seq]``, 1 at the image tokens, as its processor writes them."""
    if tokens.pixel_values is None:
        return {}
    extra = {"pixel_values": tokens.pixel_values}
    if view.image_token_types:
        extra["token_type_ids"] = (tokens.ids == view.image_token_id).long()
    return extra
