#!/usr/bin/env python
"""Benchmark tl_logitlens: every figure is a ratio measured in the same run, plus peak memory.

Model: GPT-2-small shape (12 layers, d_model 768, 12 heads, d_mlp 3072, vocabulary 50257)
with random weights built offline and folded: a ``TransformerBridge`` in compatibility mode
on transformer-lens 4.x, a folded ``HookedTransformer`` on 2.x/3.x. Nothing is downloaded.

Sections (all reading the same ActivationCache, made once per workload):

1. Logit lens, workloads 1 x 256 and 8 x 512 tokens, every layer (13 stack entries):
   - ``floor``: ``vectors @ W_U`` in float32 for the same 13 x tokens vectors, only the
     matrix products timed: the fastest (best of runs) of the whole product, row chunks of
     256, 1024 and 4096, each with ``W [d_model, d_vocab]`` contiguous or as ``W_T.T`` with
     ``W_T [d_vocab, d_model]`` contiguous, picked on the small workload; every ``x floor``
     ratio and target is against it;
   - ``floor (cache tiles)``: the same product a 1024 x 1024 tile at a time into one small
     buffer that is overwritten (the logits never reach main memory, so nothing could read
     them): the stricter bound for a kernel that, like ours, reads tiles while in cache;
   - ``tll``: ``tll.logit_lens(model, cache=cache, input=tokens, top_k=5, targets="next")``
     (top-k, entropy, KL to final, next-token loss, the next token's logit, prob and rank);
   - ``tll (top-k+entropy)``: the same call without ``input``/targets: the request
     transformer-lens's own lens answers (KL is still computed);
   - ``transformer-lens``: 4.x ``transformer_lens.tools.analysis.logit_lens(model,
     cache=cache, positions=None, top_k=5)`` (top-k logits and entropy), where installed;
   - ``textbook``: ``cache.accumulated_resid(apply_ln=True) @ W_U + b_U``, ``log_softmax``,
     ``topk``, un-chunked by definition: skipped when its logits and log-probs would exceed
     ``--textbook-budget-gib``.
2. Per-head DLA at 8 x 512, every position, one answer and one wrong token per prompt:
   ``tll.direct_logit_attribution(..., by="head", positions=None)`` against
   ``cache.stack_head_results(layer=-1, pos_slice=None)`` + ``cache.logit_attrs(...)``
   (or, where those helpers are missing, the same route written out: per-head results
   ``einsum(z, W_O)`` materialised, the cached final-norm scale applied, dotted with the
   answer-minus-wrong direction).
3. Streaming evaluation: ``tll.evaluate_lens`` against plain forward passes plus the floor
   for the same scored tokens.
4. Comparing lenses: ``tll.compare_lenses`` with two lenses (the logit lens and a random
   ``TunedLens``) on the same tokens, against section 3's ``evaluate_lens`` plus the second
   lens's floor (section 3's floor: the same number of vectors).

Timing: ``--repeats`` runs (default 5) after a warm-up for the small workloads; the 8 x 512
lens runs ``--big-repeats`` times (default 2; transformer-lens's lens once), the first of
which also measures memory (the small workload has already warmed everything up). Both the
best and the median are reported; ratios and targets use the best of runs (a shared machine
is noisy: the best is the run least disturbed), the medians' ratios are printed beside.
The header names the processor, its caches, and the tile shape the kernel measured for it
(:mod:`tl_logitlens.kernel.tuning`). ``--device cuda`` (and ``--dtype bfloat16``) runs the model,
the kernel and the floor (then the cuBLAS product in that dtype) on the GPU.
Memory: the resident-set peak *added* by a method over what was live before it (the
cache included), in MiB, read from the kernel's high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) after ``malloc_trim``; a 1 ms RSS-sampling thread where that
reset is not allowed. On ``--device cuda``: the CUDA allocator's peak over what was
allocated before.

Usage: ``python bench/bench_lens.py [--quick] [--threads N] [--clock wall|cpu] [--device cpu|cuda]
[--dtype float32|bfloat16] [--out bench/results.json]``;
``--sweep-budgets 4 16 64`` instead times the lens on 2 x 512 tokens with each kernel memory
budget (MiB) and writes only that to ``--out``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tl_logitlens as tll  # noqa: E402
from tl_logitlens.evaluate import evaluate_lens  # noqa: E402
from tl_logitlens.kernel import tuning  # noqa: E402
from tl_logitlens.model_access import TL_MAJOR, TL_VERSION  # noqa: E402

MiB = 2**20
GiB = 2**30
D_VOCAB = 50257
N_LAYERS = 12

# Targets (see the README / the brief).
TARGET_FLOOR_RATIO = 1.2
TARGET_TL_SPEEDUP = 1.4
TARGET_LENS_MEMORY_MIB = 1024
TARGET_DLA_MEMORY_FRACTION = 0.25
TARGET_EVAL_RATIO = 1.3
TARGET_COMPARE_RATIO = 1.2


# -- memory -------------------------------------------------------------------------------------
_LIBC = None
try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:
    pass


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


HWM_RESET = _can_reset_hwm()


def settle() -> None:
    """Free what Python and malloc hold on to, so the RSS is what is live."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class PeakMemory:
    """Peak memory added while the block runs, in bytes (``.added``): the RSS on the CPU, the
    allocator's high-water mark on ``--device cuda`` (what lives on the GPU)."""

    def __enter__(self) -> PeakMemory:
        settle()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
            self.base = torch.cuda.memory_allocated(DEVICE)
            torch.cuda.reset_peak_memory_stats(DEVICE)
            return self
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        if HWM_RESET:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
            self.added = max(0, torch.cuda.max_memory_allocated(DEVICE) - self.base)
            return
        if HWM_RESET:
            self.peak = _status_kib("VmHWM") * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())
        self.added = max(0, self.peak - self.base)


# -- timing -------------------------------------------------------------------------------------
#: The clock every method is timed with: wall time by default; ``--clock cpu`` uses this
#: process's CPU time, a steadier measure of work when other jobs share the machine (use it
#: with ``--threads 1``: with more threads, time spent waiting at thread barriers counts too).
CLOCK = time.perf_counter
#: ``--device``: where the model, the vectors and the floor's product run.
DEVICE = torch.device("cpu")


def sync() -> None:
    """Wait for the device, so that a clock reading covers the work queued before it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def now() -> float:
    """``CLOCK()`` after the device's queued work has finished (CUDA runs asynchronously)."""
    sync()
    return CLOCK()


def run_method(fn: Callable[[], Any], runs: int, warmup: bool) -> Dict[str, Any]:
    """Run ``fn`` (which returns its own seconds, or None to be timed here) ``runs`` times.

    The first run measures memory; with ``warmup`` it is not timed (a warm-up) and ``runs``
    more follow. Returns ``{"seconds": median, "best": min, "runs": [...], "memory_mib": ...}``.
    """

    def once() -> float:
        sync()
        start = CLOCK()
        inner = fn()
        sync()
        wall = CLOCK() - start
        return float(inner) if isinstance(inner, (int, float)) else wall

    with PeakMemory() as mem:
        first = once()
    times = [] if warmup else [first]
    for _ in range(runs - (0 if warmup else 1)):
        settle()
        times.append(once())
    return {"seconds": statistics.median(times), "best": min(times), "runs": times, "memory_mib": mem.added / MiB}


# -- model ------------------------------------------------------------------------------------
def build_model() -> Tuple[Any, str]:
    """GPT-2-small shape, random weights, folded. Returns ``(model, description)``."""
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        HookedTransformer = None
    if HookedTransformer is not None:
        cfg = HookedTransformerConfig(
            n_layers=N_LAYERS,
            d_model=768,
            n_heads=12,
            d_head=64,
            d_mlp=3072,
            d_vocab=D_VOCAB,
            n_ctx=1024,
            act_fn="gelu_new",
            normalization_type="LN",
            seed=0,
            device=DEVICE,
        )
        model = HookedTransformer(cfg)
        model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
        if TL_MAJOR < 3 and hasattr(model, "setup"):
            model.setup()
        return model.eval(), "HookedTransformer (random GPT-2-small shape, process_weights_: folded)"

    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens.model_bridge import TransformerBridge

    torch.manual_seed(0)
    path = tempfile.mkdtemp(prefix="tll-bench-gpt2-")
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(path)
    vocab = {f"w{i}": i for i in range(64)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w1", pad_token="w2"
    ).save_pretrained(path)
    model = TransformerBridge.boot_transformers(path, device=DEVICE)
    shutil.rmtree(path, ignore_errors=True)  # the weights are in memory now
    model.enable_compatibility_mode()
    return model.eval(), "TransformerBridge (random GPT2LMHeadModel(GPT2Config()), compatibility mode: folded)"


def lens_hooks() -> List[str]:
    return [f"blocks.{layer}.hook_resid_pre" for layer in range(N_LAYERS)] + [f"blocks.{N_LAYERS - 1}.hook_resid_post"]


def dla_hooks() -> List[str]:
    names = ["hook_embed", "hook_pos_embed", "ln_final.hook_scale"]
    for layer in range(N_LAYERS):
        names += [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]
    return names


def make_cache(model: Any, tokens: torch.Tensor, names: List[str]) -> Any:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(DEVICE), names_filter=list(names))
    return cache


def stack_vectors(cache: Any) -> torch.Tensor:
    """The 13 accumulated-stream entries ``[13 * tokens, d_model]`` (float32) for the floor."""
    return torch.stack([cache[name] for name in lens_hooks()]).reshape(-1, 768).float().contiguous()


# -- methods ----------------------------------------------------------------------------------
def floor_fn(
    W_U: torch.Tensor, vectors: torch.Tensor, chunk: int, columns: Optional[int] = None, layout: str = "W"
) -> Callable[[], float]:
    """``vectors @ W_U`` ``chunk`` rows (and ``columns`` vocabulary columns) at a time into one
    preallocated buffer; returns the seconds spent in the matrix products only.

    ``layout="W"``: ``x @ W`` with ``W [d_model, d_vocab]`` contiguous; ``"W_T"``: ``x @ W_T.T``
    with ``W_T [d_vocab, d_model]`` contiguous (how HF stores ``lm_head.weight``)."""
    d_vocab = W_U.shape[1]
    width = d_vocab if columns is None else columns
    W = W_U.contiguous() if layout == "W" else W_U.T.contiguous()

    def run() -> float:
        out = torch.empty(min(chunk, vectors.shape[0]) * width, dtype=vectors.dtype, device=vectors.device)
        out.zero_()  # fault the pages in before timing
        total = 0.0
        with torch.no_grad():
            for start in range(0, vectors.shape[0], chunk):
                x = vectors[start : start + chunk]
                for a in range(0, d_vocab, width):
                    w = W[:, a : a + width] if layout == "W" else W[a : a + width].T
                    o = out[: x.shape[0] * w.shape[1]].view(x.shape[0], w.shape[1])
                    sync()
                    t0 = CLOCK()
                    torch.mm(x, w, out=o)
                    sync()
                    total += CLOCK() - t0
        return total

    return run


def floor_candidates(rows: int) -> List[Tuple[str, int]]:
    """(layout, rows per product) the floor is the fastest of: the whole product where its
    output fits 2 GiB, and row chunks, in either layout of ``W_U``."""
    chunks = [c for c in (256, 1024, 4096) if c < rows]
    if rows * D_VOCAB * 4 <= 2 * GiB:
        chunks.append(rows)
    return [(layout, c) for layout in ("W", "W_T") for c in chunks]


def tl_lens_fn(model: Any, cache: Any) -> Optional[Callable[[], Any]]:
    try:
        from transformer_lens.tools.analysis import logit_lens as tl_logit_lens
    except ImportError:
        return None

    def run() -> Any:
        return tl_logit_lens(model, cache=cache, positions=None, top_k=5)

    return run


def textbook_fn(model: Any, cache: Any) -> Callable[[], Any]:
    W_U, b_U = model.W_U.detach(), model.b_U.detach()

    def run() -> Any:
        with torch.no_grad():
            stack = cache.accumulated_resid(apply_ln=True)
            logits = stack @ W_U + b_U
            del stack
            logp = logits.log_softmax(-1)
            del logits
            top = logp.topk(5, dim=-1)
        return top.values, top.indices

    return run


def head_results_route(
    model: Any, cache: Any, answers: torch.Tensor, wrong: torch.Tensor
) -> Tuple[Callable[[], Any], str]:
    """The stack-then-attribute route: TransformerLens's helpers where they exist, else written out."""
    n_layers = model.cfg.n_layers
    result_keys = [f"blocks.{layer}.attn.hook_result" for layer in range(n_layers)]

    def drop_results() -> None:  # the helper caches per-head results in the cache: remove them
        for key in result_keys:
            cache.cache_dict.pop(key, None)

    def helpers() -> Any:
        try:
            with torch.no_grad():
                stack = cache.stack_head_results(layer=-1, pos_slice=None)
                attrs = cache.logit_attrs(stack, tokens=answers, incorrect_tokens=wrong, pos_slice=None)
                del stack
            return attrs
        finally:
            drop_results()

    def written_out() -> Any:
        with torch.no_grad():
            pieces = []
            for layer in range(n_layers):
                z = cache[f"blocks.{layer}.attn.hook_z"]
                W_O = model.blocks[layer].attn.W_O.detach().reshape(model.cfg.n_heads, model.cfg.d_head, -1)
                pieces.append(torch.einsum("bphk,hkd->hbpd", z, W_O))
            stack = torch.cat(pieces)  # [layer*head, batch, pos, d_model]
            del pieces
            scale = cache["ln_final.hook_scale"]  # [batch, pos, 1]
            scaled = (stack - stack.mean(-1, keepdim=True)) / scale
            del stack
            direction = model.W_U.detach()[:, answers].T - model.W_U.detach()[:, wrong].T  # [batch, d_model]
            return (scaled * direction[None, :, None, :]).sum(-1)

    try:  # does this cache have the helpers?
        probe = cache.stack_head_results(layer=1, pos_slice=0)
        del probe
        drop_results()
        return helpers, "cache.stack_head_results(layer=-1, pos_slice=None) + cache.logit_attrs(...)"
    except Exception:  # noqa: BLE001 - any failure means: write the route out
        drop_results()
        return written_out, "written out: einsum(z, W_O) stack [layer*head, batch, pos, d_model], cached LN scale, dot"


# -- sections ---------------------------------------------------------------------------------
def lens_section(
    model: Any,
    batch: int,
    seq: int,
    args: argparse.Namespace,
    floor_chunk: Optional[int],
    big: bool,
    extra_hooks: List[str],
) -> Dict[str, Any]:
    gen = torch.Generator().manual_seed(batch * 1000 + seq)
    tokens = torch.randint(0, D_VOCAB, (batch, seq), generator=gen).to(DEVICE)
    t0 = time.perf_counter()
    cache = make_cache(model, tokens, lens_hooks() + extra_hooks)
    forward_seconds = time.perf_counter() - t0
    settle()
    W_U = model.W_U.detach().to(args.compute_dtype)
    vectors = stack_vectors(cache).to(args.compute_dtype)
    n_tokens = batch * seq
    out: Dict[str, Any] = {
        "tokens": n_tokens,
        "shape": [batch, seq],
        "rows": vectors.shape[0],
        "cache_forward_seconds": forward_seconds,
        "methods": {},
        "notes": [],
    }
    runs = args.big_repeats if big else args.repeats
    warm = not big  # the big workload is warmed up by the small one

    # The floor: the fastest (best of runs) of the whole product, row chunks and either layout
    # of W_U, chosen on the small workload and reused on the big one.
    methods = out["methods"]
    if floor_chunk is None:
        sweep = {}
        for layout, chunk in floor_candidates(vectors.shape[0]):
            sweep[(layout, chunk)] = run_method(floor_fn(W_U, vectors, chunk, layout=layout), runs, True)
            print(
                f"  floor candidate {layout:>3} x {chunk:>5} rows: best {sweep[(layout, chunk)]['best']:.3f} s",
                flush=True,
            )
        floor_chunk = min(sweep, key=lambda k: sweep[k]["best"])
        out["floor_sweep"] = {f"{k[0]} x {k[1]}": v for k, v in sweep.items()}
        methods["floor"] = sweep[floor_chunk]
    else:
        methods["floor"] = run_method(floor_fn(W_U, vectors, floor_chunk[1], layout=floor_chunk[0]), runs, warm)
    out["floor_chunk"] = list(floor_chunk)
    methods["floor_cache_tiles"] = run_method(floor_fn(W_U, vectors, 1024, columns=1024), runs, warm)
    del vectors
    settle()

    def tll_full() -> Any:
        return tll.logit_lens(model, cache=cache, input=tokens, top_k=5, targets="next")

    def tll_same() -> Any:
        return tll.logit_lens(model, cache=cache, top_k=5)

    methods["tll"] = run_method(tll_full, runs, warm)
    if not big or args.all_big:
        methods["tll_topk_entropy"] = run_method(tll_same, runs, warm)
    tl_fn = tl_lens_fn(model, cache)
    if tl_fn is not None:
        methods["transformer_lens"] = run_method(tl_fn, 1 if big else runs, warm)
    else:
        out["notes"].append(f"transformer_lens.tools.analysis.logit_lens is not in transformer-lens {TL_VERSION}")
    entries = N_LAYERS + 1
    textbook_bytes = 2 * entries * n_tokens * D_VOCAB * 4  # logits + log-probs, float32
    out["textbook_estimated_gib"] = textbook_bytes / GiB
    if textbook_bytes <= args.textbook_budget_gib * GiB:
        methods["textbook"] = run_method(textbook_fn(model, cache), runs, warm)
    else:
        out["notes"].append(
            f"textbook recipe skipped: its logits and log-probs would take {textbook_bytes / GiB:.1f} GiB "
            f"(> --textbook-budget-gib {args.textbook_budget_gib:g})"
        )
    floor = methods["floor"]
    for m in methods.values():
        # Best of the runs over the floor's best (a shared machine is noisy); medians beside.
        m["ratio_to_floor"] = m["best"] / floor["best"]
        m["ratio_to_floor_median"] = m["seconds"] / floor["seconds"]
        m["ratio_to_cache_tiles"] = m["best"] / methods["floor_cache_tiles"]["best"]
    out["tile_shapes"] = [dict(s._asdict(), key=k) for k, s in tuning.measured_shapes().items()]
    if not big:
        out["agreement"] = agreement(model, cache, tokens)
    out["_cache"] = cache
    out["_tokens"] = tokens
    return out


def agreement(model: Any, cache: Any, tokens: torch.Tensor) -> Dict[str, Any]:
    """``tll.logit_lens`` against full logits computed directly (the model's own ``ln_final``,
    ``W_U``, ``b_U``, float64 ``log_softmax``) at the first, middle and final entries: the
    tiled kernel at a real vocabulary. Returns the largest absolute differences."""
    result = tll.logit_lens(model, cache=cache, input=tokens, top_k=5, targets="next")
    names = lens_hooks()
    W_U, b_U = model.W_U.detach(), model.b_U.detach()
    worst = {"entropy": 0.0, "kl_to_final": 0.0, "next_token_loss": 0.0, "top_logits": 0.0}
    same_top1 = 0
    with torch.no_grad():

        def logits_of(name: str) -> torch.Tensor:
            return (model.ln_final(cache[name]) @ W_U + b_U).double()

        final = torch.log_softmax(logits_of(names[-1]), -1)
        for entry in (0, len(names) // 2, len(names) - 1):
            logits = logits_of(names[entry])
            logp = torch.log_softmax(logits, -1)
            ours = {
                "entropy": (result.entropy[entry], -(logp.exp() * logp).sum(-1)),
                "kl_to_final": (result.kl_to_final[entry], (final.exp() * (final - logp)).sum(-1)),
                "next_token_loss": (
                    result.next_token_loss[entry][:, :-1],
                    -logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0],
                ),
                "top_logits": (result.top_logits[entry], logits.topk(5, dim=-1).values),
            }
            for key, (mine, theirs) in ours.items():
                worst[key] = max(worst[key], float((mine.double() - theirs).abs().max()))
            same_top1 += int((result.top_ids[entry][..., 0] == logits.argmax(-1)).sum())
    worst["top1_id_agreement"] = same_top1 / (3 * tokens.numel())
    return worst


def dla_section(model: Any, cache: Any, tokens: torch.Tensor, args: argparse.Namespace) -> Dict[str, Any]:
    batch = tokens.shape[0]
    gen = torch.Generator().manual_seed(7)
    answers = torch.randint(0, D_VOCAB, (batch,), generator=gen)
    wrong = torch.randint(0, D_VOCAB, (batch,), generator=gen)

    def ours() -> Any:
        return tll.direct_logit_attribution(model, cache=cache, answers=answers, wrong=wrong, by="head", positions=None)

    route, route_name = head_results_route(model, cache, answers, wrong)
    last: Dict[str, Any] = {}

    def ours_kept() -> Any:
        last["ours"] = ours()

    def route_kept() -> Any:
        last["route"] = None  # free the previous result before the next run
        last["route"] = route()

    out: Dict[str, Any] = {"route": route_name, "methods": {}}
    out["methods"]["tll"] = run_method(ours_kept, args.repeats, True)
    # The route takes ~100 x longer: one run, which also measures its memory.
    out["methods"]["stack_then_attribute"] = run_method(route_kept, 1, False)
    # Sanity: both give the same per-head numbers.
    att, theirs = last["ours"], last["route"]
    heads = att.by_head().reshape(-1, *att.values.shape[1:])
    out["max_abs_difference"] = float((heads - theirs.reshape(heads.shape)).abs().max())
    out["residual_error"] = att.residual_error()
    return out


def budget_sweep(model: Any, budgets_mib: List[int], args: argparse.Namespace) -> Dict[str, Any]:
    """``tll.logit_lens`` on 2 x 512 tokens with each kernel budget: seconds, memory, ratio to the floor."""
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, D_VOCAB, (2, 512), generator=gen).to(DEVICE)
    cache = make_cache(model, tokens, lens_hooks())
    W_U = model.W_U.detach().float().contiguous()
    vectors = stack_vectors(cache)
    out: Dict[str, Any] = {"shape": [2, 512], "floor": run_method(floor_fn(W_U, vectors, 4096), 2, True), "budgets": {}}
    del vectors
    try:
        for mib in budgets_mib:
            tuning.set_chunk_budget(mib * MiB)
            m = run_method(lambda: tll.logit_lens(model, cache=cache, input=tokens, top_k=5, targets="next"), 2, True)
            m["ratio_to_floor"] = m["seconds"] / out["floor"]["seconds"]
            out["budgets"][str(mib)] = m
            print(
                f"  budget {mib:>5} MiB: {m['seconds']:.2f} s, x floor {m['ratio_to_floor']:.3f}, "
                f"{m['memory_mib']:.0f} MiB",
                flush=True,
            )
    finally:
        tuning.set_chunk_budget(None)
    return out


def evaluate_section(model: Any, args: argparse.Namespace, floor_chunk: Tuple[str, int]) -> Dict[str, Any]:
    n_seq, seq, bs = args.eval_shape
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, D_VOCAB, (n_seq, seq), generator=gen)
    W_U = model.W_U.detach().to(args.compute_dtype)
    tokens = tokens.to(DEVICE)
    # warm-up on one short batch
    evaluate_lens(model, tokens[:1, :32], progress=False)

    def evaluate() -> Any:
        return evaluate_lens(model, tokens, batch_size=bs, progress=False)

    def forwards() -> float:
        total = 0.0
        with torch.no_grad():
            for i in range(0, n_seq, bs):
                t0 = now()
                model(tokens[i : i + bs].to(DEVICE))
                total += now() - t0
        return total

    scored = n_seq * (seq - 1)
    gen = torch.Generator().manual_seed(12)
    vectors = torch.randn(scored * (N_LAYERS + 1), 768, generator=gen).to(DEVICE, args.compute_dtype)
    out: Dict[str, Any] = {"shape": [n_seq, seq], "batch_size": bs, "scored_tokens": scored, "methods": {}}
    out["methods"]["evaluate_lens"] = run_method(evaluate, args.eval_repeats, False)
    out["methods"]["forward"] = run_method(forwards, args.eval_repeats, False)
    out["methods"]["floor"] = run_method(
        floor_fn(W_U, vectors, floor_chunk[1], layout=floor_chunk[0]), args.eval_repeats, False
    )
    # Best of the runs (a shared machine is noisy); the medians' ratio beside it.
    ms = out["methods"]
    out["ratio_to_forward_plus_floor"] = ms["evaluate_lens"]["best"] / (ms["forward"]["best"] + ms["floor"]["best"])
    out["ratio_to_forward_plus_floor_median"] = ms["evaluate_lens"]["seconds"] / (
        ms["forward"]["seconds"] + ms["floor"]["seconds"]
    )
    return out


def compare_section(model: Any, args: argparse.Namespace, evaluated: Dict[str, Any]) -> Dict[str, Any]:
    """``tll.compare_lenses`` with two lenses (the logit lens and a random TunedLens) on the
    evaluation's tokens, against that section's ``evaluate_lens`` plus the second lens's floor
    (the same floor: the best row-chunked product for 13 x scored-token vectors)."""
    n_seq, seq, bs = args.eval_shape
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, D_VOCAB, (n_seq, seq), generator=gen).to(DEVICE)  # the evaluation's tokens
    tuned = tll.TunedLens(model)
    gen = torch.Generator().manual_seed(13)
    with torch.no_grad():
        for layer in tuned.translators.values():
            layer.weight.copy_(
                (0.1 * torch.randn(layer.weight.shape, generator=gen) / 768**0.5).to(layer.weight.device)
            )
            layer.bias.copy_((0.1 * torch.randn(layer.bias.shape, generator=gen)).to(layer.bias.device))
    lenses = {"logit": None, "tuned": tuned}
    tll.compare_lenses(model, tokens[:1, :32], lenses, progress=False)  # warm-up

    def compare() -> Any:
        return tll.compare_lenses(model, tokens, lenses, batch_size=bs, progress=False)

    out: Dict[str, Any] = {"shape": [n_seq, seq], "batch_size": bs, "lenses": list(lenses), "methods": {}}
    out["methods"]["compare_lenses"] = run_method(compare, args.eval_repeats, False)
    ms, ev = out["methods"], evaluated["methods"]
    out["ratio"] = ms["compare_lenses"]["best"] / (ev["evaluate_lens"]["best"] + ev["floor"]["best"])
    out["ratio_median"] = ms["compare_lenses"]["seconds"] / (ev["evaluate_lens"]["seconds"] + ev["floor"]["seconds"])
    return out


# Where the kernel's time goes: torch operator names grouped by the work they do.
PROFILE_GROUPS = {
    "product": ("aten::mm", "aten::addmm", "aten::matmul", "aten::bmm", "aten::einsum"),
    "exponentials": ("aten::exp", "aten::exp2", "aten::log"),
    "top-k and picks": (
        "aten::topk",
        "aten::amax",
        "aten::max",
        "aten::index",
        "aten::index_put_",
        "aten::_index_put_impl_",
        "aten::nonzero",
        "aten::gather",
        "aten::gt",
        "aten::any",
        "aten::cat",
        "aten::sort",
    ),
    "sums and shifts": (
        "aten::sum",
        "aten::mul",
        "aten::mul_",
        "aten::add",
        "aten::add_",
        "aten::sub_",
        "aten::maximum",
    ),
    "transfers and copies": (
        "aten::copy_",
        "aten::to",
        "aten::_to_copy",
        "aten::clone",
        "aten::contiguous",
        "aten::stack",
    ),
}


def profile_section(model: Any, args: argparse.Namespace) -> Dict[str, Any]:
    """One ``tll.logit_lens`` on 1 x 256 tokens under ``torch.profiler``: self time per group of operators."""
    gen = torch.Generator().manual_seed(1256)
    tokens = torch.randint(0, D_VOCAB, (1, 256), generator=gen).to(DEVICE)
    cache = make_cache(model, tokens, lens_hooks())
    tll.logit_lens(model, cache=cache, input=tokens, top_k=5, targets="next")  # warm-up, measures the shape
    activities = [torch.profiler.ProfilerActivity.CPU]
    if DEVICE.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        tll.logit_lens(model, cache=cache, input=tokens, top_k=5, targets="next")
    attr = "self_device_time_total" if DEVICE.type == "cuda" else "self_cpu_time_total"
    groups = {name: 0.0 for name in PROFILE_GROUPS}
    groups["other"] = 0.0
    for event in prof.key_averages():
        seconds = float(getattr(event, attr, 0.0) or 0.0) / 1e6
        group = next((g for g, names in PROFILE_GROUPS.items() if event.key in names), "other")
        groups[group] += seconds
    total = sum(groups.values()) or 1.0
    return {
        "seconds": groups,
        "fractions": {k: v / total for k, v in groups.items()},
        "total_seconds": total,
        "clock": attr,
    }


# -- report -----------------------------------------------------------------------------------
def target(name: str, value: Optional[float], threshold: float, op: str) -> Dict[str, Any]:
    met = None if value is None else (value <= threshold if op == "<=" else value >= threshold)
    return {"name": name, "value": value, "threshold": threshold, "op": op, "met": met}


def print_table(results: Dict[str, Any]) -> None:
    print()
    print(f"tl_logitlens benchmark: {results['meta']['model']}")
    print(
        f"processor: {results['meta']['processor']}; caches {results['meta']['caches']}; device "
        f"{results['meta']['device']}, "
        f"{results['meta']['dtype']}; the kernel's products: {results['meta'].get('products', 'float32')}"
    )
    print(
        f"transformer-lens {results['meta']['transformer_lens']}, torch {results['meta']['torch']}, "
        f"{results['meta']['threads']} threads, {results['meta']['clock']} clock, load before "
        f"{results['meta']['load_before']}, "
        f"after {results['meta']['load_after']}"
    )
    for key, w in results["lens"].items():
        layout, chunk = w["floor_chunk"]
        print(f"\nLogit lens, {key} tokens ({w['rows']} vectors; floor: {layout} layout, {chunk} rows per product)")
        for t in w.get("tile_shapes", []):
            print(
                f"  kernel shape: {t['rows']} rows x {t['width']} columns, {t['strategy']} ({t['source']}, "
                f"measured in {t['seconds']:.2f} s)"
            )
        print(
            "  "
            f"{'method':<26}{'best s':>9}{'median s':>10}{'x floor':>9}{'(median)':>10}{'x tiles':>9}"
            f"{'peak MiB':>10}{'runs':>6}"
        )
        for name, m in w["methods"].items():
            print(
                "  "
                f"{name:<26}{m['best']:>9.3f}{m['seconds']:>10.3f}{m['ratio_to_floor']:>9.3f}{m['ratio_to_floor_median']:>10.3f}"
                f"{m['ratio_to_cache_tiles']:>9.3f}{m['memory_mib']:>10.0f}{len(m['runs']):>6}"
            )
        if "agreement" in w:
            g = w["agreement"]
            print(
                f"  agreement with full float64 logits: max |diff| entropy {g['entropy']:.1e}, KL "
                f"{g['kl_to_final']:.1e}, "
                f"loss {g['next_token_loss']:.1e}, top logits {g['top_logits']:.1e}; same top-1 "
                f"{g['top1_id_agreement']:.4f}"
            )
        for note in w["notes"]:
            print(f"  note: {note}")
    d = results.get("dla")
    if d:
        print(f"\nPer-head DLA, 8x512, all positions ({d['route']})")
        print(f"  {'method':<26}{'seconds':>10}{'peak MiB':>11}{'runs':>6}")
        for name, m in d["methods"].items():
            print(f"  {name:<26}{m['seconds']:>10.2f}{m['memory_mib']:>11.0f}{len(m['runs']):>6}")
        print(
            f"  max |difference| between the two: {d['max_abs_difference']:.2e}; residual error "
            f"{d['residual_error']:.2e}"
        )
    pr = results.get("profile")
    if pr:
        print(f"\nWhere tll.logit_lens's time goes, 1x256 ({pr['clock']}, {pr['total_seconds']:.2f} s in operators)")
        for name, fraction in pr["fractions"].items():
            print(f"  {name:<26}{pr['seconds'][name]:>9.3f} s{100 * fraction:>7.1f} %")
    e = results.get("evaluate")
    if e:
        print(f"\nStreaming evaluation, {e['shape'][0]}x{e['shape'][1]} tokens, batch {e['batch_size']}")
        for name, m in e["methods"].items():
            print(f"  {name:<26} best {m['best']:>8.3f} s, median {m['seconds']:>8.3f} s{m['memory_mib']:>8.0f} MiB")
        print(
            f"  evaluate_lens / (forward + floor) = {e['ratio_to_forward_plus_floor']:.3f} (best of runs), "
            f"{e['ratio_to_forward_plus_floor_median']:.3f} (medians)"
        )
    c = results.get("compare")
    if c:
        m = c["methods"]["compare_lenses"]
        print(
            f"\ncompare_lenses ({' + '.join(c['lenses'])}), {c['shape'][0]}x{c['shape'][1]} tokens, batch "
            f"{c['batch_size']}, "
            f"on {results['meta']['processor']}"
        )
        print(
            f"  {'compare_lenses':<26} best {m['best']:>8.3f} s, median {m['seconds']:>8.3f} "
            f"s{m['memory_mib']:>8.0f} MiB"
        )
        print(
            f"  compare_lenses / (evaluate_lens + floor) = {c['ratio']:.3f} (best of runs), {c['ratio_median']:.3f} "
            "(medians)"
        )
    print("\nTargets")
    for t in results["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        met = "n/a" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
        print(f"  {t['name']:<58}{value:>10} {t['op']} {t['threshold']:<8g} {met}")
    for note in results["notes"]:
        print(f"note: {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after a warm-up (small workloads)")
    parser.add_argument("--big-repeats", type=int, default=2, help="runs on the 8x512 lens workload")
    parser.add_argument("--eval-repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the model, the kernel and the floor run")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="the model's dtype; the floor reads W_U in it (on cuda: the cuBLAS product in that dtype)",
    )
    parser.add_argument("--eval-shape", type=int, nargs=3, default=(8, 256, 4), metavar=("N", "SEQ", "BATCH"))
    parser.add_argument("--textbook-budget-gib", type=float, default=8.0)
    parser.add_argument("--all-big", action="store_true", help="also run the top-k+entropy variant at 8x512")
    parser.add_argument("--quick", action="store_true", help="skip the 8x512 workload and the DLA section")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile one 1x256 lens: time in products, exponentials, top-k, sums, transfers",
    )
    parser.add_argument(
        "--sweep-budgets",
        type=int,
        nargs="*",
        metavar="MIB",
        help="only sweep the kernel's memory budget (MiB) on 2x512 tokens, e.g. 4 8 16 32 64",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this process's CPU time (steadier on a shared machine; use with --threads 1)",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    args = parser.parse_args()
    global CLOCK, DEVICE
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    args.model_dtype = getattr(torch, args.dtype)
    # The floor reads W_U as the kernel's products do: float32 on the CPU, the model's dtype on CUDA.
    args.compute_dtype = args.model_dtype if DEVICE.type == "cuda" else torch.float32
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    meta = {
        "transformer_lens": TL_VERSION,
        "torch": torch.__version__,
        "tl_logitlens": tll.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "memory_method": "VmHWM after clear_refs" if HWM_RESET else "1 ms RSS sampling",
        "kernel_budget_mib": tll.DEFAULT_CHUNK_BUDGET_BYTES / MiB,
        "processor": tuning.processor_name(DEVICE),
        "caches": tuning.cache_sizes(),
        "device": str(DEVICE),
        "dtype": args.dtype,
        "repeats": {"small": args.repeats, "big": args.big_repeats, "transformer_lens_big": 1},
    }
    print(f"building the model (transformer-lens {TL_VERSION}) on {DEVICE} ...", flush=True)
    model, description = build_model()
    model = model.to(DEVICE).to(args.model_dtype) if (DEVICE.type != "cpu" or args.dtype != "float32") else model
    meta["model"] = description
    half = tuning.half_products(model.W_U)
    meta["products"] = f"{args.dtype} inputs, float32 accumulation and statistics" if half else "float32"
    results: Dict[str, Any] = {"meta": meta, "lens": {}, "notes": []}
    if args.sweep_budgets:
        print("kernel budget sweep, 2x512 ...", flush=True)
        results["budget_sweep"] = budget_sweep(model, args.sweep_budgets, args)
        meta["load_after"] = [round(x, 2) for x in os.getloadavg()]
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
        return

    print("logit lens 1x256 ...", flush=True)
    small = lens_section(model, 1, 256, args, None, False, [])
    floor_chunk = small["floor_chunk"]
    small.pop("_cache"), small.pop("_tokens")
    results["lens"]["1x256"] = small
    settle()
    if not args.quick:
        print("logit lens 8x512 ...", flush=True)
        big = lens_section(model, 8, 512, args, floor_chunk, True, dla_hooks())
        cache, tokens = big.pop("_cache"), big.pop("_tokens")
        results["lens"]["8x512"] = big
        print("per-head DLA 8x512 ...", flush=True)
        results["dla"] = dla_section(model, cache, tokens, args)
        del cache
        settle()
    if args.profile:
        print("profile 1x256 ...", flush=True)
        results["profile"] = profile_section(model, args)
    print("streaming evaluation ...", flush=True)
    results["evaluate"] = evaluate_section(model, args, floor_chunk)
    print("compare_lenses, two lenses ...", flush=True)
    results["compare"] = compare_section(model, args, results["evaluate"])

    targets = []
    for key, w in results["lens"].items():
        m = w["methods"]
        targets.append(target(f"{key}: tll.logit_lens / floor", m["tll"]["ratio_to_floor"], TARGET_FLOOR_RATIO, "<="))
        if "transformer_lens" in m:
            # The same request (top-k + entropy) where measured; else the full-statistics
            # call, which does strictly more (a conservative stand-in).
            ours = "tll_topk_entropy" if "tll_topk_entropy" in m else "tll"
            targets.append(
                target(
                    f"{key}: transformer-lens lens / {ours} (speed-up)",
                    m["transformer_lens"]["best"] / m[ours]["best"],
                    TARGET_TL_SPEEDUP,
                    ">=",
                )
            )
        if "textbook" in m:
            targets.append(
                target(f"{key}: tll.logit_lens / textbook", m["tll"]["best"] / m["textbook"]["best"], 1.0, "<=")
            )
    if "8x512" in results["lens"]:
        targets.append(
            target(
                "8x512: peak memory added by tll.logit_lens (MiB)",
                results["lens"]["8x512"]["methods"]["tll"]["memory_mib"],
                TARGET_LENS_MEMORY_MIB,
                "<=",
            )
        )
    if "dla" in results:
        dm = results["dla"]["methods"]
        targets.append(
            target(
                "8x512 DLA: tll memory / stack-then-attribute memory",
                dm["tll"]["memory_mib"] / max(dm["stack_then_attribute"]["memory_mib"], 1e-9),
                TARGET_DLA_MEMORY_FRACTION,
                "<=",
            )
        )
        targets.append(
            target(
                "8x512 DLA: tll time / stack-then-attribute time",
                dm["tll"]["seconds"] / dm["stack_then_attribute"]["seconds"],
                1.0,
                "<=",
            )
        )
    targets.append(
        target(
            "evaluate_lens / (forward + floor)",
            results["evaluate"]["ratio_to_forward_plus_floor"],
            TARGET_EVAL_RATIO,
            "<=",
        )
    )
    targets.append(
        target(
            "compare_lenses (2 lenses) / (evaluate_lens + floor)",
            results["compare"]["ratio"],
            TARGET_COMPARE_RATIO,
            "<=",
        )
    )
    results["targets"] = targets
    meta["load_after"] = [round(x, 2) for x in os.getloadavg()]
    meta["total_seconds"] = time.perf_counter() - started
    if meta["load_before"][0] > 0.5:  # the run itself keeps `threads` cores busy, so only the load before counts
        results["notes"].append(
            f"other work was running when the benchmark started (1-minute load {meta['load_before'][0]}): ratios are "
            "noisier"
        )
    if args.big_repeats < 3 and not args.quick:
        results["notes"].append(
            f"8x512 lens: {args.big_repeats} runs (transformer-lens's lens: 1) to keep `make bench` under ~10 minutes; "
            "the first run also measured memory; the 1x256 runs warmed everything up"
        )
    print_table(results)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out} ({meta['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
