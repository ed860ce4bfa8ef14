#!/usr/bin/env python
"""How often each reading decodes the source's token, per layer: the logit lens against a Patchscope.

On SmolLM2-135M (30 layers, vocabulary 49,152), for every position but BOS of a few short
sentences, three readings of the source's stream at every entry ``0_pre .. final_post``:

- ``logit``: the logit lens (the final norm and the unembedding);
- ``patchscope``: the token-identity Patchscope as Patchscopes uses it (:data:`tl_logitlens.IDENTITY_PROMPT`,
  patched and read at its last token ``?``, at the same entry);
- ``arrow``: the same prompt with ``" ->"`` appended, patched at ``?`` and read after the arrow
  (``read_position=-1``), where the model writes the token it saw.

For each, :func:`tl_logitlens.source_token_rate` per entry: ``input`` (the top-1 is the input
token at that position) and, for the logit lens and the Patchscope read where it patches,
``prediction`` (the top-1 is the model's own next-token prediction there, the logit lens's final
entry: Patchscopes' next-token measure; the arrow reading is not a next-token reading). The ``pattern`` columns
are the shares of cells whose top-1 is one of the identity prompt's own tokens
(``cat``, ``1135``, ``hello``, ``->``, the newline...): the few-shot prompt's known pull on early
layers. Rates are means over all cells of all sentences (each cell counts once).

Usage: ``python bench/patchscope_identity.py [--model DIR] [--sentences N] [--out results.json]``
(the model folder defaults to ``~/.cache/tl-logitlens-models/smollm2-135m``, where the shared
models' ``fetch.py`` puts it). Prints the processor and the time taken.
About 12 minutes on 2 CPU cores (708 s on an Intel Xeon): every cell x entry x Patchscope is a
row of a forward pass of the 21- or 22-token target prompt. ``make bench-patchscope`` runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tl_logitlens as tll  # noqa: E402
from tl_logitlens.kernel.tuning import processor_name  # noqa: E402

SENTENCES = [
    "The Eiffel Tower is in Paris, and the Colosseum is in Rome.",
    "She poured a cup of coffee and opened the newspaper.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The quick brown fox jumps over the lazy dog.",
    "My brother plays the guitar in a small jazz band.",
    "Photosynthesis turns sunlight into chemical energy in plants.",
    "The train to London leaves from platform nine every hour.",
    "He forgot his umbrella, so he got wet in the rain.",
]
ARROW = tll.IDENTITY_PROMPT + " ->"
DEFAULT_MODEL = Path.home() / ".cache" / "tl-logitlens-models" / "smollm2-135m"


def _pattern_rate(result: tll.LensResult, pattern: torch.Tensor) -> Dict[str, float]:
    """Per entry, the share of real cells whose top-1 is a token of the target prompt."""
    top = result.top_ids[..., 0]  # [entry, batch, pos]
    real = result.positions < result.lengths.unsqueeze(1)
    hits = torch.isin(top, pattern)[:, real].float().mean(-1)
    return {label: float(h) for label, h in zip(result.labels, hits)}


def measure(model, sentences: List[str]) -> Dict[str, Dict[str, float]]:
    """Cell-weighted mean rates over ``sentences``: ``{column: {label: rate}}``."""
    pattern = model.to_tokens(tll.IDENTITY_PROMPT, prepend_bos=False)[0].unique()
    sums: Dict[str, Dict[str, float]] = {}
    total = 0
    for text in sentences:
        n = model.to_tokens(text).shape[1] - 1  # every position but BOS
        cells = dict(positions=slice(1, None), top_k=1)
        readings = {
            "logit": tll.logit_lens(model, text, **cells),
            "patchscope": tll.patchscope(model, text, progress=False, **cells),
            "arrow": tll.patchscope(
                model, text, target=ARROW, target_position=-2, read_position=-1, progress=False, **cells
            ),
        }
        own = readings["logit"].top_ids[-1, ..., 0]  # the model's own next-token prediction at each cell
        columns = {}
        for name, result in readings.items():
            columns[f"{name} input"] = tll.source_token_rate(result, of="input")
            if name != "arrow":
                columns[f"{name} prediction"] = tll.source_token_rate(result, of=own)
        columns["patchscope pattern"] = _pattern_rate(readings["patchscope"], pattern)
        columns["arrow pattern"] = _pattern_rate(readings["arrow"], pattern)
        for column, rates in columns.items():
            summed = sums.setdefault(column, {})
            for label, rate in rates.items():
                summed[label] = summed.get(label, 0.0) + rate * n
        total += n
        print(f"  {text!r}: {n} cells", flush=True)
    return {column: {label: v / total for label, v in rates.items()} for column, rates in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="a Hugging Face folder (default SmolLM2-135M)")
    parser.add_argument("--sentences", type=int, default=len(SENTENCES), help="how many of the built-in sentences")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", help="also write the rates as JSON here")
    args = parser.parse_args()
    if not Path(args.model).is_dir():
        sys.exit(f"no model folder at {args.model}; fetch SmolLM2-135M first (see /work/shared/models/README.md)")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_transformers(args.model, device="cpu").eval()
    print(f"{Path(args.model).name} on {processor_name()} ({torch.get_num_threads()} threads)")
    start = time.perf_counter()
    rates = measure(model, SENTENCES[: args.sentences])
    took = time.perf_counter() - start
    columns = list(rates)
    print(f"\nrate of top-1 = the token, per entry ({took:.0f} s):")
    print(f"{'entry':>11}  " + "  ".join(f"{c:>21}" for c in columns))
    for label in rates[columns[0]]:
        print(f"{label:>11}  " + "  ".join(f"{rates[c][label]:>21.3f}" for c in columns))
    if args.out:
        record = {"model": Path(args.model).name, "processor": processor_name(), "seconds": took, "rates": rates}
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
