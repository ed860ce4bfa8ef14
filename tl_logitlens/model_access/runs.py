"""Every forward pass the package makes, and reading what a cache holds.

Four runs: :func:`run_with_cache` (one pass caching only the named hooks),
:func:`capture` (hooks only, the pass stopped after the last of them: no logits),
:func:`run_with_patches` (activations replaced) and :func:`run_patched` (many stream patches in
one batch, one activation captured per row, the pass stopped there; :func:`patched_rows_per_pass`
sizes its batches). A user's ``ActivationCache`` is read through
:func:`cache_tensor` and :func:`cache_has`, whatever ``remove_batch_dim`` it was made with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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
# Every forward pass the package makes goes through one of these four.


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


#: The activation memory one batch of :func:`run_patched` may take on the CPU when the caller
#: does not fix its rows (:func:`patched_rows_per_pass`); on CUDA a quarter of the free memory.
PATCH_BUDGET_BYTES = 256 * 2**20


@dataclass(frozen=True)
class StreamPatch:
    """Overwrite the activation at hook ``hook`` at ``(rows[i], positions[i])`` with ``values[i]``.

    ``rows``, ``positions``: ``[n]`` integer indices into the batch and the sequence;
    ``values``: ``[n, width]`` (cast to the activation's dtype and device when written).
    """

    hook: str
    rows: torch.Tensor
    positions: torch.Tensor
    values: torch.Tensor


def patched_rows_per_pass(model: Any, seq: int, budget_bytes: Optional[int] = None) -> int:
    """How many rows of a ``seq``-token prompt one forward pass may run within a memory budget.

    A row's activations are estimated from the widest tensors a block holds at once, in the
    model's own dtype: ``seq * (4 * d_model + 2 * d_mlp + 2 * n_heads * seq) * bytes`` (the stream
    and its normalised copy, attention's queries, keys, values and output, the MLP's hidden
    pair, the scores and the pattern). The budget is ``budget_bytes``, else
    :data:`PATCH_BUDGET_BYTES` on the CPU and a quarter of the free memory on CUDA. At least one row.

    Example::

        >>> from tl_logitlens.demo import demo_model
        >>> patched_rows_per_pass(demo_model(), seq=20, budget_bytes=2**20) >= 1
        True
    """
    cfg = model.cfg
    d_model = int(cfg.d_model)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d_model)
    n_heads = int(cfg.n_heads)
    weight = model.W_U
    per_row = seq * (4 * d_model + 2 * d_mlp + 2 * n_heads * seq) * weight.element_size()
    if budget_bytes is None:
        budget_bytes = PATCH_BUDGET_BYTES
        if weight.device.type == "cuda":
            budget_bytes = torch.cuda.mem_get_info(weight.device)[0] // 4
    return max(1, int(budget_bytes) // max(1, per_row))


def _write_patches(tensor: torch.Tensor, patches: List[StreamPatch]) -> torch.Tensor:
    """``tensor [batch, seq, width]`` with every patch written (a copy: the model's own value is kept)."""
    out = tensor.clone()
    for patch in patches:
        values = patch.values.to(device=out.device, dtype=out.dtype)
        if values.ndim != 2 or values.shape[-1] != out.shape[-1]:
            raise LensInputError(
                f"a patch at {patch.hook} holds values of shape {tuple(patch.values.shape)}, but the "
                f"activation there is {out.shape[-1]} wide: patch [n, {out.shape[-1]}] vectors"
            )
        out[patch.rows.to(out.device), patch.positions.to(out.device)] = values
    return out


def run_patched(
    model: Any,
    tokens: torch.Tensor,
    patches: Sequence[StreamPatch],
    capture_hook: str,
    capture_at: torch.Tensor,
) -> torch.Tensor:
    """One forward pass of ``tokens [rows, seq]`` with ``patches`` written, returning only the
    activation at ``capture_hook`` at position ``capture_at[r]`` of each row: ``[rows, width]``.

    Each patch overwrites its hook's activation at its (row, position) pairs with its vectors
    (many patches, at many hooks, in one batch: each row its own experiment); a patch and the
    capture at the same hook see the patch written first. The pass stops after the capture
    (nothing past it, no logits, is computed), so every patch must sit at or before it: a
    patch the pass never reached is refused rather than silently skipped. Returned on the
    captured activation's device, in its dtype.

    Example::

        >>> import torch
        >>> from tl_logitlens.demo import demo_model, induction_prompt
        >>> model = demo_model()
        >>> tokens = induction_prompt(model).repeat(2, 1)  # [2, 25]
        >>> stream = capture(model, tokens, ["blocks.1.hook_resid_pre"])["blocks.1.hook_resid_pre"]
        >>> zero = StreamPatch("blocks.0.hook_resid_pre", torch.tensor([1]), torch.tensor([24]), torch.zeros(1, 64))
        >>> read = run_patched(model, tokens, [zero], "blocks.1.hook_resid_pre", torch.tensor([24, 24]))
        >>> bool(torch.equal(read[0], stream[0, 24])), bool(torch.equal(read[1], stream[1, 24]))
        (True, False)
    """
    by_hook: Dict[str, List[StreamPatch]] = {}
    for patch in patches:
        by_hook.setdefault(patch.hook, []).append(patch)
    fired: set = set()
    store: Dict[str, torch.Tensor] = {}
    rows = torch.arange(tokens.shape[0])

    def make_hook(name: str) -> Callable:
        def hook(tensor: torch.Tensor, hook: Any = None) -> Optional[torch.Tensor]:
            fired.add(name)
            out = _write_patches(tensor, by_hook[name]) if name in by_hook else tensor
            if name == capture_hook:
                store["read"] = out[rows.to(out.device), capture_at.to(out.device)].detach()
                raise _Captured
            return out if name in by_hook else None

        return hook

    names = list(by_hook) + ([] if capture_hook in by_hook else [capture_hook])
    try:
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=[(n, make_hook(n)) for n in names])
    except _Captured:
        pass
    missed = [n for n in by_hook if n not in fired]
    if missed or "read" not in store:
        raise LensInputError(
            f"the patched run never reached hooks {(missed or [capture_hook])[:3]} before {capture_hook}; "
            "patch the stream at or before the hook that is read"
        )
    return store["read"]


def capture_differentiable(model: Any, tokens: torch.Tensor, names: List[str], root: str) -> Dict[str, torch.Tensor]:
    """The activations at hooks ``names`` with their autograd graph, rooted at hook ``root``.

    One forward pass of ``tokens [batch, pos]`` with gradients on and every parameter frozen
    (restored afterwards): the activation at ``root`` is made to require grad, so the graph
    holds only the blocks between ``root`` and the last of ``names``, and
    ``torch.autograd.grad(a later activation, earlier ones, ...)`` is the derivative of the
    model's own computation. The pass stops after the last of ``names`` (no final norm, no
    logits). ``root`` must be one of ``names`` and fire first.

    Example::

        >>> import torch
        >>> from tl_logitlens.demo import demo_model, induction_prompt
        >>> model = demo_model()
        >>> names = ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
        >>> acts = capture_differentiable(model, induction_prompt(model), names, names[0])
        >>> acts[names[1]].requires_grad, any(p.requires_grad is False for p in model.parameters())
        (True, False)
    """
    store: Dict[str, torch.Tensor] = {}

    def make_hook(name: str) -> Callable:
        def hook(tensor: torch.Tensor, hook: Any = None) -> None:
            if name == root:
                # In place, not a returned copy: a bridge's residual connection reads the tensor its
                # hook saw. With every parameter frozen it is a leaf, so this roots the graph here.
                if tensor.grad_fn is not None:
                    raise LensInputError(f"the activation at {root} already has a graph; cannot root a derivative")
                tensor.requires_grad_(True)
            elif root not in store:
                raise LensInputError(f"hook {name} fired before the root {root} of the derivative")
            store[name] = tensor
            if len(store) == len(names):
                raise _Captured

        return hook

    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        with torch.enable_grad():
            model.run_with_hooks(tokens, fwd_hooks=[(n, make_hook(n)) for n in dict.fromkeys(names)])
    except _Captured:
        pass
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
    missing = [n for n in names if n not in store]
    if missing:
        raise LensInputError(f"the forward pass did not reach hooks {missing[:3]}; cannot read them")
    return store
