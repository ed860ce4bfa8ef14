"""The tuned-lens 0.2.0 side of the interop tests; run by the REFERENCE venv's python.

This script never imports tl_logitlens (nor transformer_lens): it uses only EleutherAI's
``tuned_lens`` package and plain ``transformers``, so what it writes is an independent
reading of a lens folder. tests/test_interop.py runs it as a subprocess.

Commands (all write a ``torch.save`` dict to ``--readings``):

``make``  build ``tuned_lens.nn.TunedLens.from_model(model)``, set every translator to
          seeded random values, save it with tuned-lens's own ``save`` to ``--lens``, and
          write its readings.
``read``  load ``--lens`` with ``TunedLens.from_model_and_pretrained`` and write its
          readings, plus the warnings tuned-lens logged while loading.

Readings: ``log_probs [n_layers + 1, batch, pos, d_vocab]`` (float64), entry ``i <
n_layers`` being ``log_softmax(lens(hidden_states[i], i))`` and the last the model's own
output (``hidden_states[-1]`` already carries the final norm, so it is not read through the
lens again); ``unembed_hash`` (tuned-lens's own), ``config`` (the lens's config dict),
``warnings``, and ``sdpa_gap``: the largest difference of the final log-probs between the
model run with sdpa and with eager attention (the float32 noise floor of the comparison).

Example::

    /work/vb-tl/bin/python tests/interop/tuned_lens_side.py make --model M --lens DIR \
        --readings out.pt --tokens '[[1, 403, 407]]' --seed 0
"""

import argparse
import json
import logging
import sys

import torch
import transformers
from tuned_lens.nn import TunedLens


def load_model(path, attn):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32).eval()


def randomise(lens, seed, scale):
    # Small translators of a known size: far enough from the identity that a transposed,
    # shifted or mis-indexed translator shows, small enough to keep readings meaningful.
    g = torch.Generator().manual_seed(seed)
    d = lens.config.d_model
    with torch.no_grad():
        for translator in lens:
            translator.weight.copy_(scale * torch.randn(d, d, generator=g) / d**0.5)
            translator.bias.copy_(scale * torch.randn(d, generator=g))


def readings(model, lens, tokens):
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
        hidden = out.hidden_states
        rows = [torch.log_softmax(lens(hidden[i], i).double(), -1) for i in range(len(lens))]
        rows.append(torch.log_softmax(out.logits.double(), -1))
    return torch.stack(rows)


class _Catch(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["make", "read"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--lens", required=True)
    parser.add_argument("--readings", required=True)
    parser.add_argument("--tokens", required=True, help="JSON list of lists of token ids")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=0.3)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    tokens = torch.tensor(json.loads(args.tokens), dtype=torch.long)
    model = load_model(args.model, "eager")  # a TransformerBridge runs eager attention
    catch = _Catch()
    logging.getLogger().addHandler(catch)
    if args.command == "make":
        lens = TunedLens.from_model(model)
        randomise(lens, args.seed, args.scale)
        lens.save(args.lens)
    else:
        lens = TunedLens.from_model_and_pretrained(model, args.lens)
    lens.eval()
    log_probs = readings(model, lens, tokens)
    sdpa = load_model(args.model, "sdpa")
    with torch.no_grad():
        sdpa_final = torch.log_softmax(sdpa(tokens).logits.double(), -1)
    torch.save(
        {
            "log_probs": log_probs,
            "unembed_hash": lens.unembed.unembedding_hash(),
            "config": lens.config.to_dict(),
            "warnings": catch.messages,
            "sdpa_gap": float((sdpa_final - log_probs[-1]).abs().max()),
            "n_translators": len(lens),
            "versions": {"torch": str(torch.__version__), "transformers": str(transformers.__version__)},
        },
        args.readings,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
