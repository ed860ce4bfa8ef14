"""The ``tl-logitlens`` command line: the package's analyses on a prompt, from a terminal.

Commands::

    tl-logitlens demo [--out DIR]
    tl-logitlens lens --model MODEL --prompt TEXT [--metric M] [--top-k K] [--target TOKEN] [--out DIR]
    tl-logitlens dla  --model MODEL --prompt TEXT --answer TOKEN [--wrong TOKEN] [--by KIND] [--out DIR]
    tl-logitlens eval --model MODEL --data FILE [--max-tokens N] [--out DIR]

``MODEL`` is ``demo`` (the built-in model), a local Hugging Face model directory (booted
through ``TransformerBridge``, transformer-lens 3.x/4.x), or a hub name (needs the hub).
Usage errors exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .errors import LensInputError, ModelStateError, UnsupportedModelError

METRICS = ("prob", "logit", "rank", "entropy", "kl", "loss")


class UsageError(Exception):
    """A mistake in how the command was called: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(message)


# -- model loading ----------------------------------------------------------------------
def load_model(spec: str) -> Any:
    """``demo``, a local HF model directory, or a hub name, as a TransformerLens model."""
    if spec == "demo":
        from .demo import demo_model

        return demo_model()
    path = Path(spec).expanduser()
    looks_local = spec.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise UsageError(f"no model directory at {spec!r}; pass 'demo', a local Hugging Face model folder, or a hub name")
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        raise UsageError(
            "loading a Hugging Face model needs transformer-lens 3.x or 4.x (TransformerBridge); "
            "with 2.x, load the model in Python and call tl_logitlens directly"
        ) from None
    try:
        model = TransformerBridge.boot_transformers(str(path) if looks_local else spec, device="cpu")
    except Exception as err:  # noqa: BLE001 - any loader failure is reported in one line
        where = f"the folder {spec!r}" if looks_local else f"the hub name {spec!r} (is the hub reachable?)"
        raise UsageError(f"could not load a model from {where}: {type(err).__name__}: {str(err).splitlines()[0][:200]}") from None
    return model.eval()


def _prompt_tokens(model: Any, prompt: str) -> Any:
    """Text as the model tokenises it; a demo prompt of space-separated words works as is."""
    if getattr(model, "tokenizer", None) is None:
        raise UsageError("this model has no tokenizer, so --prompt text cannot be read")
    return prompt


def _out_dir(out: Optional[str]) -> Optional[Path]:
    if out is None:
        return None
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _save(fig: Any, out: Path, name: str, written: List[str]) -> None:
    fig.savefig(out / name, dpi=130, bbox_inches="tight")
    written.append(str(out / name))
    import matplotlib.pyplot as plt

    plt.close(fig)


# -- reports ----------------------------------------------------------------------------
def lens_summary(result: Any, position: int = -1) -> List[Dict[str, Any]]:
    """Each layer's top-1 prediction (and target stats) at one position of prompt 0."""
    rows = []
    for i, label in enumerate(result.labels):
        index = (i, 0, position) if result.has_pos_axis else (i, 0)
        row = {
            "layer": label,
            "top1": result.decode(int(result.top_ids[index][0])),
            "top1_prob": round(float(result.top_probs[index][0]), 4),
            "entropy": round(float(result.entropy[index]), 4),
        }
        if result.target_ids is not None:
            row["target"] = result.decode(int(result.target_ids[index][0]))
            row["target_prob"] = round(float(result.target_probs[index][0]), 4)
            row["target_rank"] = int(result.target_ranks[index][0])
        rows.append(row)
    return rows


def _print_lens(rows: List[Dict[str, Any]], token: str) -> None:
    print(f"What each layer predicts after {token!r}:")
    for row in rows:
        extra = ""
        if "target" in row:
            extra = f"   {row['target']!r}: p={row['target_prob']:.3f} rank={row['target_rank']}"
        print(f"  {row['layer']:>11}  {row['top1']!r:<16} p={row['top1_prob']:.3f}{extra}")


def _print_attribution(att: Any, k: int) -> None:
    value = float(att.model_value.mean())
    what = "logit difference" if att.wrong_ids is not None else "logit"
    print(f"Direct logit attribution (by={att.by}) of the {what} {value:.3f}; "
          f"constant terms {float(att.constant.mean()):.3f}; residual error {att.residual_error():.2e}")
    for label, v in att.top(k):
        print(f"  {label:>14}  {v:+.3f}")


# -- commands ---------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the built-in model on an induction prompt and write every figure and table."""
    import tl_logitlens as tll
    from .demo import INDUCTION_HEAD, demo_model, induction_prompt

    model = demo_model()
    full = induction_prompt(model, n=args.n, seed=args.seed)
    tokens = full[:, :-1]  # the model must now predict the last word of the repeat
    answer = int(full[0, -1])
    # Wrong: another word of the sequence (the first one that differs from the answer).
    wrong = next(int(t) for t in full[0, 1 : 1 + args.n] if int(t) != answer)
    lens = tll.logit_lens(model, tokens, targets="next", top_k=5)
    at_end = tll.logit_lens(model, tokens, positions=-1, targets=[answer, wrong])
    components = tll.direct_logit_attribution(model, tokens, answers=answer, wrong=wrong, by="component")
    heads = tll.direct_logit_attribution(model, tokens, answers=answer, wrong=wrong, by="head")
    neurons = tll.direct_logit_attribution(model, tokens, answers=answer, wrong=wrong, by="neuron")

    rows = lens_summary(at_end)
    _print_lens(rows, lens.decode(int(tokens[0, -1])))
    print(f"\nThe answer is {lens.decode(answer)!r} (copied from the first repeat); wrong is {lens.decode(wrong)!r}.")
    print("Top heads by direct logit attribution:")
    # The heads that write the answer: largest positive direct effect on the logit difference.
    head_top = sorted(((label, v) for label, v in heads.top(len(heads.labels)) if label.startswith("L")),
                      key=lambda item: -item[1])[:3]
    for label, v in head_top:
        print(f"  {label:>6}  {v:+.3f}")
    print(f"(layer {INDUCTION_HEAD[0]} is the induction layer; its heads share the copying, and averaged "
          f"over prompts L{INDUCTION_HEAD[0]}H{INDUCTION_HEAD[1]} writes the most)")

    summary = {
        "prompt": [lens.decode(int(t)) for t in tokens[0]],
        "answer": lens.decode(answer),
        "wrong": lens.decode(wrong),
        "lens_at_last_position": rows,
        "logit_difference": float(components.model_value[0]),
        "components": dict(components.top(len(components.labels))),
        "top_heads": dict(head_top),
        "top_neurons": dict(neurons.top(5)),
        "residual_error": max(components.residual_error(), heads.residual_error(), neurons.residual_error()),
        "induction_head": f"L{INDUCTION_HEAD[0]}H{INDUCTION_HEAD[1]}",
    }
    out = _out_dir(args.out)
    if out is not None:
        from . import plots

        written: List[str] = []
        _save(plots.plot_lens(lens), out, "lens_heatmap.png", written)
        _save(plots.plot_trajectory(at_end), out, "trajectory.png", written)
        _save(plots.plot_lens_metrics(lens), out, "lens_metrics.png", written)
        _save(plots.plot_attribution(components), out, "attribution_components.png", written)
        _save(plots.plot_attribution(heads), out, "attribution_heads.png", written)
        _save(plots.plot_attribution(neurons), out, "attribution_neurons.png", written)
        for name, table in (("lens.csv", lens.to_dataframe()), ("attribution_components.csv", components.to_dataframe()),
                            ("attribution_heads.csv", heads.to_dataframe()), ("attribution_neurons.csv", neurons.to_dataframe())):
            table.to_csv(out / name, index=False)
            written.append(str(out / name))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        written.append(str(out / "summary.json"))
        print("\nWrote:\n  " + "\n  ".join(written))
    return summary


def cmd_lens(args: argparse.Namespace) -> Dict[str, Any]:
    """The logit lens on one prompt: a table of each layer's prediction, and optional files."""
    import tl_logitlens as tll

    model = load_model(args.model)
    prompt = _prompt_tokens(model, args.prompt)
    targets = "next" if args.metric == "rank" else None
    result = tll.logit_lens(model, prompt, top_k=args.top_k, norm=args.norm, targets=targets)
    at_end = tll.logit_lens(model, prompt, positions=-1, top_k=args.top_k, norm=args.norm,
                            targets=None if args.target is None else [args.target])
    rows = lens_summary(at_end)
    last = int(result.input_ids[0, int(result.lengths[0]) - 1])
    _print_lens(rows, result.decode(last))
    summary = {"model": args.model, "prompt": args.prompt, "norm": args.norm, "lens_at_last_position": rows}
    out = _out_dir(args.out)
    if out is not None:
        from . import plots

        written: List[str] = []
        _save(plots.plot_lens(result, metric=args.metric), out, "lens_heatmap.png", written)
        if args.target is not None:
            _save(plots.plot_trajectory(at_end), out, "trajectory.png", written)
        _save(plots.plot_lens_metrics(result), out, "lens_metrics.png", written)
        result.to_dataframe().to_csv(out / "lens.csv", index=False)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        written += [str(out / "lens.csv"), str(out / "summary.json")]
        print("\nWrote:\n  " + "\n  ".join(written))
    return summary


def cmd_dla(args: argparse.Namespace) -> Dict[str, Any]:
    """Direct logit attribution of one answer (or answer - wrong) on one prompt."""
    import tl_logitlens as tll

    model = load_model(args.model)
    prompt = _prompt_tokens(model, args.prompt)
    att = tll.direct_logit_attribution(model, prompt, answers=args.answer, wrong=args.wrong, by=args.by)
    _print_attribution(att, args.top)
    summary = {
        "model": args.model, "prompt": args.prompt, "answer": args.answer, "wrong": args.wrong, "by": args.by,
        "model_value": float(att.model_value[0]), "constant": float(att.constant[0]),
        "residual_error": att.residual_error(), "top": dict(att.top(args.top)),
    }
    out = _out_dir(args.out)
    if out is not None:
        from . import plots

        written: List[str] = []
        _save(plots.plot_attribution(att), out, f"attribution_{args.by}.png", written)
        att.to_dataframe().to_csv(out / f"attribution_{args.by}.csv", index=False)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        written += [str(out / f"attribution_{args.by}.csv"), str(out / "summary.json")]
        print("\nWrote:\n  " + "\n  ".join(written))
    return summary


def _read_data(path: str) -> Any:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"no data file at {path!r}; pass a text file (one document per line) or a .pt token tensor")
    if file.suffix == ".pt":
        data = torch.load(file, weights_only=True)
        if not isinstance(data, torch.Tensor):
            raise UsageError(f"{path!r} does not hold a token tensor [n, seq]")
        return data
    lines = [line.rstrip("\n") for line in file.read_text().splitlines()]
    docs = [line for line in lines if line.strip()]
    if not docs:
        raise UsageError(f"{path!r} holds no text")
    return docs


def cmd_eval(args: argparse.Namespace) -> Dict[str, Any]:
    """Streaming lens statistics over a dataset."""
    import tl_logitlens as tll

    model = load_model(args.model)
    data = _read_data(args.data)
    evaluation = tll.evaluate_lens(model, data, batch_size=args.batch_size, max_tokens=args.max_tokens,
                                   progress=not args.quiet)
    frame = evaluation.to_dataframe()
    shown = ["layer", "kl_to_final_mean", "next_token_loss_mean", "perplexity", "entropy_mean", "top1_agreement", "top1_accuracy"]
    print(f"{evaluation.n_tokens} tokens")
    print(frame[[c for c in shown if c in frame]].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    out = _out_dir(args.out)
    if out is not None:
        from . import plots

        written: List[str] = []
        frame.to_csv(out / "lens_eval.csv", index=False)
        evaluation.save(out / "lens_eval.json")
        _save(evaluation.plot(), out, "lens_eval.png", written)
        written += [str(out / "lens_eval.csv"), str(out / "lens_eval.json")]
        print("\nWrote:\n  " + "\n  ".join(written))
    return {"tokens": evaluation.n_tokens}


# -- parser -----------------------------------------------------------------------------
MODEL_HELP = "'demo' (built in), a local Hugging Face model folder, or a hub name (needs the hub)"


def _model_and_prompt(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--model", required=True, help=MODEL_HELP)
    sub.add_argument("--prompt", required=True, help="the text to read")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="tl-logitlens", formatter_class=fmt,
        description="The logit lens and direct logit attribution for TransformerLens models.",
        epilog="examples:\n  tl-logitlens demo --out logitlens-demo\n"
               "  tl-logitlens lens --model demo --prompt 'red cat sun red cat' --target sun\n"
               "  tl-logitlens dla --model ./my-hf-model --prompt 'The capital of France is' --answer ' Paris' --wrong ' Rome' --by head",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", formatter_class=fmt, help="run the built-in induction model and write every figure",
                          description="Run the built-in model on a repeated random word sequence, print what each layer "
                                      "predicts and which heads write the answer, and write figures, tables and summary.json.",
                          epilog="example:\n  tl-logitlens demo --out logitlens-demo")
    demo.add_argument("--out", metavar="DIR", help="folder for PNG figures, CSV tables and summary.json")
    demo.add_argument("--n", type=int, default=12, help="words in the repeated sequence (default 12)")
    demo.add_argument("--seed", type=int, default=0, help="seed for the random words (default 0)")
    demo.set_defaults(func=cmd_demo)

    lens = sub.add_parser("lens", formatter_class=fmt, help="what each layer predicts (the logit lens)",
                          description="Read every layer's residual stream through the final norm and unembedding.",
                          epilog="example:\n  tl-logitlens lens --model demo --prompt 'red cat sun red cat' --target sun --out lens-out")
    _model_and_prompt(lens)
    lens.add_argument("--metric", choices=METRICS, default="prob",
                      help="heatmap colour: top-1 prob, top-1 logit, rank of the true next token, entropy, KL to final, or next-token loss")
    lens.add_argument("--top-k", type=int, default=5, help="top tokens kept per cell (default 5)")
    lens.add_argument("--target", metavar="TOKEN", help="a single token to follow across layers (probability and rank)")
    lens.add_argument("--norm", choices=("recompute", "cached", "none"), default="recompute",
                      help="final norm: own statistics (default), the final stream's scale, or none")
    lens.add_argument("--out", metavar="DIR", help="folder for the heatmap, curves, lens.csv and summary.json")
    lens.set_defaults(func=cmd_lens)

    dla = sub.add_parser("dla", formatter_class=fmt, help="which components write the answer (direct logit attribution)",
                         description="Attribute the answer's logit (or answer - wrong) at the last token to components.",
                         epilog="example:\n  tl-logitlens dla --model demo --prompt 'red cat sun red cat' --answer sun --wrong red --by head")
    _model_and_prompt(dla)
    dla.add_argument("--answer", required=True, metavar="TOKEN", help="the correct next token (must be one token)")
    dla.add_argument("--wrong", metavar="TOKEN", help="a wrong token: attribute the logit difference answer - wrong")
    dla.add_argument("--by", choices=("component", "head", "neuron", "accumulated"), default="component",
                     help="split by component (default), head, neuron, or accumulated layer")
    dla.add_argument("--top", type=int, default=10, help="how many components to print (default 10)")
    dla.add_argument("--out", metavar="DIR", help="folder for the figure, CSV and summary.json")
    dla.set_defaults(func=cmd_dla)

    ev = sub.add_parser("eval", formatter_class=fmt, help="lens statistics over a dataset, streamed",
                        description="Per-layer KL to final, loss, entropy and accuracy over a dataset, in bounded memory.",
                        epilog="example:\n  tl-logitlens eval --model ./stories260k --data stories.txt --max-tokens 20000 --out eval-out")
    ev.add_argument("--model", required=True, help=MODEL_HELP)
    ev.add_argument("--data", required=True, metavar="FILE", help="a text file (one document per line) or a .pt token tensor [n, seq]")
    ev.add_argument("--max-tokens", type=int, help="stop after this many tokens")
    ev.add_argument("--batch-size", type=int, default=8, help="documents per forward pass (default 8)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.add_argument("--out", metavar="DIR", help="folder for lens_eval.csv, lens_eval.json and lens_eval.png")
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tl-logitlens`` and ``python -m tl_logitlens``; returns the exit status."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    torch.set_grad_enabled(False)
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except UsageError as err:
        print(f"tl-logitlens: error: {err}", file=sys.stderr)
        return 2
    except (LensInputError, ModelStateError, UnsupportedModelError) as err:
        print(f"tl-logitlens: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
