"""Every forward pass the package makes, and reading what a cache holds.

Three runs: :func:`run_with_cache` (one pass caching only the named hooks),
:func:`capture` (hooks only, the pass stopped after the last of them: no logits),
:func:`run_with_patches` (activations replaced). A user's ``ActivationCache`` is read through
:func:`cache_tensor` and :func:`cache_has`, whatever ``remove_batch_dim`` it was made with.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..errors import LensInputError
from .versions import ActivationCache


def model_from_cache(cache: Any) -> Any:
    """The model an ``ActivationCache`` was made with, or a clear error."""
    if not isinstance(cache, ActivationCache):
        raise LensInputError(
            f"cache must be a transformer_lens ActivationCache, got {type(cache).__name__}; "
            "make one with `logits, cache = model.run_with_cache(tokens)`."
        )
    model = getattr(cache, "model", None)
    if model is None:
        raise LensInputError("this ActivationCache does not record its model; pass model= as well as cache=.")
    return model


def cache_tensor(cache: Any, name: str) -> torch.Tensor:
    """``cache[name]`` with a batch axis, whatever ``remove_batch_dim`` the cache was made with."""
    value = cache[name]
    if not getattr(cache, "has_batch_dim", True):
        value = value.unsqueeze(0)
    return value


def cache_has(cache: Any, name: str) -> bool:
    """Whether ``cache`` holds hook ``name`` (bridges resolve aliases on lookup)."""
    if name in cache.cache_dict:
        return True
    try:
        cache[name]
    except (KeyError, AttributeError, ValueError):
        return False
    return True


# -- the forward runs ---------------------------------------------------------------------
# Every forward pass the package makes goes through one of these three.


def run_with_cache(
    model: Any, tokens: torch.Tensor, names: List[str], extra: Optional[Dict[str, torch.Tensor]] = None
) -> Tuple[torch.Tensor, Any]:
    """One forward pass caching only ``names``: ``(logits [batch, pos, d_vocab], cache)``.

    ``extra``: more inputs of the forward pass beside the tokens, by name (a vision-language
    model's ``pixel_values``, :func:`tl_logitlens.inputs.images.image_inputs`), moved to the
    tokens' device.
    """
    wanted = set(names)
    extra = {name: value.to(tokens.device) for name, value in (extra or {}).items()}
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in wanted, **extra)
    return logits, cache


class _Captured(Exception):
    """Raised by the last capture hook: the rest of the forward pass is not needed."""


def capture(model: Any, tokens: torch.Tensor, names: List[str]) -> Dict[str, torch.Tensor]:
    """The activations at hooks ``names`` for one batch, the model stopped after the last of them.

    No cache and no logits: when ``names`` is the residual stream, the forward pass ends
    before ``ln_final`` and the unembedding, which is what a dataset-scale lens needs.
    Returns ``{name: [batch, pos, ...]}`` on each hook's own device.

    Example::

        >>> from tl_logitlens.demo import demo_model, induction_prompt
        >>> model = demo_model()
        >>> acts = capture(model, induction_prompt(model), ["blocks.0.hook_resid_pre"])
        >>> tuple(acts["blocks.0.hook_resid_pre"].shape)
        (1, 25, 64)
    """
    store: Dict[str, torch.Tensor] = {}

    def make_hook(name: str) -> Callable:
        def hook(tensor: torch.Tensor, hook: Any = None) -> None:
            store[name] = tensor.detach()
            if len(store) == len(names):
                raise _Captured

        return hook

    try:
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=[(n, make_hook(n)) for n in names])
    except _Captured:
        pass
    missing = [n for n in names if n not in store]
    if missing:
        raise LensInputError(f"the forward pass did not reach hooks {missing[:3]}; cannot read them")
    return store


def run_with_patches(
    model: Any, tokens: torch.Tensor, patches: Dict[str, Callable[[torch.Tensor], torch.Tensor]]
) -> torch.Tensor:
    """One forward pass with activations replaced: ``logits [batch, pos, d_vocab]``.

    ``patches`` maps a hook name to ``f(activation) -> activation`` (zero a head, add a
    direction, paste another run's value); the model's own hooks are left as they were.

    Example::

        >>> import torch
        >>> from tl_logitlens.demo import demo_model, induction_prompt
        >>> model = demo_model()
        >>> tokens = induction_prompt(model)
        >>> same = run_with_patches(model, tokens, {"blocks.1.hook_attn_out": lambda a: a})
        >>> zeroed = run_with_patches(model, tokens, {"blocks.1.hook_attn_out": torch.zeros_like})
        >>> bool(torch.equal(same, model(tokens))), bool(torch.equal(zeroed, same))
        (True, False)
    """

    def wrap(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        def hook(tensor: torch.Tensor, hook: Any = None) -> torch.Tensor:
            out = fn(tensor)
            if not isinstance(out, torch.Tensor) or out.shape != tensor.shape:
                raise LensInputError(
                    f"a patch must return a tensor shaped like the activation {tuple(tensor.shape)}, "
                    f"got {getattr(out, 'shape', type(out).__name__)}"
                )
            return out

        return hook

    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=[(name, wrap(fn)) for name, fn in patches.items()])
