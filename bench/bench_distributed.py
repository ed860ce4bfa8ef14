#!/usr/bin/env python
"""Benchmark torch.distributed evaluation: 2 processes x 1 thread against 1 process x 2 threads.

Both run ``tll.evaluate_lens`` over the same token tensor (``--rows`` x ``--seq``, seeded) on
the same model; the distributed run is a real ``torchrun --standalone --nproc-per-node 2``
job (gloo, ``OMP_NUM_THREADS=1``, each rank its shard, statistics all-reduced), the single
run one process with ``torch.set_num_threads(2)``. Each times the evaluation alone (model
loaded and a warm-up pass done first; the ranks meet at a barrier before and after), best of
``--repeats``. Reported: tokens per second of each and the ratio distributed / single
(target >= 0.85), 1 process x 1 thread for reference, the token counts (equal), the
processor and the load average (on a shared machine, other work skews the ratio: OpenMP's
threads wait for each other at every operation, separate processes do not).

Training (``train_tuned_lens`` on the same tokens, a real 2-rank torchrun job, ``--train-steps``
steps of ``rows * (seq - 1) // train-steps`` tokens): the bytes each rank sends per step,
counted by wrapping ``torch.distributed.all_reduce`` and ``all_gather_object`` in the job. Per
step one all-reduce carries the translators' gradients as one float32 buffer,
``n_translators * (d_model**2 + d_model) * 4`` bytes, plus the step's loss (4 bytes); a ring
all-reduce puts ``2 * (W - 1) / W`` times that on each rank's wire. The per-step check (failures
and a data fingerprint, ``all_gather_object``) adds a few hundred bytes. No activations travel.

Model: ``--model PATH`` (a Hugging Face folder, e.g. stories260k), or by default a random
GPT-2 (4 layers, d_model 256, vocabulary 8192) written to a temporary folder, so the work is
the forward pass and the unembedding products rather than Python overhead. Loading a folder
needs TransformerBridge (transformer-lens 3.x/4.x).

Usage: ``python bench/bench_distributed.py [--rows 32] [--seq 128] [--repeats 3] [--train-steps 3]
[--only eval|train] [--model PATH] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def processor() -> str:
    from tl_logitlens.kernel.tuning import processor_name  # the package's one reading of the CPU's name

    return processor_name()


def build_model(folder: Path) -> None:
    """A random GPT-2 with a word-level tokenizer, saved as a Hugging Face folder."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=4, n_embd=256, n_head=4, vocab_size=8192, n_positions=256, bos_token_id=1, eos_token_id=1
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(64)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w1", pad_token="w2"
    ).save_pretrained(folder)


def worker(args: argparse.Namespace) -> None:
    """One process of a run (under torchrun: one rank): load, warm up, time evaluate_lens."""
    import torch

    import tl_logitlens as tll
    from tl_logitlens.cli.arguments import load_model
    from tl_logitlens.distributed import init_from_env, is_main_process

    torch.set_num_threads(args.threads)
    distributed = init_from_env(timeout=300)
    torch.set_grad_enabled(False)
    model = load_model(args.model)
    tokens = torch.load(args.tokens)

    def barrier() -> None:
        if distributed:
            torch.distributed.barrier()

    tll.evaluate_lens(model, tokens[: 2 * args.batch_size], batch_size=args.batch_size, progress=False)  # warm-up
    best, n_tokens = float("inf"), 0
    for _ in range(args.repeats):
        barrier()
        started = time.perf_counter()
        ev = tll.evaluate_lens(model, tokens, batch_size=args.batch_size, progress=False)
        barrier()
        best = min(best, time.perf_counter() - started)
        n_tokens = ev.n_tokens
    if is_main_process():
        Path(args.result).write_text(
            json.dumps({"seconds": best, "n_tokens": n_tokens, "kl_mean": ev.mean("kl_to_final").tolist()})
        )


def train_worker(args: argparse.Namespace) -> None:
    """One rank of the training job: count what the collectives carry while train_tuned_lens runs."""
    import pickle

    import torch
    import torch.distributed as dist

    import tl_logitlens as tll
    from tl_logitlens.cli.arguments import load_model
    from tl_logitlens.distributed import init_from_env, is_main_process, rank_and_world

    torch.set_num_threads(args.threads)
    init_from_env(timeout=300)
    sent = {"all_reduce": 0, "all_gather_object": 0, "broadcast": 0}
    real = {name: getattr(dist, name) for name in sent}

    def counting(name):
        def call(*a, **k):
            obj = a[1] if name == "all_gather_object" else a[0]
            sent[name] += len(pickle.dumps(obj)) if name == "all_gather_object" else obj.numel() * obj.element_size()
            return real[name](*a, **k)

        return call

    for name in sent:
        setattr(dist, name, counting(name))
    model = load_model(args.model)
    tokens = torch.load(args.tokens)
    per_step = tokens.shape[0] * (tokens.shape[1] - 1) // args.train_steps
    started = time.perf_counter()
    lens = tll.train_tuned_lens(
        model, tokens, steps=args.train_steps, tokens_per_step=per_step, batch_size=args.batch_size, progress=False
    )
    seconds = time.perf_counter() - started
    if is_main_process():
        Path(args.result).write_text(
            json.dumps(
                {
                    "world": rank_and_world()[1],
                    "steps": args.train_steps,
                    "tokens_per_step": per_step,
                    "n_translators": len(lens.labels),
                    "d_model": lens.d_model,
                    "seconds_per_step": seconds / args.train_steps,
                    "all_reduce_bytes_per_step": sent["all_reduce"] / args.train_steps,
                    "check_bytes_per_step": sent["all_gather_object"] / args.train_steps,
                    "broadcast_bytes_once": sent["broadcast"],
                }
            )
        )


def run(cmd: list, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", help="a Hugging Face model folder (default: a random GPT-2, built here)")
    parser.add_argument("--train-steps", type=int, default=3, help="training steps of the training measurement")
    parser.add_argument("--only", choices=("eval", "train"), help="run one of the two measurements")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--train-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.train_worker:
        train_worker(args)
        return

    import torch

    load = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="tll-bench-dist-"))
    try:
        model = args.model
        if model is None:
            model = str(tmp / "model")
            build_model(Path(model))
            described = "random GPT-2 (4 layers, d_model 256, vocabulary 8192)"
        else:
            described = model
        import json as _json

        vocab = _json.loads((Path(model) / "config.json").read_text())["vocab_size"]
        tokens = torch.randint(0, vocab, (args.rows, args.seq), generator=torch.Generator().manual_seed(0))
        torch.save(tokens, tmp / "tokens.pt")
        common = [
            __file__,
            "--worker",
            "--model",
            model,
            "--tokens",
            str(tmp / "tokens.pt"),
            "--batch-size",
            str(args.batch_size),
            "--repeats",
            str(args.repeats),
        ]
        if args.only != "train":
            run([sys.executable, *common, "--threads", "2", "--result", str(tmp / "single.json")], threads=2)
            run([sys.executable, *common, "--threads", "1", "--result", str(tmp / "one.json")], threads=1)
            run(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc-per-node",
                    "2",
                    *common,
                    "--threads",
                    "1",
                    "--result",
                    str(tmp / "dist.json"),
                ],
                threads=1,
            )
            single = json.loads((tmp / "single.json").read_text())
            dist = json.loads((tmp / "dist.json").read_text())
            one = json.loads((tmp / "one.json").read_text())
        if args.only != "eval":
            train_cmd = [
                __file__,
                "--train-worker",
                "--model",
                model,
                "--tokens",
                str(tmp / "tokens.pt"),
                "--batch-size",
                str(args.batch_size),
                "--train-steps",
                str(args.train_steps),
            ]
            run(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc-per-node",
                    "2",
                    *train_cmd,
                    "--threads",
                    "1",
                    "--result",
                    str(tmp / "train.json"),
                ],
                threads=1,
            )
            train = json.loads((tmp / "train.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"processor: {processor()} ({os.cpu_count()} logical CPUs; load average before {load[0]:.1f}, "
        f"after {os.getloadavg()[0]:.1f}: other work on the machine skews the timings)"
    )
    results = {"processor": processor(), "cpus": os.cpu_count()}
    if args.only != "eval":
        results["training"] = report_training(train, described)
    if args.only != "train":
        results.update(report_eval(args, single, dist, one, described, load))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


def report_training(train: dict, described: str) -> dict:
    """Print and return the training job's bytes per step against the gradients' size."""
    n, d, world = train["n_translators"], train["d_model"], train["world"]
    grads = n * (d * d + d) * 4
    payload = train["all_reduce_bytes_per_step"]
    wire = 2 * (world - 1) / world * payload
    print(
        f"training on {world} ranks ({described}; {train['steps']} steps of {train['tokens_per_step']} tokens, "
        f"{train['seconds_per_step']:.2f} s a step):"
    )
    print(
        f"  all-reduce payload per step and rank: {payload:,.0f} bytes = the translators' gradients "
        f"{n} x ({d}^2 + {d}) x 4 = {grads:,} bytes + {payload - grads:,.0f} (the step's loss)"
    )
    print(f"  on the wire per rank (ring all-reduce, x 2(W-1)/W = {2 * (world - 1) / world:.2f}): {wire:,.0f} bytes")
    print(
        f"  per-step check (failures, data fingerprint; pickled): {train['check_bytes_per_step']:,.0f} bytes; "
        f"once at the start, rank 0's lens broadcast: {train['broadcast_bytes_once']:,} bytes; no activations"
    )
    return dict(train, gradient_bytes=grads, wire_bytes_per_step=wire)


def report_eval(args: argparse.Namespace, single: dict, dist: dict, one: dict, described: str, load: tuple) -> dict:
    assert single["n_tokens"] == dist["n_tokens"], (single, dist)
    rate_1 = single["n_tokens"] / single["seconds"]
    rate_2 = dist["n_tokens"] / dist["seconds"]
    rate_0 = one["n_tokens"] / one["seconds"]
    ratio = rate_2 / rate_1
    results = {
        "load_before": load[0],
        "load_after": os.getloadavg()[0],
        "processor": processor(),
        "cpus": os.cpu_count(),
        "model": described,
        "tokens": single["n_tokens"],
        "rows": args.rows,
        "seq": args.seq,
        "batch_size": args.batch_size,
        "single_2_threads_tok_s": rate_1,
        "torchrun_2x1_tok_s": rate_2,
        "single_1_thread_tok_s": rate_0,
        "ratio": ratio,
        "target": 0.85,
        "max_mean_kl_rel_diff": max(
            abs(a - b) / max(abs(b), 1e-12) for a, b in zip(dist["kl_mean"], single["kl_mean"])
        ),
    }
    print(f"model: {described}; {results['tokens']} scored tokens ({args.rows} x {args.seq}), batch {args.batch_size}")
    print(f"1 process x 2 threads : {rate_1:10.0f} tokens/s")
    print(f"2 processes x 1 thread: {rate_2:10.0f} tokens/s (torchrun, gloo)")
    print(f"1 process x 1 thread  : {rate_0:10.0f} tokens/s (reference: what a second thread adds)")
    print(f"ratio {ratio:.3f} (target >= 0.85: {'met' if ratio >= 0.85 else 'NOT met'})")
    return results


if __name__ == "__main__":
    main()
