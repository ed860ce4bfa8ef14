#!/usr/bin/env python
"""Benchmark fitting a Jacobian lens: tl_logitlens.fit_jacobian_lens against TransformerLens 4.3's
``JacobianLens.fit`` on the same prompts and settings, in the same run.

Both compute the same estimator (one-hot cotangents for a block of output coordinates at every
valid position, one backward per block, rows averaged over source positions); the matrices
agree to float32 rounding (checked here, and in tests/test_jacobian.py). Ours stops the forward
pass at the final stream, roots the graph at the lowest fitted entry, and takes more output
coordinates per backward pass (sized from a memory budget; TransformerLens's default is 8).

Models: ``--model small`` (stories260k from ``TL_LOGITLENS_MODELS``, every layer) and
``--model smollm2`` (``/root/.cache/tl-logitlens-models/smollm2-135m``; by default the top
``--depth`` layers, since a full fit costs d_model backward passes through every layer per
prompt: minutes per prompt on a CPU). Each side runs ``--repeats`` times, alternating, and the
fastest of each is compared (a shared machine's load skews single runs). The processor and the
load average are printed beside the ratio.

    python bench/bench_jacobian.py --model small
    python bench/bench_jacobian.py --model smollm2 --prompts 2 --seq 48 --depth 6
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tl_logitlens as tll  # noqa: E402

SMOLLM2 = "/root/.cache/tl-logitlens-models/smollm2-135m"
TEXT = (
    "The history of the city begins with a small market town on the river, where traders met to exchange "
    "grain, wool and salt. Over the centuries the town grew into a centre of learning, with a university, "
    "a cathedral and a famous library that drew scholars from across the continent. Today it is known for "
    "its museums, its parks and the old bridge that still carries people across the water every morning."
)


def processor() -> str:
    from tl_logitlens.kernel.tuning import processor_name

    return processor_name()


def load(which: str):
    from transformer_lens.model_bridge import TransformerBridge

    if which == "small":
        root = os.environ.get("TL_LOGITLENS_MODELS", "/work/shared/models")
        path = os.path.join(root, "stories260k")
    else:
        path = SMOLLM2
    if not os.path.isdir(path):
        sys.exit(f"model folder {path} is absent (set TL_LOGITLENS_MODELS or run /work/shared/models/fetch.py)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(path, device="cpu").eval()


def prompts(model, n: int) -> list:
    words = TEXT.split()
    return [" ".join(words[i:] + words[:i]) for i in range(0, 7 * n, 7)][:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["small", "smollm2"], default="small")
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None, help="max_seq_len")
    parser.add_argument("--skip", type=int, default=16, help="skip_first_positions")
    parser.add_argument("--depth", type=int, default=None, help="fit the top DEPTH source layers (default: all)")
    parser.add_argument("--dims", type=int, default=None, help="our dims_per_pass (default: from the budget)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from transformer_lens.tools.analysis.jacobian_lens import JacobianLens as TLJacobianLens

    small = args.model == "small"
    n_prompts = args.prompts or (8 if small else 2)
    seq = args.seq or (64 if small else 48)
    depth = args.depth if args.depth is not None else (None if small else 6)
    model = load(args.model)
    n_layers = model.cfg.n_layers
    theirs_layers = list(range(n_layers - 1)) if depth is None else list(range(n_layers - 1 - depth, n_layers - 1))
    ours_layers = [f"{layer + 1}_pre" for layer in theirs_layers]
    texts = prompts(model, n_prompts)
    load_before = os.getloadavg()
    print(
        f"Jacobian-lens fit, {args.model}: {n_layers} layers, d_model {model.cfg.d_model}; {n_prompts} prompts, "
        f"max_seq_len {seq}, skip_first_positions {args.skip}, source layers {theirs_layers[0]}..{theirs_layers[-1]} "
        f"({len(theirs_layers)}); torch threads {torch.get_num_threads()}"
    )
    times = {"transformer_lens": [], "tl_logitlens": []}
    results = {}
    for _ in range(args.repeats):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            results["transformer_lens"] = TLJacobianLens.fit(
                model,
                texts,
                corpus="bench",
                source_layers=theirs_layers,
                max_seq_len=seq,
                skip_first_positions=args.skip,
                show_progress=False,
            )
            times["transformer_lens"].append(time.perf_counter() - start)
            start = time.perf_counter()
            results["tl_logitlens"] = tll.fit_jacobian_lens(
                model,
                texts,
                source_layers=ours_layers,
                max_seq_len=seq,
                skip_first_positions=args.skip,
                dims_per_pass=args.dims,
                progress=False,
            )
            times["tl_logitlens"].append(time.perf_counter() - start)
    theirs, ours = results["transformer_lens"], results["tl_logitlens"]
    worst = max(float((ours.matrices[f"{k + 1}_pre"] - m).abs().max()) for k, m in theirs.jacobians.items())
    best_theirs, best_ours = min(times["transformer_lens"]), min(times["tl_logitlens"])
    load_after = os.getloadavg()
    print(
        f"  TransformerLens JacobianLens.fit (dim_batch 8): {best_theirs:8.2f} s  (runs: {times['transformer_lens']})"
    )
    print(f"  tl_logitlens fit_jacobian_lens:                 {best_ours:8.2f} s  (runs: {times['tl_logitlens']})")
    print(
        f"  ratio ours/TransformerLens: {best_ours / best_theirs:.2f} (speed-up {best_theirs / best_ours:.2f}x); "
        f"largest matrix difference {worst:.2e}; n_prompts {ours.n_prompts} / {theirs.n_prompts}"
    )
    print(
        f"  processor: {processor()} ({os.cpu_count()} logical CPUs; load average before {load_before[0]:.1f}, "
        f"after {load_after[0]:.1f})"
    )


if __name__ == "__main__":
    main()
