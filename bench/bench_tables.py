#!/usr/bin/env python
"""Benchmark ``to_dataframe``: the column-built tables against the row loop they replaced.

Workload: the neuron attribution of every position of 4 prompts x 128 tokens, about 443k rows
(components x 4 x 128). With ``TL_LOGITLENS_MODELS`` set, on stories260k (5 layers x 172
neurons + embed + 5 attention layers = 866 components: 443,392 rows); otherwise on a random
GPT-2-like model of similar size built offline (4 layers, d_mlp 212: 858 components,
439,296 rows). Also the logit-lens table of the same tokens at ``top_k`` 100 (or the
vocabulary, if smaller).

``old`` is the row loop of the previous ``to_dataframe`` (one Python dict per row, each token
decoded per row), reimplemented here as the reference; ``new`` is the package's. Both tables
are checked equal before any time is printed. Times: the old loop once, the new one best of
``--repeats``.

Usage: ``python bench/bench_tables.py [--repeats 3] [--threads N]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Tuple

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tl_logitlens as tll  # noqa: E402
from tl_logitlens.kernel.tuning import processor_name  # noqa: E402


def build_model() -> Tuple[Any, str]:
    """stories260k when TL_LOGITLENS_MODELS points at the real models, else a random GPT-2-like model."""
    folder = os.environ.get("TL_LOGITLENS_MODELS")
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        TransformerBridge = None
    if folder and (Path(folder) / "stories260k").is_dir() and TransformerBridge is not None:
        model = TransformerBridge.boot_transformers(str(Path(folder) / "stories260k"), device="cpu")
        return model.eval(), "stories260k (5 layers, d_mlp 172)"
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        HookedTransformer = None
    if HookedTransformer is not None:
        cfg = HookedTransformerConfig(
            n_layers=4,
            d_model=64,
            n_heads=4,
            d_head=16,
            d_mlp=212,
            d_vocab=512,
            n_ctx=256,
            act_fn="gelu_new",
            normalization_type="LN",
            seed=0,
        )
        return HookedTransformer(cfg).eval(), "random HookedTransformer (4 layers, d_mlp 212)"
    import tempfile

    import transformers

    torch.manual_seed(0)
    path = tempfile.mkdtemp(prefix="tll-bench-tables-")
    config = transformers.GPT2Config(n_layer=4, n_embd=64, n_head=4, n_inner=212, vocab_size=512, n_positions=256)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(512)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w1", pad_token="w2"
    ).save_pretrained(path)
    model = TransformerBridge.boot_transformers(path, device="cpu")
    shutil.rmtree(path, ignore_errors=True)  # the weights are in memory now
    return model.eval(), "random GPT-2 bridge (4 layers, d_mlp 212)"


# -- the previous implementations: one dict per row ---------------------------------------------
def old_attribution_table(att: Any) -> pd.DataFrame:
    values = att.values if att.values.ndim == 3 else att.values.unsqueeze(-1)
    model_value = att.model_value if att.model_value.ndim == 2 else att.model_value.unsqueeze(-1)
    constant = att.constant if att.constant.ndim == 2 else att.constant.unsqueeze(-1)
    records = []
    for c, label in enumerate(att.labels):
        for b in range(values.shape[1]):
            for j in range(values.shape[2]):
                records.append(
                    {
                        "component": label,
                        "batch": b,
                        "pos": int(att.positions[b, j]),
                        "value": float(values[c, b, j]),
                        "model_value": float(model_value[b, j]),
                        "constant": float(constant[b, j]),
                    }
                )
    return pd.DataFrame.from_records(records)


def old_lens_table(result: Any) -> pd.DataFrame:
    expand = (lambda t: t) if result.has_pos_axis else (lambda t: t.unsqueeze(2))  # noqa: E731
    top_ids, top_probs, top_logits = expand(result.top_ids), expand(result.top_probs), expand(result.top_logits)
    metrics = {
        "entropy": expand(result.entropy),
        "kl_to_final": expand(result.kl_to_final),
        "next_token_loss": expand(result.next_token_loss),
    }
    if result.target_ids is not None:
        metrics["target_id"] = expand(result.target_ids)[..., 0]
        metrics["target_prob"] = expand(result.target_probs)[..., 0]
        metrics["target_rank"] = expand(result.target_ranks)[..., 0]
    tokens = result.input_tokens()
    n_layer, batch, n_pos, k = top_ids.shape
    records = []
    for li, label in enumerate(result.labels):
        for b in range(batch):
            for j in range(n_pos):
                pos = int(result.positions[b, j])
                if pos >= int(result.lengths[b]):
                    continue
                cell = {name: value[li, b, j].item() for name, value in metrics.items()}
                for r in range(k):
                    token_id = int(top_ids[li, b, j, r])
                    records.append(
                        {
                            "layer": label,
                            "batch": b,
                            "pos": pos,
                            "input_token": None if tokens is None else tokens[b][j],
                            "rank": r,
                            "token_id": token_id,
                            "token": result.decode(token_id),
                            "prob": float(top_probs[li, b, j, r]),
                            "logit": float(top_logits[li, b, j, r]),
                            **cell,
                        }
                    )
    return pd.DataFrame.from_records(records)


def timed(fn: Any, repeats: int) -> Tuple[Any, float]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the new tables (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model, description = build_model()
    d_vocab = int(model.cfg.d_vocab)
    tokens = torch.randint(3, d_vocab, (4, 128), generator=torch.Generator().manual_seed(0))
    att = tll.direct_logit_attribution(
        model, tokens, answers=int(tokens[0, 1]), wrong=int(tokens[0, 2]), by="neuron", positions=None
    )
    lens = tll.logit_lens(model, tokens, top_k=min(100, d_vocab), targets="next")

    print(
        f"processor: {processor_name()}  threads: {torch.get_num_threads()}  torch {torch.__version__}  "
        f"pandas {pd.__version__}"
    )
    print(f"model: {description}; tokens 4 x 128")
    for name, result, old in (
        ("attribution by neuron", att, old_attribution_table),
        (f"logit lens top_k={lens.top_ids.shape[-1]}", lens, old_lens_table),
    ):
        new_frame, new_s = timed(result.to_dataframe, args.repeats)
        old_frame, old_s = timed(lambda: old(result), 1)
        pd.testing.assert_frame_equal(new_frame, old_frame, check_dtype=False, check_exact=True)
        print(
            f"{name:>26}: {len(new_frame):>8,} rows  old (row loop) {old_s:7.2f} s  new {new_s:7.3f} s  "
            f"ratio {old_s / new_s:6.1f} x"
        )


if __name__ == "__main__":
    main()
