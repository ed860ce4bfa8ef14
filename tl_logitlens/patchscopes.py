"""Patchscopes: read a hidden state by letting the model itself say what it holds.

The logit and tuned lenses read a state through the unembedding. A Patchscope (Ghandeharioun et
al., ICML 2024) pastes it into another forward pass, the *target*, and reads what that pass
predicts. The default target is their token-identity prompt :data:`IDENTITY_PROMPT`
(``"cat -> cat\\n1135 -> 1135\\nhello -> hello\\n?"``), patched and read at ``?``: what the model,
primed to repeat, predicts from the pasted state there. Read there it is a next-token reading
(Patchscopes' own use of it): on SmolLM2-135M it agrees with the model's final prediction from far
earlier layers than the logit lens does, and never names the input token itself. To read the token
a state stands for, patch ``?`` and read after an arrow: ``target=IDENTITY_PROMPT + " ->",
target_position=-2, read_position=-1`` (``bench/patchscope_identity.py`` measures both).

:func:`patchscope` returns a :class:`~tl_logitlens.lens.LensResult`: entry ``l`` at source cell
``(b, p)`` is the target run's next-token distribution at ``target_position`` after the source's
stream at entry ``l``, prompt ``b``, position ``p`` replaced the target's stream there (at
``target_layer``, by default the same entry). Every (entry, prompt, position) is its own patched
run; the runs are rows of batched forward passes of the repeated target prompt
(:func:`tl_logitlens.model_access.run_patched`), each stopped at the final stream, which the
package's kernel reads as it reads every lens. So tables, heatmaps, HTML pages, token groups,
targets and the command line take a Patchscope's result unchanged (``lens_name="patchscope"``).
:func:`patchscope_generate` lets the patched target continue as text; :func:`source_token_rate`
measures how often any reading names the source's input token or the model's own prediction.

What the numbers mean here:

- ``top_ids``, ``top_probs``, ``entropy``, ``target_*``, ``group_*``: of the patched target's
  next-token distribution.
- ``kl_to_final``: KL(source || reading), from the source model's own next-token distribution
  at the source position (its final stream read through the same unembedding) to the patched
  reading; NaN when the state comes from another model (an ``ActivationCache`` made by it),
  whose distribution is over another unembedding.
- ``next_token_loss`` and ``targets="next"``: the source's true next input token.

A self-patch (source = target prompt, same entry and position) changes nothing, so every entry
reads the model's own distribution there: the test suite checks it on every model it builds.

A known bias: a few-shot identity prompt pulls readings of early layers towards its own pattern
tokens (``cat``, ``1135``, ``hello``, ``->``, the newline): a state that holds little the model
can name is read as the pattern's next item. Any target prompt may be passed (``target=``);
compare a reading with the logit lens and with another target before trusting it.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .errors import LensInputError
from .inputs import (
    PositionSpec,
    Tokens,
    activation_shape,
    check_cache_belongs,
    check_modes,
    gather_positions,
    position_index,
    resolve_model,
    run_or_read,
    tokenize,
)
from .kernel import compute_dtype, read_rows, require_finite
from .lens import LensResult, cell_targets, check_reproduces_model, lens_result
from .lenses.generation import check_generation, check_room, decode_loop, decode_text, one_entry
from .model_access import (
    ActivationCache,
    ModelView,
    StreamPatch,
    cache_tensor,
    compute_device,
    input_device,
    patched_rows_per_pass,
    run_patched,
)
from .progress import progress_bar
from .stacks import entry_hooks

__all__ = ["IDENTITY_PROMPT", "patchscope", "patchscope_generate", "source_token_rate"]

#: The token-identity target of Ghandeharioun et al.: three words repeated, then the slot ``?``
#: that the source state is pasted over (``target_position=-1``).
IDENTITY_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"

#: What carries a source state into the target's stream (``mapping=``): ``(A, b)``, a Module, a callable, or None.
StateMapping = Union[
    None, Tuple[torch.Tensor, Optional[torch.Tensor]], torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]
]


# -- what was passed, checked before any forward pass ------------------------------------------
def _source(view: ModelView, source: Any) -> Tuple[ModelView, Optional[Tokens], Any]:
    """``(source view, tokens, cache)``: text or ids run on the target model, or a user's cache
    (of this model or of another one, which it records)."""
    if isinstance(source, ActivationCache):
        made_by = getattr(source, "model", None)
        source_view = view if made_by is None or made_by is view.model else resolve_model(made_by)
        check_cache_belongs(source_view, source)
        return source_view, None, source
    return view, tokenize(view, source), None


def _target(view: ModelView, target: Any, target_position: Any) -> Tuple[torch.Tensor, int]:
    """The target prompt's ids ``[1, seq]`` and the absolute position ``target_position`` names in it."""
    tokens = tokenize(view, IDENTITY_PROMPT if target is None else target)
    if tokens.ids.shape[0] != 1:
        raise LensInputError(f"target must be one prompt (a string or ids [pos]), got {tokens.ids.shape[0]} prompts")
    return tokens.ids, _target_index(tokens, target_position, "target_position")


def _target_index(tokens: Tokens, position: Any, name: str) -> int:
    """The absolute position an int ``position`` names in the one-prompt ``tokens``."""
    if isinstance(position, bool) or not isinstance(position, Integral):
        raise LensInputError(f"{name} must be an int (negative counts from the end), got {position!r}")
    index, _ = position_index(int(position), tokens.lengths, tokens.ids.shape[1])
    return int(index[0, 0])


def _target_hooks(view: ModelView, labels: List[str], target_layer: Any, other_model: bool) -> List[str]:
    """The target model's hook patched for each source entry: the same entry, or ``target_layer``."""
    if target_layer is not None:
        return [one_entry(view, target_layer)[1]] * len(labels)
    try:
        return [hook for _, hook in entry_hooks(view, labels)]
    except LensInputError as err:
        if not other_model:
            raise
        raise LensInputError(
            f"the source's entries {labels} are patched into the target at the same entries by default, "
            f"but the target model does not have them all ({err}); pass target_layer= (an entry of the target)"
        ) from None


def _check_batch_size(batch_size: Any) -> None:
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1
    ):
        raise LensInputError(f"batch_size must be a positive int (rows per forward pass) or None, got {batch_size!r}")


# -- mapping a state from one model into another ------------------------------------------------
def _mapping(mapping: StateMapping, d_source: int, d_target: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``mapping`` as a checked ``h [n, d_source] -> [n, d_target]``, probed before any forward pass."""
    if mapping is None:
        if d_source != d_target:
            raise LensInputError(
                f"the source's states are {d_source} wide but the target model's stream is {d_target} wide; "
                f"pass mapping= (A, b) with A [{d_target}, {d_source}], a torch Module or a callable h -> h"
            )
        return lambda h: h
    if isinstance(mapping, (tuple, list)):
        fn = _affine(mapping, d_source, d_target)
    elif callable(mapping):
        fn = _callable(mapping)
    else:
        raise LensInputError(
            f"mapping must be (A, b), a torch Module or a callable h -> h; got {type(mapping).__name__}"
        )
    probe = fn(torch.zeros(2, d_source))
    if not isinstance(probe, torch.Tensor) or tuple(probe.shape) != (2, d_target):
        raise LensInputError(
            f"mapping turns [2, {d_source}] source states into {getattr(probe, 'shape', type(probe).__name__)}, "
            f"but the target model's stream is {d_target} wide: it must return [n, {d_target}]"
        )
    return fn


def _affine(mapping: Sequence[Any], d_source: int, d_target: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``(A, b)``: ``h @ A.T + b``, ``A [d_target, d_source]`` (``nn.Linear``'s layout), ``b [d_target]`` or None."""
    if len(mapping) != 2 or not isinstance(mapping[0], torch.Tensor):
        raise LensInputError(
            "an affine mapping is a pair (A, b): A a tensor [d_target, d_source], b [d_target] or None"
        )
    A, b = mapping
    if A.ndim != 2 or tuple(A.shape) != (d_target, d_source):
        raise LensInputError(
            f"mapping's A has shape {tuple(A.shape)}; it must be [d_target, d_source] = [{d_target}, {d_source}] "
            "(h @ A.T + b, torch.nn.Linear's layout)"
        )
    if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (d_target,)):
        raise LensInputError(f"mapping's b must be None or a tensor [{d_target}], got {getattr(b, 'shape', b)!r}")

    def affine(h: torch.Tensor) -> torch.Tensor:
        out = h @ A.to(device=h.device, dtype=h.dtype).T
        return out if b is None else out + b.to(device=h.device, dtype=h.dtype)

    return affine


def _callable(mapping: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """A Module or a callable, given vectors on its parameters' device and dtype, its answer back in float32."""
    params = next(iter(mapping.parameters()), None) if isinstance(mapping, torch.nn.Module) else None

    def call(h: torch.Tensor) -> torch.Tensor:
        x = h if params is None else h.to(device=params.device, dtype=params.dtype)
        with torch.no_grad():
            out = mapping(x)
        return out.to(device=h.device, dtype=h.dtype) if isinstance(out, torch.Tensor) else out

    return call


# -- the patched runs ----------------------------------------------------------------------------
def _patched_reads(
    view: ModelView,
    target_ids: torch.Tensor,
    at: int,
    read_at: int,
    hooks: List[str],
    states: torch.Tensor,
    batch_size: Optional[int],
    progress: bool,
) -> torch.Tensor:
    """The target's final stream at ``read_at`` after row ``r`` of ``states [rows, d_model]`` was written
    at ``hooks[r]``, position ``at``: ``[rows, d_model]`` in the compute dtype. Rows run ``batch_size``
    at a time (``None``: :func:`~tl_logitlens.model_access.patched_rows_per_pass`)."""
    ids = target_ids[:, : read_at + 1].to(input_device(view))  # later tokens cannot reach it (causal attention)
    n_rows, seq = states.shape[0], ids.shape[1]
    per_pass = batch_size or patched_rows_per_pass(view.model, seq)
    dtype, device = compute_dtype(view.W_U.dtype), compute_device(view)
    reads = []
    bar = progress_bar(n_rows * seq, progress, desc="patchscope")
    for start in range(0, n_rows, per_pass):
        stop = min(n_rows, start + per_pass)
        rows = stop - start
        patches = []
        for hook in dict.fromkeys(hooks[start:stop]):  # each hook once, in order
            local = torch.tensor([r - start for r in range(start, stop) if hooks[r] == hook])
            patches.append(StreamPatch(hook, local, torch.full_like(local, at), states[start + local]))
        read = run_patched(
            view.model, ids.expand(rows, seq), patches, view.final_resid_hook, torch.full((rows,), read_at)
        )
        reads.append(read.to(device=device, dtype=dtype))
        bar.update(rows * seq)
    bar.close()
    return torch.cat(reads)


@dataclass
class _Plan:
    """A Patchscope's arguments, resolved and checked before any forward pass."""

    view: ModelView  # the target model
    source_view: ModelView  # the model whose states are read (the target model unless a cache says otherwise)
    tokens: Optional[Tokens]  # the source's tokens (None for a cache)
    cache: Any  # the source's cache, or None: the target model runs the source
    target_ids: torch.Tensor  # [1, seq]
    at: int  # the target position patched
    labels: List[str]  # the source entries read
    hooks: List[str]  # the target's hook patched for each entry
    carry: Callable[[torch.Tensor], torch.Tensor]  # the mapping into the target's stream

    @property
    def other_model(self) -> bool:
        return self.source_view.model is not self.view.model


def _plan(
    model: Any, source: Any, layers: Any, target: Any, target_layer: Any, target_position: Any, mapping: Any
) -> _Plan:
    view = resolve_model(model)
    source_view, tokens, cache = _source(view, source)
    target_ids, at = _target(view, target, target_position)
    labels = [label for label, _ in entry_hooks(source_view, layers)]
    hooks = _target_hooks(view, labels, target_layer, source_view.model is not view.model)
    carry = _mapping(mapping, source_view.d_model, view.d_model)
    return _Plan(view, source_view, tokens, cache, target_ids, at, labels, hooks, carry)


def _read_index(plan: _Plan, read_position: Any) -> int:
    """The absolute target position read: at or after the patched one, which could not reach it otherwise."""
    lengths = torch.tensor([plan.target_ids.shape[1]])
    read_at = _target_index(Tokens(plan.target_ids, lengths), read_position, "read_position")
    if read_at < plan.at:
        raise LensInputError(
            f"read_position {read_position} is target position {read_at}, before the patched position {plan.at}: "
            "causal attention keeps the patch from reaching it; read at or after target_position"
        )
    return read_at


def _source_cells(plan: _Plan, positions: PositionSpec) -> Tuple[torch.Tensor, torch.Tensor, bool, List[str]]:
    """``(lengths [batch], index [batch, n], drop, hooks)``: the source cells read and the source hooks
    that hold them (a given cache must have them all)."""
    hooks = list(
        dict.fromkeys([h for _, h in entry_hooks(plan.source_view, plan.labels)] + [plan.source_view.final_resid_hook])
    )
    batch, seq = activation_shape(plan.source_view, plan.cache, plan.tokens, hooks, "patchscope")
    lengths = plan.tokens.lengths if plan.tokens is not None else torch.full((batch,), seq)
    index, drop = position_index(positions, lengths, seq)
    return lengths, index, drop, hooks


def _source_states(plan: _Plan, index: torch.Tensor, hooks: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The source's stream ``(states [entry, batch, n, d_target] carried into the target, final
    [batch, n, d_source])`` at the cells ``index``, from one run of the source (or its cache).

    When the package runs the source itself, the final stream's reading is checked against the
    model's own logits first (as :func:`~tl_logitlens.logit_lens` does): a model whose output this
    package cannot reproduce is refused, not read.
    """
    view = plan.source_view
    logits, cache = run_or_read(view, plan.tokens, plan.cache, hooks)
    dtype, device = compute_dtype(view.W_U.dtype), compute_device(view)

    def read(hook: str) -> torch.Tensor:
        x = gather_positions(cache_tensor(cache, hook), index)
        require_finite(x, f"activation {hook!r}")
        return x.to(device=device, dtype=dtype)

    final = read(view.final_resid_hook)
    if logits is not None:
        own = read_rows(view.unembedding("W_U"), final.reshape(1, -1, view.d_model), norm="recompute", top_k=1)
        check_reproduces_model(logits, index, own.top_ids[0], own.top_probs[0], view, final)
    states = torch.stack([read(hook) for _, hook in entry_hooks(view, plan.labels)])  # [entry, batch, n, d]
    carried = plan.carry(states.reshape(-1, view.d_model))
    require_finite(carried, "the source states after mapping=")
    return carried.reshape(*states.shape[:3], -1), final


def patchscope(
    model: Any,
    source: Any,
    *,
    target: Any = None,
    layers: Optional[Sequence[Union[int, str]]] = None,
    positions: PositionSpec = -1,
    target_layer: Union[None, int, str] = None,
    target_position: int = -1,
    read_position: Optional[int] = None,
    top_k: int = 5,
    targets: Any = None,
    mapping: StateMapping = None,
    batch_size: Optional[int] = None,
    progress: bool = True,
) -> LensResult:
    """Read the source's stream at every layer by patching it into a target prompt (a Patchscope).

    For each source entry ``l``, prompt ``b`` and position ``p``, the target prompt runs with its
    stream at ``target_layer`` (default: entry ``l`` itself), position ``target_position``,
    replaced by the source's; the result holds that run's next-token distribution at
    ``target_position`` (or ``read_position``). The module docstring says what each statistic
    means here.

    Args:
        model: the target model (``HookedTransformer`` or ``TransformerBridge``, eval mode), which
            also runs the source unless ``source`` is a cache.
        source: a string, a list of strings (right-padded), token ids ``[batch, pos]``, or an
            ``ActivationCache`` (of ``model``, or of another model: pass ``mapping`` if its width
            differs, and ``target_layer`` if its entries are not the target's).
        target: the target prompt, a string or ids ``[pos]``; ``None`` is :data:`IDENTITY_PROMPT`.
        layers: the source's entries to read, by index into ``0_pre .. final_post`` (negative from
            the end) or label (``"3_mid"`` too); ``None``: every entry ``0_pre .. final_post``.
        positions: the source positions, as for :func:`~tl_logitlens.logit_lens` (default ``-1``:
            each prompt's last token, the position axis dropped).
        target_layer: the target's entry patched for every source entry (an int or a label), or
            ``None``: the same entry as the source's.
        target_position: the target position patched and read (negative from its end).
        read_position: read the patched run at this later target position instead (negative from
            the end): e.g. ``target=tll.IDENTITY_PROMPT + " ->", target_position=-2, read_position=-1``
            reads what the model writes after the arrow, the token the state stands for.
        top_k, targets: as for :func:`~tl_logitlens.logit_lens` (token groups included).
        mapping: what carries a source state into the target's stream: ``(A, b)`` (``h @ A.T + b``,
            ``A [d_target, d_source]``), a ``torch.nn.Module`` or a callable ``h [n, d_source] ->
            [n, d_target]``; ``None``: the state as it is.
        batch_size: patched rows per forward pass of the target; ``None`` fits them to a memory
            budget (:func:`~tl_logitlens.model_access.patched_rows_per_pass`: 256 MiB of activations
            on the CPU, a quarter of the free memory on CUDA).
        progress: show a progress bar over the patched runs.

    Returns:
        A :class:`~tl_logitlens.lens.LensResult` ``[entry, batch, pos, ...]`` with
        ``lens_name="patchscope"``, ``input_ids`` the source's.

    Example::

        >>> import tl_logitlens as tll
        >>> model = tll.demo_model()
        >>> prompt = "red cat sun moon red cat"
        >>> read = tll.patchscope(model, prompt, target=prompt, progress=False)  # a self-patch
        >>> own = tll.logit_lens(model, prompt, positions=-1, layers=["final_post"])
        >>> read.labels, [read.top_tokens()[k][0] == own.top_tokens()[0][0] for k in range(3)]
        (['0_pre', '1_pre', 'final_post'], [True, True, True])
    """
    plan = _plan(model, source, layers, target, target_layer, target_position, mapping)
    view = plan.view
    read_at = plan.at if read_position is None else _read_index(plan, read_position)
    check_modes("recompute", "W_U", top_k, view.d_vocab)
    _check_batch_size(batch_size)
    if not isinstance(progress, bool):
        raise LensInputError(f"progress must be True or False, got {progress!r}")
    lengths, index, drop, hooks = _source_cells(plan, positions)
    cells = cell_targets(view, targets, plan.tokens, index)

    states, final = _source_states(plan, index, hooks)
    n_entries, batch, n_pos = states.shape[:3]
    row_hooks = [hook for hook in plan.hooks for _ in range(batch * n_pos)]
    reads = _patched_reads(
        view, plan.target_ids, plan.at, read_at, row_hooks, states.reshape(-1, view.d_model), batch_size, progress
    )
    return lens_result(
        view,
        cells,
        reads.reshape(n_entries, batch, n_pos, view.d_model),
        None if plan.other_model else final,
        plan.labels,
        tokens=plan.tokens,
        lengths=lengths,
        drop=drop,
        norm="recompute",
        unembed="W_U",
        top_k=int(top_k),
        chunk_size=None,
        lens_name="patchscope",
    )


def patchscope_generate(
    model: Any,
    source: Any,
    *,
    layer: Union[int, str, Sequence[Union[int, str]]],
    position: int = -1,
    target: Any = None,
    target_layer: Union[None, int, str] = None,
    target_position: int = -1,
    mapping: StateMapping = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    seed: int = 0,
) -> Union[str, Dict[str, str]]:
    """Let the patched target continue as text: what the model says about the source's state.

    The source's stream at ``layer``, position ``position`` replaces the target's at
    ``target_layer`` (default: the same entry), ``target_position``; the target then decodes,
    the patch held at its position at every step. Greedy by default; ``do_sample`` draws from the
    patched run's distribution with a generator seeded by ``seed``. Every layer asked is a row of
    the same batched forward passes.

    Args:
        model, target, target_layer, target_position, mapping: as for :func:`patchscope`.
        source: one prompt (a string or ids ``[pos]``) or an ``ActivationCache`` of one prompt.
        layer: one entry (an int or a label), or a list of them.
        position: the source position (negative from the end).
        max_new_tokens: the most tokens added (a row stops at the end-of-text token).

    Returns:
        The continuation's text for one entry; ``{label: text}`` for a list of entries.

    Example::

        >>> import tl_logitlens as tll
        >>> model = tll.demo_model()
        >>> prompt = "red cat sun moon red cat"
        >>> said = tll.patchscope_generate(model, prompt, layer=["0_pre", "final_post"], target=prompt,
        ...                                max_new_tokens=3)
        >>> said["final_post"] == tll.LogitLens().generate(model, prompt, layer="final_post", max_new_tokens=3)
        True
    """
    many = isinstance(layer, (list, tuple))
    if layer is None:
        raise LensInputError("layer must be a stack entry (an int or a label) or a list of them, got None")
    if isinstance(position, bool) or not isinstance(position, Integral):
        raise LensInputError(f"position must be an int (one source position), got {position!r}")
    check_generation(max_new_tokens, do_sample, seed)
    plan = _plan(model, source, layer if many else [layer], target, target_layer, target_position, mapping)
    view = plan.view
    _, index, _, hooks = _source_cells(plan, int(position))
    if index.shape[0] != 1:
        raise LensInputError(f"patchscope_generate reads one source prompt, got {index.shape[0]}; call it per prompt")
    check_room(view, Tokens(plan.target_ids, torch.tensor([plan.target_ids.shape[1]])), max_new_tokens)

    states = _source_states(plan, index, hooks)[0][:, 0, 0]  # [entry, d_model]
    rows = torch.arange(len(plan.labels))
    patches = []
    for hook in dict.fromkeys(plan.hooks):
        mine = rows[[h == hook for h in plan.hooks]]
        patches.append(StreamPatch(hook, mine, torch.full_like(mine, plan.at), states[mine]))
    dtype, device = compute_dtype(view.W_U.dtype), compute_device(view)

    def step(ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        read = run_patched(view.model, ids.to(input_device(view)), patches, view.final_resid_hook, last)
        return read.to(device=device, dtype=dtype)

    start = Tokens(plan.target_ids.expand(len(rows), -1).clone(), torch.full((len(rows),), plan.target_ids.shape[1]))
    new = decode_loop(view, start, step, max_new_tokens=int(max_new_tokens), do_sample=do_sample, seed=seed)
    texts = {label: decode_text(view, ids) for label, ids in zip(plan.labels, new)}
    return texts if many else texts[plan.labels[0]]


def source_token_rate(result: LensResult, *, of: Any = "input", k: int = 1) -> Dict[str, float]:
    """How often each entry's reading names a token of the source: ``{label: rate}``.

    The share of the result's cells (padding left out) whose top ``k`` tokens hold

    - ``of="input"``: the input token at that cell's position (what the state stands for at the
      bottom of the stack; the logit lens of a tied-embedding model reads it back at ``0_pre``);
    - ``of="prediction"``: the top token of the result's own ``final_post`` entry. That is the
      model's next-token prediction for the logit lens (and any lens that leaves ``final_post``
      untouched) and for a Patchscope read where it patches, at the same entries (Patchscopes'
      next-token measure, Ghandeharioun et al. section 4.1); a reading whose ``final_post`` is not the
      model's own (another ``read_position`` or ``target_layer``) passes the prediction's ids instead;
    - ``of=ids``: given token ids per cell, ``[batch, pos]`` like the result's ``positions`` (or
      ``[batch]`` after an int ``positions=``), e.g. ``logit.top_ids[-1, ..., 0]`` of a logit lens of
      the same input.

    Works on any :class:`~tl_logitlens.lens.LensResult` (logit, tuned, any lens, a Patchscope).

    Example::

        >>> import tl_logitlens as tll
        >>> model = tll.demo_model()
        >>> lens = tll.logit_lens(model, "red cat sun moon red cat sun moon")
        >>> rates = source_token_rate(lens, of="prediction")
        >>> sorted(rates), rates["final_post"], source_token_rate(lens, of=lens.top_ids[-1, ..., 0]) == rates
        (['0_pre', '1_pre', 'final_post'], 1.0, True)
    """
    top_k = result.top_ids.shape[-1]
    if isinstance(k, bool) or not isinstance(k, Integral) or not 1 <= k <= top_k:
        raise LensInputError(f"k must be an int in [1, {top_k}] (the result's top_k), got {k!r}")
    top = result.top_ids if result.has_pos_axis else result.top_ids.unsqueeze(2)  # [entry, batch, n, top_k]
    wanted = _wanted_tokens(result, of, top)
    real = result.positions < result.lengths.unsqueeze(1)
    hits = (top[..., :k] == wanted.unsqueeze(0).unsqueeze(-1)).any(-1)  # [entry, batch, n]
    rates = hits[:, real].float().mean(-1)
    return {label: float(rate) for label, rate in zip(result.labels, rates)}


def _wanted_tokens(result: LensResult, of: Any, top: torch.Tensor) -> torch.Tensor:
    """The token ``[batch, n]`` each cell of ``result`` is checked for (see :func:`source_token_rate`)."""
    if isinstance(of, torch.Tensor):
        if of.dtype.is_floating_point or of.dtype == torch.bool:
            raise LensInputError(f"of= token ids must be integers, got dtype {of.dtype}")
        shape = tuple(result.positions.shape) if result.has_pos_axis else (result.positions.shape[0],)
        if tuple(of.shape) != shape:
            raise LensInputError(f"of= token ids must be shaped like the result's cells {shape}, got {tuple(of.shape)}")
        return of.long().cpu().reshape(result.positions.shape)
    if isinstance(of, str) and of == "input":
        if result.input_ids is None:
            raise LensInputError('of="input" needs the input tokens: read the model with text or ids, not a cache')
        return gather_positions(result.input_ids, result.positions)
    if isinstance(of, str) and of == "prediction":
        if "final_post" not in result.labels:
            raise LensInputError('of="prediction" compares with the final_post entry; read it too (layers=None)')
        return top[result.labels.index("final_post"), ..., 0]
    raise LensInputError(f'of must be "input", "prediction" or a tensor of token ids, got {of!r}')
