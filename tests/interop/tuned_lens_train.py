"""Reference training with EleutherAI tuned-lens 0.2.0; run by the REFERENCE venv's python.

The tuned-lens side of bench/compare_training.py. Never imports tl_logitlens or
transformer_lens. Needs ``torchdata==0.8.0`` in that venv (``pip install --no-deps``): its
training loop imports ``torchdata.dataloader2``, which 0.11 dropped.

Commands:

``generate``  sample ``--n`` sequences of ``--seq`` tokens from the model itself (BOS, then
              ``seq - 1`` tokens drawn at temperature 1 with Hugging Face ``generate``,
              end-of-text suppressed so every row is full length), seeded; writes
              ``{"tokens": LongTensor [n, seq]}``.
``train``     run tuned-lens's OWN training loop (``tuned_lens.scripts.train_loop.Train.execute``:
              its per-layer KL in bfloat16 autocast, backward one layer at a time, gradient
              accumulation, norm clipping at 1, its SGD/Nesterov optimizer with
              ``lr * (1 - momentum)``, weight decay 1e-3 and linear decay, its shuffled
              ``DataLoader2``) on ``--data``, with only ``setup`` replaced so that the model and the
              data come from local files instead of the hub and a dataset download; saves the
              lens with tuned-lens's ``save`` to ``--out`` and writes ``--json``: the steps done,
              and per-layer mean KL(final || lens) on ``--heldout`` (float32, no autocast,
              positions that have a next token, as tl_logitlens.evaluate_lens scores them) for
              the trained lens and for the identity (the logit lens).

Example::

    vb/bin/python tests/interop/tuned_lens_train.py generate --model M --out d.pt --n 64 --seq 128
    vb/bin/python tests/interop/tuned_lens_train.py train --model M --data d.pt --heldout h.pt \
        --out lens/ --json ref.json --steps 20 --tokens-per-step 4096 --batch-size 8
"""

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch
import transformers


def load_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32
    ).eval()


def generate(args):
    model = load_model(args.model)
    cfg = model.config
    torch.manual_seed(args.seed)
    bos = cfg.bos_token_id if cfg.bos_token_id is not None and cfg.bos_token_id < cfg.vocab_size else 0
    rows = []
    with torch.no_grad():
        for start in range(0, args.n, args.gen_batch):
            b = min(args.gen_batch, args.n - start)
            prompt = torch.full((b, 1), bos, dtype=torch.long)
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.seq - 1,
                min_new_tokens=args.seq - 1,
                pad_token_id=cfg.eos_token_id if cfg.eos_token_id is not None else 0,
            )
            assert out.shape == (b, args.seq), out.shape
            rows.append(out)
    torch.save({"tokens": torch.cat(rows)}, args.out)


def heldout_kl(model, lens, tokens, batch_size, identity):
    """``[n_layers]`` mean KL(final || lens_i) over positions with a next token."""
    sums, count = None, 0
    with torch.no_grad():
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start : start + batch_size]
            out = model(batch, output_hidden_states=True)
            final = torch.log_softmax(out.logits.double(), -1)[:, :-1]
            kls = []
            for i, h in enumerate(out.hidden_states[:-1]):
                logits = lens.unembed(h) if identity else lens(h, i)
                lp = torch.log_softmax(logits.double(), -1)[:, :-1]
                kls.append((final.exp() * (final - lp)).sum(-1).sum())
            kls = torch.stack(kls)
            sums = kls if sums is None else sums + kls
            count += final.shape[0] * final.shape[1]
    return (sums / count).tolist()


def train(args):
    from tuned_lens.scripts import ingredients as ing
    from tuned_lens.scripts.train_loop import LossChoice, State, Train

    torch.manual_seed(args.seed)
    model = load_model(args.model)
    tokens = torch.load(args.data, weights_only=True)["tokens"]
    heldout = torch.load(args.heldout, weights_only=True)["tokens"]
    seq = tokens.shape[1]
    trainer = Train(
        model=ing.Model(name=args.model),
        data=ing.Data(),
        opt=ing.Optimizer(),
        dist=ing.Distributed(per_gpu_batch_size=args.batch_size),
        output=Path(args.out),
        seed=args.seed,
        num_steps=args.steps,
        tokens_per_step=args.tokens_per_step,
        loss=LossChoice.KL,
    )

    def setup(self):
        # Train.setup with the hub and dataset download replaced by the local model and tokens.
        lens = self.get_lens(model)
        dl = self.dist.data_loader([{"input_ids": row} for row in tokens])
        dl.seed(self.seed)
        opt = self.opt.create_optim([p for p in lens.parameters() if p.requires_grad])
        scheduler = self.opt.create_scheduler(opt, self.num_steps)
        state = State(
            dataloader=dl,
            lens=self.dist.distribute_lens(lens),
            opt=opt,
            scheduler=scheduler,
            wandb_id=None,
            nats_to_bpb=1.0,
        )
        self._state = state
        return state, model, self.calculate_gradient_accumulation_steps(seq)

    trainer.setup = types.MethodType(setup, trainer)
    started = time.perf_counter()
    trainer.execute()
    seconds = time.perf_counter() - started
    lens = trainer._state.lens
    lens.eval()
    result = {
        "implementation": "tuned-lens 0.2.0 Train.execute (setup replaced to read local files)",
        "steps_requested": args.steps,
        "steps_done": int(trainer._state.step),
        "tokens_per_step": args.tokens_per_step,
        "batch_size": args.batch_size,
        "train_tokens": int(tokens.numel()),
        "heldout_tokens_scored": int(heldout.shape[0] * (heldout.shape[1] - 1)),
        "train_seconds": seconds,
        "layers": [f"{i}_pre" for i in range(len(lens))],
        "kl_tuned": heldout_kl(model, lens, heldout, args.batch_size, identity=False),
        "kl_logit": heldout_kl(model, lens, heldout, args.batch_size, identity=True),
        "versions": {"torch": str(torch.__version__), "transformers": str(transformers.__version__)},
    }
    Path(args.json).write_text(json.dumps(result, indent=2))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--model", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--n", type=int, required=True)
    g.add_argument("--seq", type=int, default=128)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--gen-batch", type=int, default=256)
    t = sub.add_parser("train")
    t.add_argument("--model", required=True)
    t.add_argument("--data", required=True)
    t.add_argument("--heldout", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--json", required=True)
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--tokens-per-step", type=int, required=True)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    generate(args) if args.command == "generate" else train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
