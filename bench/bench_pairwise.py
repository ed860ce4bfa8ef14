#!/usr/bin/env python
"""Benchmark the pairwise kernel (compare_runs's KL, JS and TV) against the plain products it cannot avoid.

``read_pairs`` reads two sets of ``--rows`` vectors through a ``d_model x --vocab`` unembedding in
two passes (log Z of both, then the sums): four ``[rows, d_model] @ W_U`` products and the per-column
work. Reported, from one run on one processor: the seconds of one plain product ``x @ W_U`` (the
reference), of the full-logits computation in float32 (both products, then log-softmax and the three
sums over ``[rows, vocab]`` held whole: what the kernel avoids), and of ``read_pairs``, each as a
ratio to the plain product; best of ``--repeats``. Shapes default to Gemma-3-270m's unembedding
(d_model 640, vocabulary 262,144) with random weights. On a machine shared with other work, the
ratios are noisy: the processor and the load average are printed beside them.

Usage: ``python bench/bench_pairwise.py [--rows 228] [--d-model 640] [--vocab 262144] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from tl_logitlens.kernel import FinalNorm, Unembedding
from tl_logitlens.kernel.pairwise import read_pairs
from tl_logitlens.kernel.tuning import processor_name


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def full_logits(x: torch.Tensor, y: torch.Tensor, W: torch.Tensor) -> None:
    lp, lq = torch.log_softmax(x @ W, -1), torch.log_softmax(y @ W, -1)
    p, q = lp.exp(), lq.exp()
    lm = torch.logaddexp(lp, lq) - 0.6931471805599453
    (p * (lp - lq)).sum(-1), (p * (lp - lm) + q * (lq - lm)).sum(-1), (p - q).abs().sum(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=228)
    parser.add_argument("--d-model", type=int, default=640)
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(args.d_model, args.vocab, generator=gen) / args.d_model**0.5 * 4
    x, y = torch.randn(args.rows, args.d_model, generator=gen), torch.randn(args.rows, args.d_model, generator=gen)
    u = Unembedding(W, None, FinalNorm(None, None, None, 0.0))
    product = best(lambda: x @ W, args.repeats)
    whole = best(lambda: full_logits(x, y, W), args.repeats)
    tiled = best(lambda: read_pairs(u, x, y, norm="none"), args.repeats)
    print(f"processor: {processor_name()}; threads {torch.get_num_threads()}; load average {os.getloadavg()}")
    print(f"shape: {args.rows} rows per side, d_model {args.d_model}, vocabulary {args.vocab}, float32")
    print(f"plain product x @ W_U:          {product:.3f} s  (1.00 x)")
    print(f"full logits, float32 (whole):   {whole:.3f} s  ({whole / product:.2f} x)")
    print(f"read_pairs (tiled, two passes): {tiled:.3f} s  ({tiled / product:.2f} x)")


if __name__ == "__main__":
    main()
