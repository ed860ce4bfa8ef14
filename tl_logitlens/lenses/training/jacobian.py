"""Fitting a Jacobian lens: TransformerLens 4.3's estimator, with fewer wasted passes.

Per prompt (truncated to ``max_seq_len`` tokens; valid positions ``V = skip .. seq - 2``), for
every fitted entry ``e`` and output coordinate ``i``::

    J_e[i, :] = mean over t in V of  d( sum over t' in V of h_final[t', i] ) / d h_e[t]

(causal attention makes the sum over ``t'`` a sum over ``t' >= t``), then the mean over prompts.
Each backward pass plants one-hot cotangents for ``k`` output coordinates at every valid
position of ``k`` copies of the prompt; one backward yields those rows for every entry at
once. What differs from TransformerLens (the numbers do not): the forward pass stops at the
final stream (no final norm, no unembedding), the graph is rooted at the lowest fitted entry,
the row sums stay on the model's device, ``k`` is sized from a memory budget rather than 8,
and the entries include ``0_pre`` and (``incl_mid``) the ``_mid`` ones. It reads the model's own
residual stream through hooks, so HookedTransformer, compatibility-mode and folded models
work too (TransformerLens refuses them; a lens fitted on a processed stream cannot be saved
in TransformerLens's format, which reads raw models).

Checkpoints use TransformerLens's fit-checkpoint schema (``jacobian_sum``, ``n_done``,
``next_idx``, ``source_layers``, ``target_layer``, ``skip_first``) with our entries and
settings under ``"tl_logitlens"``; under ``torchrun`` each rank fits its round-robin share of
the prompts and the sums are added exactly.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from ...distributed import EMPTY, guarded, resolve
from ...errors import LensInputError
from ...files import OwnedFolder
from ...inputs import resolve_model
from ...model_access import capture_differentiable, input_device, patched_rows_per_pass, unembed_matches, unembed_sample
from ...progress import progress_bar
from ...stacks import entry_hooks, stack_labels
from ..jacobian import EXTRA_KEY, JacobianLens, tl_layer

__all__ = ["fit_jacobian_lens", "JACOBIAN_CHECKPOINT"]

#: The checkpoint's file name inside ``checkpoint_dir`` (per rank under torchrun: ``.rank{r}of{w}`` added).
JACOBIAN_CHECKPOINT = "jacobian_checkpoint.pt"
_FORMAT = "tl_logitlens.fit_jacobian_lens/1"
_SETTINGS = ("labels", "max_seq_len", "skip_first_positions", "d_model", "n_layers")


def fit_jacobian_lens(
    model: Any,
    data: Any,
    *,
    source_layers: Any = None,
    incl_mid: bool = False,
    max_seq_len: int = 128,
    skip_first_positions: int = 16,
    dims_per_pass: Optional[int] = None,
    progress: bool = True,
    distributed: Optional[bool] = None,
    checkpoint_dir: Optional[Union[str, Path]] = None,
    checkpoint_every: Optional[int] = None,
    resume: bool = True,
) -> JacobianLens:
    """Fit a :class:`~tl_logitlens.lenses.JacobianLens` on ``data`` with TransformerLens 4.3's estimator.

    Args:
        model: a HookedTransformer or TransformerBridge in eval mode (raw, compatibility mode
            or folded: the lens reads the stream the model's hooks show).
        data: prompt strings, or token ids (a ``[n, seq]`` tensor, or a list of id lists or
            1-D tensors); strings are tokenised with ``model.to_tokens`` (BOS as the model
            adds it), as TransformerLens does. A prompt of at most ``skip_first_positions + 1``
            tokens has no valid position: it is skipped, and one warning gives the count.
        source_layers: the stack entries to fit (ints index ``0_pre .. final_post``, or labels
            such as ``"3_pre"``, ``"3_mid"``); ``None``: every ``L_pre`` (TransformerLens's
            layer ``l`` is our ``{l+1}_pre``; ``0_pre`` is the embeddings' output) and every
            ``L_mid`` with ``incl_mid``.
        max_seq_len: prompts are cut to this many tokens.
        skip_first_positions: leading positions left out of the source average.
        dims_per_pass: output coordinates per backward pass (the prompt is replicated that
            many times); ``None``: as many as a memory budget allows, at most 64.
        distributed: ``None`` (a ``torch.distributed`` group if one is initialised), ``True``
            or ``False``: each rank fits every ``world``-th prompt, the sums are added exactly.
        checkpoint_dir, checkpoint_every: write the running sums every ``checkpoint_every``
            prompts (atomically); ``resume=True`` continues from a checkpoint made with the same
            settings and data, and ends with the lens an uninterrupted fit gives.

    Returns:
        The fitted lens (``n_prompts``: the prompts that counted, over every rank).

    Example::

        >>> import tl_logitlens as tll
        >>> model = tll.demo_model()
        >>> lens = tll.fit_jacobian_lens(model, ["red cat sun moon " * 6], skip_first_positions=2, progress=False)
        >>> lens.labels, lens.n_prompts
        (['0_pre', '1_pre'], 1)
    """
    v = resolve_model(model)
    plan = _plan(v, source_layers, incl_mid, max_seq_len, skip_first_positions, dims_per_pass)
    group = resolve(distributed)
    rank, world = (0, 1) if group is None else (group.rank, group.world)
    folder, path = _checkpoint_place(checkpoint_dir, checkpoint_every, rank, world)
    sums = {label: torch.zeros(v.d_model, v.d_model, dtype=torch.float32) for label in plan["labels"]}
    state = {"n_done": 0, "next_idx": 0, "skipped": 0}
    if path is not None and resume and path.is_file():
        state = _resume(path, plan, sums, v.model)
    with guarded(group):
        prompts = _prompts(v, data)
        mine = prompts if group is None else group.shard(prompts)
        mine = [] if mine is EMPTY else mine
        bar = progress_bar(len(mine), progress and (group is None or group.is_main), "fitting Jacobian lens")
        bar.update(state["next_idx"])
        for index in range(state["next_idx"], len(mine)):
            ids = mine[index][: plan["max_seq_len"]]
            if ids.shape[0] <= plan["skip_first_positions"] + 1:
                state["skipped"] += 1
            else:
                for label, rows in _prompt_jacobians(v, ids, plan).items():
                    sums[label] += rows
                state["n_done"] += 1
            state["next_idx"] = index + 1
            bar.update(1)
            if path is not None and state["next_idx"] % checkpoint_every == 0:
                _write_checkpoint(folder, path, plan, sums, state, v.model)
        bar.close()
        if path is not None:
            _write_checkpoint(folder, path, plan, sums, state, v.model)
    counts = torch.tensor([state["n_done"], state["skipped"]], dtype=torch.float64)
    if group is not None:
        group.check()
        group.sum_(list(sums.values()) + [counts])
    n_done, skipped = int(counts[0]), int(counts[1])
    if skipped:
        warnings.warn(
            f"fit_jacobian_lens: skipped {skipped} prompt(s) of at most {plan['skip_first_positions'] + 1} tokens "
            "(no valid position after skip_first_positions)",
            UserWarning,
            stacklevel=2,
        )
    if n_done == 0:
        raise LensInputError(
            f"fit_jacobian_lens: every prompt was too short: a prompt needs more than "
            f"skip_first_positions + 1 = {plan['skip_first_positions'] + 1} tokens; nothing was fitted"
        )
    metadata = {"max_seq_len": plan["max_seq_len"], "skip_first_positions": plan["skip_first_positions"]}
    return JacobianLens(model, {k: s / n_done for k, s in sums.items()}, n_prompts=n_done, metadata=metadata)


def _plan(v: Any, source_layers: Any, incl_mid: bool, max_seq_len: Any, skip: Any, dims: Any) -> Dict[str, Any]:
    """The fit's settings, checked before any forward pass: entries and their hooks, sizes."""
    for name, value, low in (("max_seq_len", max_seq_len, 2), ("skip_first_positions", skip, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise LensInputError(f"{name} must be an int >= {low}, got {value!r}")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
        raise LensInputError(f"dims_per_pass must be None or an int >= 1, got {dims!r}")
    if source_layers is None:
        wanted: List[Any] = [label for label in stack_labels(v.n_layers, bool(incl_mid))[:-1]]
    else:
        wanted = list(source_layers) if isinstance(source_layers, (list, tuple, range)) else [source_layers]
    pairs = entry_hooks(v, wanted)
    if any(label == "final_post" for label, _ in pairs):
        raise LensInputError(
            "source_layers: final_post is the lens's target (its J is the identity); fit the entries below it"
        )
    order = stack_labels(v.n_layers, True)
    pairs = sorted(dict(pairs).items(), key=lambda pair: order.index(pair[0]))
    ((_, target),) = entry_hooks(v, ["final_post"])
    return {
        "labels": [label for label, _ in pairs],
        "hooks": [hook for _, hook in pairs],
        "target": target,
        "max_seq_len": max_seq_len,
        "skip_first_positions": skip,
        "dims": dims,
        "d_model": v.d_model,
        "n_layers": v.n_layers,
    }


def _prompts(v: Any, data: Any) -> List[torch.Tensor]:
    """Every prompt as a 1-D id tensor (strings through ``to_tokens``, as TransformerLens tokenises)."""
    if isinstance(data, str):
        data = [data]
    if isinstance(data, torch.Tensor):
        if data.ndim not in (1, 2) or data.dtype.is_floating_point:
            raise LensInputError(
                f"data: token ids must be an integer tensor [seq] or [n, seq], got {tuple(data.shape)}"
            )
        return list(data.unsqueeze(0) if data.ndim == 1 else data)
    if not isinstance(data, (list, tuple)) or not data:
        raise LensInputError(f"data must be a non-empty list of prompt strings or token ids, got {type(data).__name__}")
    rows = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            rows.append(v.model.to_tokens(item, truncate=False)[0].cpu())
        elif isinstance(item, torch.Tensor) and item.ndim == 1 and not item.dtype.is_floating_point:
            rows.append(item.cpu())
        elif isinstance(item, (list, tuple)) and all(isinstance(t, int) for t in item):
            rows.append(torch.tensor(item, dtype=torch.long))
        else:
            raise LensInputError(f"data[{i}] is a {type(item).__name__}: give prompt strings or lists of token ids")
    return rows


def _dims_per_pass(v: Any, plan: Dict[str, Any], seq: int) -> int:
    """Output coordinates per backward pass: ``dims_per_pass``, else as many as the memory budget allows (at most
    64), fewer when the graph's root is high: every copy also runs the blocks below the root forward, which
    should cost at most a tenth of the ``d_model`` backward passes through the blocks above it."""
    if plan["dims"] is not None:
        return min(plan["dims"], v.d_model)
    below = int(plan["labels"][0].split("_")[0])  # blocks run forward below the root
    above = max(1, v.n_layers - below)  # blocks the backward passes go through
    by_memory = patched_rows_per_pass(v.model, seq) // above
    by_forward = v.d_model * above // (10 * below) if below else v.d_model
    return max(1, min(64, v.d_model, by_memory, max(8, by_forward)))


def _prompt_jacobians(v: Any, ids: torch.Tensor, plan: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """``{label: [d_model, d_model]}``: this prompt's rows, each the mean over valid source positions."""
    seq, d = ids.shape[0], v.d_model
    k = _dims_per_pass(v, plan, seq)
    tokens = ids.to(input_device(v)).unsqueeze(0).expand(k, -1)
    acts = capture_differentiable(v.model, tokens, plan["hooks"] + [plan["target"]], plan["hooks"][0])
    target = acts[plan["target"]]
    sources = [acts[hook] for hook in plan["hooks"]]
    valid = torch.arange(plan["skip_first_positions"], seq - 1, device=target.device)
    copies = torch.arange(k, device=target.device)
    out = {label: torch.zeros(d, d, dtype=torch.float32, device=target.device) for label in plan["labels"]}
    cotangent = torch.zeros_like(target)
    starts = list(range(0, d, k))
    for n, start in enumerate(starts):
        rows = min(k, d - start)
        cotangent.zero_()
        cotangent[copies[:rows, None], valid[None, :], start + copies[:rows, None]] = 1.0
        grads = torch.autograd.grad(target, sources, cotangent, retain_graph=n < len(starts) - 1)
        for label, grad in zip(plan["labels"], grads):
            out[label][start : start + rows] = grad[:rows, valid.to(grad.device)].float().mean(dim=1).to(target.device)
    return {label: m.cpu() for label, m in out.items()}


# -- checkpoints --------------------------------------------------------------------------
def _checkpoint_place(
    checkpoint_dir: Any, every: Any, rank: int, world: int
) -> Tuple[Optional[OwnedFolder], Optional[Path]]:
    if checkpoint_dir is None:
        if every is not None:
            raise LensInputError("checkpoint_every needs checkpoint_dir (the folder the checkpoints go to)")
        return None, None
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise LensInputError(f"checkpoint_every must be an int >= 1 (prompts) with checkpoint_dir, got {every!r}")
    folder = OwnedFolder(checkpoint_dir, overwrite=False, what="fit_jacobian_lens checkpoints")
    name = JACOBIAN_CHECKPOINT if world == 1 else f"{JACOBIAN_CHECKPOINT}.rank{rank}of{world}"
    return folder, folder.path / name


def _settings(plan: Dict[str, Any]) -> Dict[str, Any]:
    return {key: plan[key] for key in _SETTINGS}


def _write_checkpoint(
    folder: OwnedFolder,
    path: Path,
    plan: Dict[str, Any],
    sums: Dict[str, torch.Tensor],
    state: Dict[str, int],
    model: Any,
) -> None:
    """The running sums in TransformerLens's fit-checkpoint schema (ours under ``"tl_logitlens"``), atomically."""
    n_layers = plan["n_layers"]
    theirs = {
        tl_layer(label, n_layers): s.clone() for label, s in sums.items() if tl_layer(label, n_layers) is not None
    }
    ours = {label: s.clone() for label, s in sums.items() if tl_layer(label, n_layers) is None}
    payload = {
        "jacobian_sum": theirs,
        "n_done": state["n_done"],
        "next_idx": state["next_idx"],
        "source_layers": sorted(theirs),
        "target_layer": n_layers - 1,
        "skip_first": plan["skip_first_positions"],
        EXTRA_KEY: {
            "format": _FORMAT,
            "J": ours,
            "skipped": state["skipped"],
            "settings": _settings(plan),
            "unembed_sample": unembed_sample(model),
        },
    }
    folder.write(path.name, lambda tmp: torch.save(payload, tmp))


def _resume(path: Path, plan: Dict[str, Any], sums: Dict[str, torch.Tensor], model: Any) -> Dict[str, int]:
    """Load a checkpoint's sums into ``sums``; refused when made with other settings or on another model."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        ours = saved[EXTRA_KEY]
        if ours.get("format") != _FORMAT:
            raise ValueError(f"format {ours.get('format')!r}")
    except Exception as err:  # a truncated or foreign file: name it
        raise LensInputError(
            f"{path}: not a readable fit_jacobian_lens checkpoint ({type(err).__name__}); delete it or pass "
            "resume=False"
        ) from None
    differ = [
        f"{k}: checkpoint {ours['settings'].get(k)!r}, now {v!r}"
        for k, v in _settings(plan).items()
        if ours["settings"].get(k) != v
    ]
    if differ:
        raise LensInputError(
            f"{path} was made with other settings ({'; '.join(differ)}); pass resume=False to start afresh"
        )
    if not unembed_matches(model, ours["unembed_sample"]):
        raise LensInputError(f"{path} was made on another model (its unembedding differs); pass resume=False")
    for label in sums:
        layer = tl_layer(label, plan["n_layers"])
        sums[label] += (saved["jacobian_sum"][layer] if layer is not None else ours["J"][label]).float()
    return {"n_done": int(saved["n_done"]), "next_idx": int(saved["next_idx"]), "skipped": int(ours["skipped"])}
