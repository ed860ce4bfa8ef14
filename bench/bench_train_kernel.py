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

Peak memory added is the RSS high-water mark (``bench_lens.PeakMemory``), or on CUDA
``torch.cuda.max_memory_allocated`` above what was allocated before. Every figure is from one run.

``--full-step`` times instead one whole ``train_tuned_lens`` step on the benchmark model
(``bench_lens.build_model``: GPT-2-small shape, 12 translators) over 4 x 513 tokens (2048
scored), next to the model's own residual-stream forward pass and the product floor; the
forward pass is measured first, so the step's peak memory leaves out its one-off first-call costs.
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

from tl_logitlens.kernel import loss as tk  # noqa: E402
from tl_logitlens.kernel import tuning  # noqa: E402

MiB = 2**20


def measure(fn, device, runs):
    """(best seconds, peak bytes added by the first run) of ``fn``."""

    def once():
        bench_lens.sync()
        t0 = time.perf_counter()
        fn()
        bench_lens.sync()
        return time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = [once()]
        added = torch.cuda.max_memory_allocated() - base
    else:
        with bench_lens.PeakMemory() as mem:
            times = [once()]
        added = mem.added
    for _ in range(runs - 1):
        bench_lens.settle()
        times.append(once())
    return min(times), added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-vocab", type=int, default=50257)
    parser.add_argument("--width", type=int, default=None, help="kernel columns per tile (default: the kernel's)")
    parser.add_argument("--runs", type=int, default=2, help="timed runs per method (the first also measures memory)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument(
        "--full-step", action="store_true", help="time one whole train_tuned_lens step on the benchmark model"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    bench_lens.DEVICE = device
    if args.full_step:
        full_step(device, args.runs)
        return

    g = torch.Generator().manual_seed(0)
    W = (torch.randn(args.d_model, args.d_vocab, generator=g) * 0.05).to(device)
    b = (torch.randn(args.d_vocab, generator=g) * 0.1).to(device)
    x_final = torch.randn(args.tokens, args.d_model, generator=g).to(device)
    x0 = torch.randn(args.layers, args.tokens, args.d_model, generator=g).to(device)
    print(f"processor: {tuning.processor_name(device)}; torch {torch.__version__}; threads {torch.get_num_threads()}")
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
    floors = [bench_lens.floor_fn(W, vectors, args.tokens), bench_lens.floor_fn(W, vectors, args.tokens, 1024)]

    t_kernel, m_kernel = measure(kernel, device, args.runs)
    floor = min(min(f() for _ in range(args.runs)) for f in floors)
    print(f"floor (x @ W, {args.layers * args.tokens} rows): {floor:.3f} s")
    print(
        f"kernel step:    {t_kernel:.3f} s = {t_kernel / floor:.2f} x floor; peak memory added {m_kernel / MiB:.0f} MiB"
    )
    if not args.skip_reference:
        t_ref, m_ref = measure(reference, device, args.runs)
        print(f"reference step: {t_ref:.3f} s = {t_ref / floor:.2f} x floor; peak memory added {m_ref / MiB:.0f} MiB")
        print(f"kernel / reference time: {t_kernel / t_ref:.2f}")
        (lk, gk), (lr, gr) = results["kernel"], results["reference"]
        gap = ((gk - gr).abs().max() / gr.abs().max()).item()
        print(f"agreement: loss {lk:.6f} vs {lr:.6f}; gradient max relative gap {gap:.1e}")


def full_step(device, runs):
    """One ``train_tuned_lens`` step of 2048 tokens on the benchmark model, against its parts."""
    from tl_logitlens.lenses import train_tuned_lens
    from tl_logitlens.model_access import capture

    model, description = bench_lens.build_model()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.W_E.shape[0], (4, 513), generator=g)
    names = bench_lens.lens_hooks()
    print(f"processor: {tuning.processor_name(device)}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"model: {description}; one step of 4 x 513 tokens (2048 scored), {len(names) - 1} translators")

    def step():
        train_tuned_lens(model, tokens, steps=1, tokens_per_step=2048, batch_size=4, progress=False)

    def forward():
        capture(model, tokens.to(bench_lens.DEVICE), names)

    # The forward pass first: its first call's one-off costs (allocator, lazy set-up) are the
    # model's, not training's, and would otherwise be counted in the step's peak.
    t_fwd, m_fwd = measure(forward, device, runs)
    t_step, m_step = measure(step, device, runs)
    with torch.no_grad():
        store = capture(model, tokens.to(bench_lens.DEVICE), names)
    vectors = torch.cat([store[n][:, :-1].reshape(-1, model.cfg.d_model) for n in names[:-1]]).float()
    del store
    floor = bench_lens.floor_fn(model.W_U.detach(), vectors, 2048)
    t_floor = min(floor() for _ in range(runs))
    print(
        f"floor (x @ W_U, {vectors.shape[0]} rows): {t_floor:.3f} s; model forward (residual stream only): "
        f"{t_fwd:.3f} s"
    )
    print(
        f"train step: {t_step:.3f} s; without the forward {t_step - t_fwd:.3f} s = {(t_step - t_fwd) / t_floor:.2f} "
        "x floor; "
        f"peak memory added {m_step / MiB:.0f} MiB (the forward pass alone, measured first: {m_fwd / MiB:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
