#!/usr/bin/env python
"""Benchmark tl_logitlens: every figure a ratio to a reference measured in the same run, plus peak memory.

Models:

- default: a GPT-2-small shape (12 layers, d_model 768, 12 heads, d_mlp 3072, vocabulary 50257)
  with random weights built offline and folded (a ``TransformerBridge`` in compatibility mode on
  transformer-lens 4.x, a folded ``HookedTransformer`` on 2.x/3.x). Nothing is downloaded.
- ``--model FOLDER``: any Hugging Face model folder, booted with
  ``TransformerBridge.boot_transformers`` (e.g. Gemma-3-270m or SmolLM2-135M from
  ``../shared/models/fetch.py``), read on a real prompt of ``--prompt-tokens`` tokens (39 by
  default: 741 vectors x 262,144 on Gemma-3-270m), and its memory over ``--memory-shape`` tokens.

Sections (each reading one ActivationCache, made once per workload):

1. Logit lens (the GPT-2 shape: 1 x 256 and 8 x 512 tokens; a model folder: its prompt), every
   layer: ``floor`` is ``vectors @ W_U`` for the same vectors in float32, only the products timed,
   the fastest (median of a short sweep) of the whole product and row chunks of 256, 1024 and 4096,
   each with ``W_U`` stored ``[d_model, d_vocab]`` or as HF stores ``lm_head.weight``; ``tll`` is
   ``tll.logit_lens(model, cache=cache, input=tokens, top_k=5, targets="next")`` (top-k, entropy,
   KL to final, next-token loss, the next token's logit, probability and rank); ``tll
   (top-k+entropy)`` the same without targets (what transformer-lens's lens answers, plus KL);
   ``transformer-lens``: 4.x ``transformer_lens.tools.analysis.logit_lens(model, cache=cache,
   positions=None, top_k=5)``; ``textbook``: ``accumulated_resid(apply_ln=True) @ W_U + b_U``,
   ``log_softmax``, ``topk``, where its logits fit ``--textbook-budget-gib``.
2. Where the time goes at that shape (``breakdown.py``): the kernel rebuilt one piece at a time.
3. (GPT-2 shape) Per-head DLA at 8 x 512 against ``cache.stack_head_results`` +
   ``cache.logit_attrs``; ``tll.evaluate_lens`` against the plain forward passes plus the floor;
   ``tll.compare_lenses`` (the logit lens and a random tuned lens) against ``evaluate_lens`` plus
   the second lens's floor.

Timing (``timing.py``): after a warm-up call (which measures memory), every method of a section
runs once per round, interleaved with the floor, for ``--rounds`` rounds; ratios are taken within
a round and reported as the median and the quartiles over rounds (``1.07 [1.03-1.12]``). The
header prints the processor, its caches, the threads, the load before the run, the statistics
path (the fused C kernel or eager tensor operations, :mod:`tl_logitlens.kernel.native`) and the
tile shape the kernel measured.

Usage: ``python bench/bench_lens.py [--model FOLDER] [--quick] [--rounds N] [--threads N]
[--clock wall|cpu] [--device cpu|cuda] [--dtype float32|bfloat16] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import breakdown  # noqa: E402
import timing  # noqa: E402
from timing import GiB, MiB, PeakMemory, settle  # noqa: E402

import tl_logitlens as tll  # noqa: E402
from tl_logitlens.evaluate import evaluate_lens  # noqa: E402
from tl_logitlens.inputs import resolve_model  # noqa: E402
from tl_logitlens.kernel import tuning  # noqa: E402
from tl_logitlens.model_access import TL_MAJOR, TL_VERSION  # noqa: E402

N_LAYERS = 12
D_VOCAB = 50257

# Targets (the README's Performance section and issue 21).
TARGET_FLOOR_RATIO = 1.2
TARGET_TL_SPEEDUP = 1.4
TARGET_TL_SPEEDUP_MODEL = 1.5
TARGET_LENS_MEMORY_MIB = 1024
TARGET_DLA_MEMORY_FRACTION = 0.25
TARGET_EVAL_RATIO = 1.3
TARGET_COMPARE_RATIO = 1.2
# A real prompt for model folders (English, then repeated to length).
PROMPT = (
    "The old lighthouse keeper climbed the narrow stairs every evening, lit the great lamp, and watched the "
    "ships pass safely around the rocks. In the morning he wrote in his logbook what he had seen: the weather, "
    "the tides, and the names of the vessels that sailed toward the harbour of the little town."
)


def sync() -> None:
    timing.sync()


# -- models -----------------------------------------------------------------------------------
def build_model() -> Tuple[Any, str]:
    """GPT-2-small shape, random weights, folded. Returns ``(model, description)``."""
    device = timing.DEVICE
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        HookedTransformer = None
    if HookedTransformer is not None:
        cfg = HookedTransformerConfig(
            n_layers=N_LAYERS, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=D_VOCAB, n_ctx=1024,
            act_fn="gelu_new", normalization_type="LN", seed=0, device=device,
        )  # fmt: skip
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
    model = TransformerBridge.boot_transformers(path, device=device)
    shutil.rmtree(path, ignore_errors=True)  # the weights are in memory now
    model.enable_compatibility_mode()
    return model.eval(), "TransformerBridge (random GPT2LMHeadModel(GPT2Config()), compatibility mode: folded)"


def boot_folder(folder: str) -> Tuple[Any, str]:
    """A Hugging Face model folder as a raw ``TransformerBridge`` (what a user of transformer-lens 4 boots)."""
    from transformer_lens.model_bridge import TransformerBridge

    os.environ.setdefault("PIP_NO_INDEX", "1")  # a VLM without its processor must not pip-install anything
    model = TransformerBridge.boot_transformers(folder, device=timing.DEVICE)
    return model.eval(), f"TransformerBridge.boot_transformers({folder!r})"


def prompt_tokens(model: Any, n: int) -> torch.Tensor:
    """``[1, n]`` ids of a real English prompt (repeated to length), BOS first where the tokenizer adds one."""
    ids = model.to_tokens(PROMPT)[0]
    while ids.shape[0] < n:
        ids = torch.cat([ids, ids[1:]])
    return ids[:n].unsqueeze(0)


def lens_hooks(n_layers: int = N_LAYERS) -> List[str]:
    return [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]


def dla_hooks(n_layers: int = N_LAYERS) -> List[str]:
    names = ["hook_embed", "hook_pos_embed", "ln_final.hook_scale"]
    for layer in range(n_layers):
        names += [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]
    return names


def make_cache(model: Any, tokens: torch.Tensor, names: List[str]) -> Any:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(timing.DEVICE), names_filter=list(names))
    return cache


def stack_vectors(cache: Any, n_layers: int, d_model: int) -> torch.Tensor:
    """The accumulated-stream entries ``[(n_layers + 1) * tokens, d_model]`` (float32) for the floor."""
    return torch.stack([cache[name] for name in lens_hooks(n_layers)]).reshape(-1, d_model).float().contiguous()


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
    out = torch.empty(min(chunk, vectors.shape[0]) * width, dtype=vectors.dtype, device=vectors.device)
    out.zero_()  # fault the pages in once, before any timing

    def run() -> float:
        total = 0.0
        with torch.no_grad():
            for start in range(0, vectors.shape[0], chunk):
                x = vectors[start : start + chunk]
                for a in range(0, d_vocab, width):
                    w = W[:, a : a + width] if layout == "W" else W[a : a + width].T
                    o = out[: x.shape[0] * w.shape[1]].view(x.shape[0], w.shape[1])
                    t0 = timing.now()
                    torch.mm(x, w, out=o)
                    total += timing.now() - t0
        return total

    return run


def floor_candidates(rows: int, d_vocab: int) -> List[Tuple[str, int]]:
    """(layout, rows per product) the floor is the fastest of: the whole product where its
    output fits 2 GiB, and row chunks, in either layout of ``W_U``."""
    chunks = [c for c in (256, 1024, 4096) if c < rows]
    if rows * d_vocab * 4 <= 2 * GiB:
        chunks.append(rows)
    return [(layout, c) for layout in ("W", "W_T") for c in chunks]


def choose_floor(W_U: torch.Tensor, vectors: torch.Tensor, rounds: int) -> Tuple[Tuple[str, int], Dict[str, Any]]:
    """The fastest floor candidate by its median over ``rounds`` interleaved rounds."""
    candidates = {
        f"{layout} x {chunk}": (layout, chunk) for layout, chunk in floor_candidates(*vectors.shape[:1], W_U.shape[1])
    }
    fns = {name: floor_fn(W_U, vectors, chunk, layout=layout) for name, (layout, chunk) in candidates.items()}
    sweep = timing.interleaved(fns, rounds, reference=None, memory=False)
    best = min(sweep, key=lambda k: sweep[k]["seconds"]["median"])
    for name, m in sweep.items():
        print(f"  floor candidate {name:>12} rows: median {m['seconds']['median']:.3f} s", flush=True)
    return candidates[best], {k: v["seconds"] for k, v in sweep.items()}


def tl_lens_fn(model: Any, cache: Any) -> Optional[Callable[[], Any]]:
    try:
        from transformer_lens.tools.analysis import logit_lens as tl_logit_lens
    except ImportError:
        return None
    return lambda: tl_logit_lens(model, cache=cache, positions=None, top_k=5)


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


# -- the logit lens -----------------------------------------------------------------------------
def lens_section(
    model: Any, tokens: torch.Tensor, args: argparse.Namespace, floor_choice: Optional[Tuple[str, int]], big: bool
) -> Dict[str, Any]:
    """The lens, the variants and the references at one shape, interleaved with the floor."""
    cfg = model.cfg
    t0 = time.perf_counter()
    cache = make_cache(model, tokens, lens_hooks(cfg.n_layers) + (dla_hooks(cfg.n_layers) if big else []))
    out: Dict[str, Any] = {"shape": list(tokens.shape), "cache_forward_seconds": time.perf_counter() - t0, "notes": []}
    settle()
    W_U = model.W_U.detach().to(args.compute_dtype)
    vectors = stack_vectors(cache, cfg.n_layers, cfg.d_model).to(args.compute_dtype)
    out["rows"] = vectors.shape[0]
    if floor_choice is None:
        floor_choice, out["floor_sweep"] = choose_floor(W_U, vectors, 3)
    out["floor_choice"] = list(floor_choice)
    methods: Dict[str, Callable[[], Any]] = {"floor": floor_fn(W_U, vectors, floor_choice[1], layout=floor_choice[0])}
    methods["tll"] = lambda: tll.logit_lens(model, cache=cache, input=tokens, top_k=5, targets="next")
    if not big or args.all_big:
        methods["tll_topk_entropy"] = lambda: tll.logit_lens(model, cache=cache, top_k=5)
    tl_fn = tl_lens_fn(model, cache)
    if tl_fn is not None:
        methods["transformer_lens"] = tl_fn
    else:
        out["notes"].append(f"transformer_lens.tools.analysis.logit_lens is not in transformer-lens {TL_VERSION}")
    textbook_bytes = 2 * vectors.shape[0] * cfg.d_vocab * 4  # logits + log-probs, float32
    if textbook_bytes <= args.textbook_budget_gib * GiB and not big:
        methods["textbook"] = textbook_fn(model, cache)
    else:
        out["notes"].append(
            f"textbook recipe skipped: its logits and log-probs would take {textbook_bytes / GiB:.1f} GiB"
        )
    rounds = args.big_rounds if big else args.rounds
    once = ("transformer_lens",) if big else ()
    out["methods"] = timing.interleaved(methods, rounds, once=once, progress=_progress)
    out["tile_shapes"] = [dict(s._asdict(), key=k) for k, s in tuning.measured_shapes().items()]
    if not big:
        out["agreement"] = agreement(model, cache, tokens)
        if not args.no_breakdown and timing.DEVICE.type == "cpu":  # on CUDA one product spans the vocabulary
            print("  where the time goes ...", flush=True)
            unembed = resolve_model(model).unembedding("W_U")
            entries = torch.stack([cache[name] for name in lens_hooks(cfg.n_layers)]).reshape(
                cfg.n_layers + 1, -1, cfg.d_model
            )
            out["breakdown"] = breakdown.ladder(
                unembed, entries, methods["tll"], methods["floor"], args.rounds, _progress
            )
    out["_cache"] = cache
    return out


def _progress(message: str) -> None:
    print(f"    {message}", flush=True)


def agreement(model: Any, cache: Any, tokens: torch.Tensor) -> Dict[str, Any]:
    """``tll.logit_lens`` against full logits computed directly (the model's own ``ln_final``,
    ``W_U``, ``b_U``, float64 ``log_softmax``) at the first, middle and final entries: the
    tiled kernel at a real vocabulary. Returns the largest absolute differences."""
    result = tll.logit_lens(model, cache=cache, input=tokens, top_k=5, targets="next")
    names = lens_hooks(model.cfg.n_layers)
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


def memory_section(model: Any, shape: Tuple[int, int]) -> Dict[str, Any]:
    """Peak memory added by one ``tll.logit_lens`` over ``shape`` tokens, the cache already in memory."""
    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    tokens = torch.randint(0, model.cfg.d_vocab, tuple(shape), generator=gen).to(timing.DEVICE)
    cache = make_cache(model, tokens, lens_hooks(model.cfg.n_layers))
    start = time.perf_counter()
    with PeakMemory() as mem:
        tll.logit_lens(model, cache=cache, input=tokens, top_k=5, targets="next")
    return {"shape": list(shape), "memory_mib": mem.added / MiB, "seconds": time.perf_counter() - start}


# -- DLA, evaluation, comparison (GPT-2 shape) -------------------------------------------------------
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


def dla_section(model: Any, cache: Any, tokens: torch.Tensor, args: argparse.Namespace) -> Dict[str, Any]:
    batch = tokens.shape[0]
    gen = torch.Generator().manual_seed(7)
    answers = torch.randint(0, D_VOCAB, (batch,), generator=gen)
    wrong = torch.randint(0, D_VOCAB, (batch,), generator=gen)
    route, route_name = head_results_route(model, cache, answers, wrong)
    last: Dict[str, Any] = {}

    def ours() -> None:
        last["ours"] = tll.direct_logit_attribution(
            model, cache=cache, answers=answers, wrong=wrong, by="head", positions=None
        )

    def theirs() -> None:
        last["route"] = None  # free the previous result before the next run
        last["route"] = route()

    # The route takes ~100 x longer: it runs once (that run also measures its memory).
    methods = timing.interleaved(
        {"tll": ours, "stack_then_attribute": theirs}, args.rounds, reference=None, once=("stack_then_attribute",)
    )
    heads = last["ours"].by_head().reshape(-1, *last["ours"].values.shape[1:])
    return {
        "route": route_name,
        "methods": methods,
        "max_abs_difference": float((heads - last["route"].reshape(heads.shape)).abs().max()),
        "residual_error": last["ours"].residual_error(),
    }


def eval_tokens(args: argparse.Namespace) -> torch.Tensor:
    n_seq, seq, _ = args.eval_shape
    return torch.randint(0, D_VOCAB, (n_seq, seq), generator=torch.Generator().manual_seed(11)).to(timing.DEVICE)


def tuned_lens(model: Any) -> Any:
    """A tuned lens with small random translators (what a trained one costs to apply)."""
    tuned = tll.TunedLens(model)
    gen = torch.Generator().manual_seed(13)
    with torch.no_grad():
        for layer in tuned.translators.values():
            layer.weight.copy_(
                (0.1 * torch.randn(layer.weight.shape, generator=gen) / 768**0.5).to(layer.weight.device)
            )
            layer.bias.copy_((0.1 * torch.randn(layer.bias.shape, generator=gen)).to(layer.bias.device))
    return tuned


def evaluate_section(model: Any, args: argparse.Namespace, floor_choice: Tuple[str, int]) -> Dict[str, Any]:
    """``evaluate_lens`` and ``compare_lenses`` (two lenses) against the forward passes and floors, interleaved:
    ``evaluate / (forward + floor)`` and ``compare / (evaluate + floor)`` within each round."""
    n_seq, seq, bs = args.eval_shape
    tokens = eval_tokens(args)
    W_U = model.W_U.detach().to(args.compute_dtype)
    lenses = {"logit": None, "tuned": tuned_lens(model)}

    def forwards() -> float:
        total = 0.0
        with torch.no_grad():
            for i in range(0, n_seq, bs):
                t0 = timing.now()
                model(tokens[i : i + bs])
                total += timing.now() - t0
        return total

    scored = n_seq * (seq - 1)
    vectors = torch.randn(scored * (N_LAYERS + 1), 768, generator=torch.Generator().manual_seed(12))
    methods = {
        "floor": floor_fn(W_U, vectors.to(timing.DEVICE, args.compute_dtype), floor_choice[1], layout=floor_choice[0]),
        "forward": forwards,
        "evaluate_lens": lambda: evaluate_lens(model, tokens, batch_size=bs, progress=False),
        "compare_lenses": lambda: tll.compare_lenses(model, tokens, lenses, batch_size=bs, progress=False),
    }
    ms = timing.interleaved(methods, args.eval_rounds, progress=_progress)
    f, fw, ev, cp = (ms[k]["runs"] for k in ("floor", "forward", "evaluate_lens", "compare_lenses"))
    return {
        "shape": [n_seq, seq],
        "batch_size": bs,
        "scored_tokens": scored,
        "lenses": list(lenses),
        "methods": ms,
        "evaluate_ratio": timing.spread([e / (a + b) for e, a, b in zip(ev, fw, f)]),
        "compare_ratio": timing.spread([c / (e + b) for c, e, b in zip(cp, ev, f)]),
    }


# -- report -----------------------------------------------------------------------------------
def target(name: str, value: Optional[float], threshold: float, op: str, processor: str) -> Dict[str, Any]:
    met = None if value is None else (value <= threshold if op == "<=" else value >= threshold)
    return {"name": name, "value": value, "threshold": threshold, "op": op, "met": met, "processor": processor}


def print_lens(key: str, w: Dict[str, Any], processor: str) -> None:
    layout, chunk = w["floor_choice"]
    print(f"\nLogit lens, {key} tokens ({w['rows']} vectors; floor: {layout} layout, {chunk} rows per product)")
    print(f"  on {processor}; ratios: median [quartiles] of per-round ratios to the floor of the same round")
    for t in w.get("tile_shapes", []):
        print(
            f"  kernel shape: {t['rows']} rows x {t['width']} columns, {t['strategy']} "
            f"({t['source']}, measured in {t['seconds']:.2f} s)"
        )
    print(f"  {'method':<22}{'median s':>10}{'x floor':>22}{'peak MiB':>10}{'runs':>6}")
    for name, m in w["methods"].items():
        memory = m.get("memory_mib")
        print(
            f"  {name:<22}{m['seconds']['median']:>10.3f}{timing.ratio_text(m):>22}"
            f"{'' if memory is None else f'{memory:.0f}':>10}{len(m['runs']):>6}"
        )
    if "agreement" in w:
        g = w["agreement"]
        print(
            f"  agreement with full float64 logits: max |diff| entropy {g['entropy']:.1e}, KL {g['kl_to_final']:.1e}, "
            f"loss {g['next_token_loss']:.1e}, top logits {g['top_logits']:.1e}; "
            f"same top-1 {g['top1_id_agreement']:.4f}"
        )
    for note in w["notes"]:
        print(f"  note: {note}")
    if "breakdown" in w:
        breakdown.print_ladder(f"logit lens, {key} tokens", w["breakdown"], processor)


def print_report(results: Dict[str, Any]) -> None:
    meta = results["meta"]
    print(f"\ntl_logitlens benchmark: {meta['model']}")
    print(timing.header(meta))
    print(
        f"transformer-lens {meta['transformer_lens']}, device {meta['device']}, {meta['dtype']}; clock {meta['clock']}"
    )
    for key, w in results["lens"].items():
        print_lens(key, w, meta["processor"])
    if "memory" in results:
        mem = results["memory"]
        print(
            f"\nMemory: tll.logit_lens over {mem['shape'][0]}x{mem['shape'][1]} tokens added "
            f"{mem['memory_mib']:.0f} MiB ({mem['seconds']:.1f} s)"
        )
    d = results.get("dla")
    if d:
        print(f"\nPer-head DLA, 8x512, all positions ({d['route']})")
        for name, m in d["methods"].items():
            print(f"  {name:<26}{m['seconds']['median']:>10.2f} s{m['memory_mib']:>9.0f} MiB{len(m['runs']):>6} runs")
        print(
            f"  max |difference| between the two: {d['max_abs_difference']:.2e}; "
            f"residual error {d['residual_error']:.2e}"
        )
    e = results.get("evaluate")
    if e:
        print(
            f"\nStreaming evaluation, {e['shape'][0]}x{e['shape'][1]} tokens, batch {e['batch_size']}, "
            f"on {meta['processor']}"
        )
        for name, m in e["methods"].items():
            print(f"  {name:<26} median {m['seconds']['median']:>8.3f} s{m['memory_mib']:>8.0f} MiB")
        r, c = e["evaluate_ratio"], e["compare_ratio"]
        print(f"  evaluate_lens / (forward + floor) = {r['median']:.3f} [{r['low']:.2f}-{r['high']:.2f}]")
        print(
            f"  compare_lenses ({' + '.join(e['lenses'])}) / (evaluate_lens + floor) = {c['median']:.3f} "
            f"[{c['low']:.2f}-{c['high']:.2f}]"
        )
    print(f"\nTargets (medians of per-round ratios, on {meta['processor']})")
    for t in results["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        met = "n/a" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
        print(f"  {t['name']:<62}{value:>10} {t['op']} {t['threshold']:<8g} {met}")
    for note in results["notes"]:
        print(f"note: {note}")


def collect_targets(results: Dict[str, Any], model_mode: bool) -> List[Dict[str, Any]]:
    cpu = results["meta"]["processor"]
    targets = []
    for key, w in results["lens"].items():
        m = w["methods"]
        targets.append(
            target(f"{key}: tll.logit_lens / floor", m["tll"]["ratio"]["median"], TARGET_FLOOR_RATIO, "<=", cpu)
        )
        if "transformer_lens" in m:
            tl = m["transformer_lens"]["ratio"]["median"]
            threshold = TARGET_TL_SPEEDUP_MODEL if model_mode else TARGET_TL_SPEEDUP
            targets.append(
                target(
                    f"{key}: transformer-lens lens / tll.logit_lens (all statistics)",
                    tl / m["tll"]["ratio"]["median"],
                    threshold,
                    ">=",
                    cpu,
                )
            )
    if "memory" in results:
        targets.append(
            target(
                f"{'x'.join(map(str, results['memory']['shape']))}: peak memory added by tll.logit_lens (MiB)",
                results["memory"]["memory_mib"],
                TARGET_LENS_MEMORY_MIB,
                "<=",
                cpu,
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
                cpu,
            )
        )
        targets.append(
            target(
                "8x512 DLA: tll time / stack-then-attribute time",
                dm["tll"]["seconds"]["median"] / dm["stack_then_attribute"]["seconds"]["median"],
                1.0,
                "<=",
                cpu,
            )
        )
    if "evaluate" in results:
        targets.append(
            target(
                "evaluate_lens / (forward + floor)",
                results["evaluate"]["evaluate_ratio"]["median"],
                TARGET_EVAL_RATIO,
                "<=",
                cpu,
            )
        )
        targets.append(
            target(
                "compare_lenses (2 lenses) / (evaluate_lens + floor)",
                results["evaluate"]["compare_ratio"]["median"],
                TARGET_COMPARE_RATIO,
                "<=",
                cpu,
            )
        )
    return targets  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a Hugging Face model folder (else the random GPT-2-small shape)")
    parser.add_argument("--prompt-tokens", type=int, default=39, help="--model: tokens of the real prompt")
    parser.add_argument("--memory-shape", type=int, nargs=2, default=(8, 512), metavar=("BATCH", "SEQ"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (small workloads)")
    parser.add_argument("--big-rounds", type=int, default=2, help="rounds on the 8x512 lens workload")
    parser.add_argument("--eval-rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the model, the kernel and the floor run")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--eval-shape", type=int, nargs=3, default=(8, 256, 4), metavar=("N", "SEQ", "BATCH"))
    parser.add_argument("--textbook-budget-gib", type=float, default=8.0)
    parser.add_argument("--all-big", action="store_true", help="also run the top-k+entropy variant at 8x512")
    parser.add_argument("--quick", action="store_true", help="only the small lens workload (and its breakdown)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip where-the-time-goes")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall time or this process's CPU time")
    parser.add_argument(
        "--out", default=None, help="results JSON (default bench/results.json, or results-<model>.json)"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    timing.CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    timing.DEVICE = torch.device(args.device)
    if timing.DEVICE.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available here")
    args.model_dtype = getattr(torch, args.dtype)
    # The floor reads W_U as the kernel's products do: float32 on the CPU, the model's dtype on CUDA.
    args.compute_dtype = args.model_dtype if timing.DEVICE.type == "cuda" else torch.float32
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    meta = timing.machine()
    meta.update(transformer_lens=TL_VERSION, tl_logitlens=tll.__version__, python=platform.python_version(),
                clock=args.clock, device=str(timing.DEVICE), dtype=args.dtype,
                memory_method="VmHWM after clear_refs" if timing.HWM_RESET else "1 ms RSS sampling")  # fmt: skip
    print(timing.header(meta), flush=True)
    print(f"building the model (transformer-lens {TL_VERSION}) on {timing.DEVICE} ...", flush=True)
    model, meta["model"] = boot_folder(args.model) if args.model else build_model()
    if timing.DEVICE.type != "cpu" or args.dtype != "float32":
        model = model.to(timing.DEVICE).to(args.model_dtype)
    meta["products"] = "half precision, float32 accumulation" if tuning.half_products(model.W_U) else "float32"
    results: Dict[str, Any] = {"meta": meta, "lens": {}, "notes": []}

    if args.model:
        tokens = prompt_tokens(model, args.prompt_tokens).to(timing.DEVICE)
        key = f"1x{tokens.shape[1]}"
        print(f"logit lens {key} (a real prompt) ...", flush=True)
        results["lens"][key] = lens_section(model, tokens, args, None, False)
        results["lens"][key].pop("_cache")
        if not args.quick:
            print(f"memory over {args.memory_shape[0]}x{args.memory_shape[1]} tokens ...", flush=True)
            results["memory"] = memory_section(model, tuple(args.memory_shape))
    else:
        tokens = torch.randint(0, D_VOCAB, (1, 256), generator=torch.Generator().manual_seed(1256)).to(timing.DEVICE)
        print("logit lens 1x256 ...", flush=True)
        small = lens_section(model, tokens, args, None, False)
        small.pop("_cache")
        results["lens"]["1x256"] = small
        settle()
        if not args.quick:
            tokens = torch.randint(0, D_VOCAB, (8, 512), generator=torch.Generator().manual_seed(8512)).to(
                timing.DEVICE
            )
            print("logit lens 8x512 ...", flush=True)
            big = lens_section(model, tokens, args, tuple(small["floor_choice"]), True)
            cache = big.pop("_cache")
            results["lens"]["8x512"] = big
            results["memory"] = {
                "shape": [8, 512],
                "memory_mib": big["methods"]["tll"]["memory_mib"],
                "seconds": big["methods"]["tll"]["seconds"]["median"],
            }
            print("per-head DLA 8x512 ...", flush=True)
            results["dla"] = dla_section(model, cache, tokens, args)
            del cache
            settle()
            print("streaming evaluation and compare_lenses ...", flush=True)
            results["evaluate"] = evaluate_section(model, args, tuple(small["floor_choice"]))

    results["targets"] = collect_targets(results, bool(args.model))
    meta["load_after"] = [round(x, 2) for x in os.getloadavg()]
    meta["total_seconds"] = time.perf_counter() - started
    if meta["load_before"][0] > 0.5 or meta["busy_other"] > 0.1:
        results["notes"].append(
            f"other work was running when the benchmark started (1-minute load {meta['load_before'][0]}, "
            f"{100 * meta['busy_other']:.0f} % of the CPUs busy): ratios are noisier; the quartiles show how much"
        )
    print_report(results)
    default = "results.json" if not args.model else f"results-{Path(args.model).name}.json"
    out = Path(args.out) if args.out else ROOT / "bench" / default
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {out} ({meta['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
