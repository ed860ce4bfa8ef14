#!/usr/bin/env python
"""Benchmark one lens-training step: tl_logitlens.kernel.loss against the reference route.

Shape: GPT-2-small's unembedding (d_model 768, vocabulary 50257, random ``W`` and ``b``),
``--layers`` (12) layers x ``--tokens`` (2048) tokens of random normalised lens vectors.

- ``kernel``: ``final_stats`` of the final vectors once, then ``lens_loss(x, W, b, final=...)``
  for all layers at once, ``.sum().backward()`` (KL to final, gradient to ``x``);
- ``reference``: what tuned-lens does: the final layer's log-probabilities once, then per
  layer full ``[tokens, d_vocab]`` logits, ``log_softmax``, KL, and backward one layer at a time;
- ``floor``: ``x @ W`` for the same ``layers x tokens`` vectors, products only timed (the
  fastest of the whole product per 2048-row chunk and 1024-column tiles into one buffer):
  the least a forward pass can cost; a step needs about two such products.

``--full-step`` times instead one whole ``train_tuned_lens`` step on the benchmark model
(``bench_lens.build_model``: GPT-2-small shape, 12 translators) over 4 x 513 tokens (2048
scored), next to the model's own residual-stream forward pass and the product floor.

Timing (``timing.py``): every method runs once per round, interleaved with the floor, for
``--rounds`` rounds after a warm-up call (which measures the peak memory added: the RSS
high-water mark, or on CUDA the allocator's peak above what was allocated before); ratios are
taken within each round and printed as the median and quartiles over rounds, with the processor.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_lens  # noqa: E402
import timing  # noqa: E402

from tl_logitlens.kernel import loss as tk  # noqa: E402

MiB = 2**20


def report(name: str, m: dict, processor: str, note: str = "") -> None:
    ratio = f"{timing.ratio_text(m)} x floor" if "ratio" in m else "(the floor)"
    memory = f"; peak memory added {m['memory_mib']:.0f} MiB" if "memory_mib" in m else ""
    print(f"  {name:<30} median {m['seconds']['median']:.3f} s = {ratio} on {processor}{memory}{note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-vocab", type=int, default=50257)
    parser.add_argument("--width", type=int, default=None, help="kernel columns per tile (default: the kernel's)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds after a warm-up")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall time or this process's CPU time")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument(
        "--full-step", action="store_true", help="time one whole train_tuned_lens step on the benchmark model"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    timing.DEVICE = device
    timing.CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    meta = timing.machine()
    print(timing.header(meta), flush=True)
    if args.full_step:
        full_step(device, args.rounds, meta["processor"])
        return

    g = torch.Generator().manual_seed(0)
    W = (torch.randn(args.d_model, args.d_vocab, generator=g) * 0.05).to(device)
    b = (torch.randn(args.d_vocab, generator=g) * 0.1).to(device)
    x_final = torch.randn(args.tokens, args.d_model, generator=g).to(device)
    x0 = torch.randn(args.layers, args.tokens, args.d_model, generator=g).to(device)
    print(f"shape: {args.layers} layers x {args.tokens} tokens, d_model {args.d_model}, d_vocab {args.d_vocab}")

    results = {}
    x = x0.clone().requires_grad_(True)

    def kernel():
        x.grad = None
        fs = tk.final_stats(x_final, W, b, width=args.width)
        loss = tk.lens_loss(x, W, b, final=fs, width=args.width).mean(-1).sum()
        loss.backward()
        results["kernel"] = (loss.item(), x.grad.clone())

    xr = x0.clone().requires_grad_(True)

    def reference():
        xr.grad = None
        with torch.no_grad():
            log_p = torch.log_softmax(x_final @ W + b, -1)
        total = 0.0
        for layer in range(args.layers):
            log_q = torch.log_softmax(xr[layer] @ W + b, -1)
            kl = torch.nn.functional.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
            kl.backward()
            total += kl.item()
            del log_q, kl
        results["reference"] = (total, xr.grad.clone())

    vectors = x0.reshape(-1, args.d_model)
    floors = {
        "whole": bench_lens.floor_fn(W, vectors, args.tokens),
        "tiles": bench_lens.floor_fn(W, vectors, args.tokens, 1024),
    }
    sweep = timing.interleaved(floors, 2, reference=None, memory=False)
    best = min(sweep, key=lambda k: sweep[k]["seconds"]["median"])
    methods = {"floor": floors[best], "kernel": kernel}
    if not args.skip_reference:
        methods["reference"] = reference
    ms = timing.interleaved(methods, args.rounds)
    print(f"floor: x @ W for {args.layers * args.tokens} rows ({best})")
    report("floor", ms["floor"], meta["processor"])
    report("kernel step (loss + gradient)", ms["kernel"], meta["processor"])
    if not args.skip_reference:
        report("reference step", ms["reference"], meta["processor"])
        (lk, gk), (lr, gr) = results["kernel"], results["reference"]
        gap = ((gk - gr).abs().max() / gr.abs().max()).item()
        print(f"agreement: loss {lk:.6f} vs {lr:.6f}; gradient max relative gap {gap:.1e}")


def full_step(device, rounds, processor):
    """One ``train_tuned_lens`` step of 2048 tokens on the benchmark model, against its parts."""
    from tl_logitlens.lenses import train_tuned_lens
    from tl_logitlens.model_access import capture

    model, description = bench_lens.build_model()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.W_E.shape[0], (4, 513), generator=g).to(device)
    names = bench_lens.lens_hooks()
    print(f"model: {description}; one step of 4 x 513 tokens (2048 scored), {len(names) - 1} translators")
    with torch.no_grad():
        store = capture(model, tokens, names)
    vectors = torch.cat([store[n][:, :-1].reshape(-1, model.cfg.d_model) for n in names[:-1]]).float()
    del store

    def step():
        train_tuned_lens(model, tokens, steps=1, tokens_per_step=2048, batch_size=4, progress=False)

    def forward():
        capture(model, tokens, names)

    # The forward pass first: its first call's one-off costs (allocator, lazy set-up) are the
    # model's, not training's, and would otherwise be counted in the step's peak.
    methods = {"floor": bench_lens.floor_fn(model.W_U.detach(), vectors, 2048), "forward": forward, "step": step}
    ms = timing.interleaved(methods, rounds)
    f, fw, st = (ms[k]["runs"] for k in ("floor", "forward", "step"))
    ms["step without the forward"] = {
        "seconds": timing.spread([s - a for s, a in zip(st, fw)]),
        "ratio": timing.spread([(s - a) / b for s, a, b in zip(st, fw, f)]),
    }
    print(f"floor: x @ W_U for {vectors.shape[0]} rows")
    for name in ("floor", "forward", "step", "step without the forward"):
        report(name, ms[name], processor)
    ratio = ms["step without the forward"]["ratio"]["median"]
    print(f"target: the step without the forward at most 2.5 x the floor: {ratio:.2f} on {processor}")


if __name__ == "__main__":
    main()
