"""What the caller passed, resolved and checked before any forward pass.

- :mod:`.tokens`: text or ids into right-padded :class:`~.tokens.Tokens`; tokens named as text,
  vocabulary pieces or ids; positions (each prompt's own last token for ``-1``)
- :mod:`.data`: a dataset (ids, strings, a ``DataLoader``) as a stream of batches, long
  sequences cut into windows; what evaluation, training and fitting read
- :mod:`.images`: a vision-language model's ``pixel_values``, checked against the prompt's image
  tokens and carried with them to the model's run
- :mod:`.resolve`: the model, the tokens and the activations (a user's ``ActivationCache``, or
  the model run once caching only the hooks an analysis reads)
- :mod:`.options`: the cheap checks of the options every entry point shares

Example::

    >>> from tl_logitlens.demo import demo_model
    >>> from tl_logitlens.inputs import tokenize
    >>> from tl_logitlens.model_access import view
    >>> tokenize(view(demo_model()), ["red cat", "sun"]).lengths.tolist()
    [3, 2]
"""

from __future__ import annotations

from .data import batches, split_long, trim, warn_file_names, windows
from .images import attach_images, image_inputs
from .options import check_modes, check_norm, check_stream_args
from .resolve import activation_shape, check_cache, check_cache_belongs, resolve_inputs, resolve_model, run_or_read
from .tokens import (
    PositionSpec,
    Tokens,
    context_length,
    gather_positions,
    next_token_ids,
    per_prompt_ids,
    position_index,
    single_token_id,
    token_items,
    token_list,
    tokenize,
)

__all__ = [
    "attach_images",
    "image_inputs",
    "batches",
    "split_long",
    "trim",
    "warn_file_names",
    "windows",
    "check_modes",
    "check_norm",
    "check_stream_args",
    "activation_shape",
    "check_cache",
    "check_cache_belongs",
    "resolve_inputs",
    "resolve_model",
    "run_or_read",
    "PositionSpec",
    "Tokens",
    "context_length",
    "gather_positions",
    "next_token_ids",
    "per_prompt_ids",
    "position_index",
    "single_token_id",
    "token_items",
    "token_list",
    "tokenize",
]
