"""One streaming pass over a dataset that reads every lens: the driver under
:func:`~tl_logitlens.evaluate.evaluate_lens` and :func:`~tl_logitlens.evaluate.compare_lenses`.

Per batch the model runs once with hooks on the residual stream only (it stops before
``ln_final``); each lens transforms the captured entries; the distinct vectors go through
the kernel (:func:`~tl_logitlens.kernel.read_rows`) in one call whose reference (the final
distribution) every lens shares; the per-token numbers fold into one
:class:`~tl_logitlens.evaluate.running.RunningStats` per lens. Inside a ``torch.distributed`` process
group each rank reads its shard and the statistics are merged exactly before they return.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from ..distributed import EMPTY, guarded, resolve, shard_for
from ..inputs import batches, context_length, split_long, trim
from ..kernel import read_rows, require_finite
from ..lenses import apply_lens, reads_final_untouched
from ..model_access import capture, compute_device, input_device
from ..progress import progress_bar
from ..stacks import required_hooks, stack_labels
from .running import RunningStats


@dataclass
class Run:
    """What one streaming pass leaves: a running statistic per lens and how the data was read."""

    view: Any
    labels: List[str]
    running: List[RunningStats]
    counts: Dict[str, int]
    n_ctx: int
    seconds: float
    ranks: Optional[int] = None  # the process group's size, when the pass ran in one
    main: bool = True  # this process reports (rank 0, or no group)


def stream_lenses(
    view: Any,
    data: Any,
    lenses: List[Any],
    *,
    norm: str,
    batch_size: int,
    max_tokens: Optional[int],
    progress: bool,
    desc: str,
    distributed: Optional[bool] = None,
) -> Run:
    """One streaming pass over ``data`` that reads every lens of ``lenses`` (``None``: the plain lens).

    Per batch the model runs once with hooks on the residual stream only; each lens
    transforms the captured entries; the distinct vectors of every lens go through the
    kernel in one :func:`~tl_logitlens.kernel.read_rows` call, whose reference (the final
    stream's distribution) is shared by all of them: an entry that *is* the final stream
    (``final_post`` of the plain lens or of a TunedLens) is read once, as the reference.
    Returns one :class:`RunningStats` per lens, in order. Inside a process group (see
    :func:`~tl_logitlens.distributed.resolve`) this rank reads its shard of ``data`` and the
    statistics are merged exactly over every rank before they are returned.
    """
    group = resolve(distributed)
    main = group is None or group.is_main

    labels = stack_labels(view.n_layers, False)
    names = required_hooks(view, "accumulated")  # every resid_pre and the final resid_post
    n_ctx = context_length(view)
    counts = {"split": 0, "windows": 0}
    device = compute_device(view)  # where the kernel reads; the tokens go to the embedding's device
    runs = [RunningStats(len(labels)) for _ in lenses]
    last = len(names) - 1
    # Which vectors each lens reads, as keys shared between lenses that read the same thing:
    # ("stream", k) is entry k untouched, (i, k) lens i's own transform of it.
    keys = [
        [
            ("stream", k) if lens is None or (k == last and reads_final_untouched(lens)) else (i, k)
            for k in range(len(names))
        ]
        for i, lens in enumerate(lenses)
    ]
    unique = list(dict.fromkeys(key for lens_keys in keys for key in lens_keys))
    where = {key: j for j, key in enumerate(unique)}
    picks = [torch.tensor([where[key] for key in lens_keys]) for lens_keys in keys]
    reference_entry = where.get(("stream", last))  # the final stream is its own reference

    started = time.perf_counter()
    with guarded(group):
        data, max_tokens = shard_for(group, data, max_tokens)  # the shard step: unchanged without a group
        stream, total = ([], 0) if data is EMPTY else batches(view, data, batch_size)  # EMPTY: fewer items than ranks
        if max_tokens is not None:
            total = max_tokens if total is None else min(total, max_tokens)
        plan = _Plan(lenses, names, labels, unique, picks, reference_entry, device)
        _fold(
            view,
            plan,
            stream,
            runs,
            counts,
            total=total,
            norm=norm,
            max_tokens=max_tokens,
            n_ctx=n_ctx,
            batch_size=batch_size,
            progress=progress and main,
            desc=desc,
        )
    if group is not None:  # every rank's statistics, merged exactly: the same result on every rank
        group.check()
        for r in runs:
            r.all_reduce(group.reduce)
        merged = group.reduce(torch.tensor([counts["split"], counts["windows"]], dtype=torch.int64), "sum")
        counts = {"split": int(merged[0]), "windows": int(merged[1])}
    seconds = time.perf_counter() - started
    if group is not None:
        seconds = float(group.reduce(torch.tensor([seconds], dtype=torch.float64), "max")[0])
    return Run(
        view=view,
        labels=labels,
        running=runs,
        counts=counts,
        n_ctx=n_ctx,
        seconds=seconds,
        ranks=None if group is None else group.world,
        main=main,
    )


@dataclass
class _Plan:
    """What a pass reads per batch: the hooks, and the distinct vectors of every lens
    (``unique`` keys; ``picks[i]`` selects lens ``i``'s entries among them)."""

    lenses: List[Any]
    names: List[str]
    labels: List[str]
    unique: List[Any]
    picks: List[torch.Tensor]
    reference_entry: Optional[int]
    device: Any


def _fold(
    view: Any,
    plan: _Plan,
    stream: Any,
    runs: List[RunningStats],
    counts: Dict[str, int],
    *,
    total: Optional[int],
    norm: str,
    max_tokens: Optional[int],
    n_ctx: Optional[int],
    batch_size: int,
    progress: bool,
    desc: str,
) -> None:
    """Fold this process's batches into ``runs`` (one running statistic per lens)."""
    lenses, names, labels, unique, device = plan.lenses, plan.names, plan.labels, plan.unique, plan.device

    bar = progress_bar(total, progress, desc)
    running = runs[0]  # the counts of tokens and sequences are the same in every lens's
    try:
        for tokens in split_long(stream, n_ctx, batch_size, counts):
            sequences = tokens.sequences
            if max_tokens is not None:
                remaining = max_tokens - running.n_tokens
                if remaining <= 0:
                    break
                rows = tokens.ids.shape[0]
                tokens = trim(tokens, remaining)
                if sequences == rows:
                    sequences = tokens.ids.shape[0]
            ids, lengths = tokens.ids, tokens.lengths
            for r in runs:
                r.n_sequences += int(sequences)
            seq = ids.shape[1]
            scored = torch.arange(seq - 1).unsqueeze(0) < (lengths - 1).unsqueeze(1)  # [b, seq-1]
            n = int(scored.sum())
            if n == 0:
                continue
            store = capture(view.model, ids.to(input_device(view)), names)

            def rows(acts: torch.Tensor) -> torch.Tensor:
                # Scored rows picked on the activation's own device (a split model keeps its
                # layers apart); only they move to the kernel's device.
                return acts[:, :-1][scored.to(acts.device)].to(device)

            final_rows = rows(store[names[-1]])  # [n, d_model]
            entries: Dict[Any, torch.Tensor] = {}
            for k, name in enumerate(names):
                acts = store.pop(name)
                for key in unique:
                    if key[1] != k:
                        continue
                    lens = None if key[0] == "stream" else lenses[key[0]]
                    entries[key] = rows(acts if lens is None else apply_lens(lens, acts, labels[k]))
            del store
            vectors = torch.stack([entries.pop(key) for key in unique])  # [distinct entries, n, d_model]
            require_finite(vectors, "the residual stream")
            next_ids = ids[:, 1:][scored]  # [n]
            flat = read_rows(
                view.unembedding("W_U"),
                vectors,
                norm=norm,
                top_k=1,
                reference=final_rows,
                reference_entry=plan.reference_entry,
                next_tokens=next_ids,
            )
            del vectors, final_rows
            for r, pick in zip(runs, plan.picks):
                r.add(
                    {
                        "kl_to_final": flat.kl_to_reference[pick],
                        "next_token_loss": flat.next_token_loss[pick],
                        "entropy": flat.entropy[pick],
                    },
                    flat.top_ids[pick, :, 0],
                    next_ids,
                )
            bar.update(n)
    finally:
        bar.close()
