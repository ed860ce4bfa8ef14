"""The argument parser of every command (it imports nothing heavy)."""

from __future__ import annotations

import argparse
from typing import Any

from .arguments import DPI_RANGE, DTYPES, FORMATS, METRICS, PLOTLY_MODES, Parser
from .commands import cmd_demo, cmd_dla, cmd_eval, cmd_fit_lens, cmd_lens, cmd_patchscope, cmd_train_lens
from .report_command import add_report

# -- parser -----------------------------------------------------------------------------------
MODEL_HELP = "'demo' (built in), a local Hugging Face model folder, or a hub name (needs the hub)"
TOKEN_HELP = "a token's text, its exact vocabulary piece, or id:N for token id N"
# Keeps the examples in each epilog on their own lines.
FORMATTER = argparse.RawDescriptionHelpFormatter


def _common(sub: argparse.ArgumentParser, model: bool = True) -> None:
    """Add the options every sub-command shares (``--model`` unless ``model=False``, device, dtype, figures)."""
    if model:
        sub.add_argument("--model", required=True, help=MODEL_HELP)
    sub.add_argument("--device", default="cpu", help="where to run: cpu (default), cuda, cuda:N or mps")
    sub.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="model precision (default float32); an HF folder is loaded in it, the demo model cast to it",
    )
    sub.add_argument("--format", choices=FORMATS, default="png", help="figure file format (default png)")
    sub.add_argument(
        "--dpi",
        type=float,
        default=200,
        help=f"figure resolution in dots per inch, {DPI_RANGE[0]:g} to {DPI_RANGE[1]:g} (default 200: print quality)",
    )
    sub.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out folder (or onto an --html file) that holds files tl-logitlens did not write: "
        "files of the same names are replaced, no other file is touched (without it such a folder is refused)",
    )
    sub.add_argument(
        "--verbose",
        action="store_true",
        help="let third-party warnings, logs and progress bars through (hidden by default)",
    )


def _html(sub: argparse.ArgumentParser) -> None:
    """Add the ``--html`` option (an interactive page beside the figure) and ``--plotly``."""
    sub.add_argument(
        "--html",
        metavar="PATH",
        help="also write an interactive page (hover for values; needs plotly, pip install "
        "tl-logitlens[interactive]); its folder is created if missing",
    )
    sub.add_argument(
        "--plotly",
        choices=PLOTLY_MODES,
        default="directory",
        help="where the page gets plotly.js: directory (default: one plotly.min.js beside the page, shared by "
        "the pages of its folder), inline (inside the page, ~1.8 MB, opens anywhere offline) or cdn "
        "(cdn.plot.ly, needs the network)",
    )


def _prompts(sub: argparse.ArgumentParser) -> None:
    """Add the prompt options (exactly one of ``--prompt``, ``--prompts``, ``--tokens``) and ``--position``."""
    group = sub.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help="a prompt as text; repeat for several prompts (right-padded, each keeps its own length)",
    )
    group.add_argument("--prompts", metavar="FILE", help="a UTF-8 text file with one prompt per line")
    group.add_argument(
        "--tokens",
        action="append",
        metavar="IDS",
        help="a prompt as token ids, e.g. 49,12,7,50 (commas or spaces); repeat it or separate prompts "
        "with ';' for several prompts, which must then have equal lengths",
    )
    sub.add_argument(
        "--position",
        type=int,
        default=-1,
        help="the position read: 0-based, negative counts back from each prompt's last token (default -1)",
    )


def _data(sub: argparse.ArgumentParser) -> None:
    """Add the required ``--data`` option that ``eval`` and ``train-lens`` share."""
    sub.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help="a UTF-8 text file (one document per line) or a .pt token tensor [n, seq]",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command (imports nothing heavy)."""
    parser = Parser(
        prog="tl-logitlens",
        formatter_class=FORMATTER,
        description="The logit lens and direct logit attribution for TransformerLens models.",
        epilog="examples:\n  tl-logitlens demo --out logitlens-demo\n"
        "  tl-logitlens lens --model demo --prompt 'red cat sun red cat' --target sun\n"
        "  tl-logitlens dla --model ./my-hf-model --prompt 'The capital of France is' --answer ' Paris' "
        "--wrong ' Rome' --by head\n"
        "  tl-logitlens lens --model ./capp-gpt2 --tokens 49,12,7,50 --target id:14\n"
        "  tl-logitlens patchscope --model ./my-hf-model --prompt 'The Eiffel Tower is in Paris'\n"
        "  tl-logitlens eval --model ./stories260k --data stories.txt --out eval-out\n"
        "  tl-logitlens train-lens --model ./stories260k --data stories.txt --steps 50 --out stories-lens",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    # Sub-commands are added in the order --help lists them.
    _add_demo(sub)
    _add_lens(sub)
    _add_patchscope(sub)
    _add_dla(sub)
    _add_eval(sub)
    _add_train_lens(sub)
    add_report(sub, _prompts, _common)
    _add_fit_lens(sub)
    return parser


def _add_demo(sub: Any) -> None:
    """Add the ``demo`` sub-command and its options to ``sub``."""
    demo = sub.add_parser(
        "demo",
        formatter_class=FORMATTER,
        help="run the built-in induction model and write every figure",
        description="Run the built-in model on a repeated random word sequence, print what each layer "
        "predicts and which heads write the answer, and write figures, tables and summary.json.",
        epilog="example:\n  tl-logitlens demo --n 12 --seed 0 --format svg --out logitlens-demo",
    )
    demo.add_argument(
        "--out", metavar="DIR", help="folder for figures, CSV tables and summary.json (created if missing)"
    )
    demo.add_argument("--n", type=int, default=12, help="words in the repeated sequence, 2..31 (default 12)")
    demo.add_argument("--seed", type=int, default=0, help="seed for the random words (default 0)")
    _common(demo, model=False)
    demo.set_defaults(func=cmd_demo)


def _add_lens(sub: Any) -> None:
    """Add the ``lens`` sub-command (the logit lens) and its options to ``sub``."""
    lens = sub.add_parser(
        "lens",
        formatter_class=FORMATTER,
        help="what each layer predicts (the logit lens)",
        description="Read every layer's residual stream through the final norm and unembedding; "
        "print each layer's top token (and targets) at --position of every prompt.",
        epilog="example:\n  tl-logitlens lens --model demo --prompt 'red cat sun red cat' --target sun "
        "--layers 0,-1 --out lens-out\n"
        "  tl-logitlens lens --model ./capp-gpt2 --tokens '49,12,7;49,12,8' --target id:50 --position 2\n"
        "  tl-logitlens lens --model ./stories260k --prompt 'Once upon a time' --lens tuned-lens-dir",
    )
    _prompts(lens)
    lens.add_argument(
        "--layers",
        metavar="L,..",
        help="stack entries to read, by index (negative from the end) or "
        "label, comma-separated, e.g. 0,2,final_post (default all)",
    )
    lens.add_argument(
        "--metric",
        choices=METRICS,
        default="prob",
        help="heatmap colour: top-1 prob, top-1 logit, rank of the true next token, entropy, KL to final, "
        "or next-token loss",
    )
    lens.add_argument("--top-k", type=int, default=5, help="top tokens kept per cell (default 5)")
    lens.add_argument(
        "--target",
        action="append",
        metavar="TOKEN",
        help=f"a token to follow across layers (probability and rank): {TOKEN_HELP}; repeat for several",
    )
    lens.add_argument(
        "--norm",
        choices=("recompute", "cached", "none"),
        default="recompute",
        help="final norm: own statistics (default), the final stream's scale, or none",
    )
    lens.add_argument("--out", metavar="DIR", help="folder for the heatmap, curves, lens.csv and summary.json")
    lens.add_argument(
        "--lens",
        metavar="PATH",
        help="read through a trained lens for this model: a tuned lens's folder (TunedLens.save or tuned-lens: "
        "config.json, params.pt) or a Jacobian lens's .pt file (JacobianLens.save, fit-lens or TransformerLens)",
    )
    _html(lens)
    _common(lens)
    lens.set_defaults(func=cmd_lens)


def _add_patchscope(sub: Any) -> None:
    """Add the ``patchscope`` sub-command (read each layer by patching it into a target prompt) to ``sub``."""
    scope = sub.add_parser(
        "patchscope",
        formatter_class=FORMATTER,
        help="what each layer holds, said by the model itself (a Patchscope)",
        description="Patch every layer's residual stream at --position into a target prompt (by default the "
        "token-identity prompt 'cat -> cat / 1135 -> 1135 / hello -> hello / ?', at its last token) and "
        "print what each patched run predicts there.",
        epilog="example:\n  tl-logitlens patchscope --model demo --prompt 'red cat sun moon red cat' --layers 0,-1\n"
        "  tl-logitlens patchscope --model ./my-hf-model --prompt 'Alexander the Great' "
        "--target 'Syria: country in the Middle East; Leonardo DiCaprio: American actor; x' --html scope.html",
    )
    _prompts(scope)
    scope.add_argument(
        "--target",
        metavar="TEXT",
        help="the target prompt, patched and read at its last token (default: the token-identity prompt)",
    )
    scope.add_argument(
        "--layers",
        metavar="L,..",
        help="source entries to read, by index (negative from the end) or label, comma-separated, "
        "e.g. 0,5,final_post or 3_mid (default all)",
    )
    scope.add_argument("--top-k", type=int, default=5, help="top tokens kept per cell (default 5)")
    scope.add_argument(
        "--out", metavar="DIR", help="folder for the heatmap over every position, patchscope.csv and summary.json"
    )
    scope.add_argument("--quiet", action="store_true", help="no progress bar over the patched runs")
    _html(scope)
    _common(scope)
    scope.set_defaults(func=cmd_patchscope)


def _add_dla(sub: Any) -> None:
    """Add the ``dla`` sub-command (direct logit attribution) and its options to ``sub``."""
    dla = sub.add_parser(
        "dla",
        formatter_class=FORMATTER,
        help="which components write the answer (direct logit attribution)",
        description="Attribute the answer's logit (or answer - wrong) at --position to components; "
        "several prompts are averaged. By default the final norm's scale is the forward "
        "pass's own (cached), which keeps the pieces adding up to the model's logit exactly.",
        epilog="example:\n  tl-logitlens dla --model demo --prompt 'red cat sun red cat' --answer sun --wrong red "
        "--by head\n"
        "  tl-logitlens dla --model ./capp-gpt2 --tokens 49,12,7,50 --answer id:14 --by accumulated",
    )
    _prompts(dla)
    dla.add_argument(
        "--answer",
        required=True,
        action="append",
        metavar="TOKEN",
        help=f"the correct next token: {TOKEN_HELP}; repeat once per prompt for different answers",
    )
    dla.add_argument(
        "--wrong",
        action="append",
        metavar="TOKEN",
        help="a wrong token (same forms): attribute the logit difference answer - wrong",
    )
    dla.add_argument(
        "--by",
        choices=("component", "head", "neuron", "accumulated"),
        default="component",
        help="split by component (default), head, neuron, or accumulated layer (printed in layer order)",
    )
    dla.add_argument(
        "--norm",
        choices=("cached", "none"),
        default="cached",
        help="final norm: the forward pass's own scale (default; the pieces add up to the model's "
        "logit), or none (raw stream @ W_U, the pieces add up to the unnormalised value)",
    )
    dla.add_argument(
        "--top-k",
        type=int,
        default=10,
        help="how many pieces to print, largest first; by head or neuron only heads or neurons (default 10); "
        "a last line says what the rest adds",
    )
    dla.add_argument("--top", type=int, dest="top_k", help=argparse.SUPPRESS)  # the old spelling of --top-k
    dla.add_argument("--out", metavar="DIR", help="folder for the figure, CSV and summary.json")
    _html(dla)
    _common(dla)
    dla.set_defaults(func=cmd_dla)


def _add_eval(sub: Any) -> None:
    """Add the ``eval`` sub-command (streamed lens statistics) and its options to ``sub``."""
    ev = sub.add_parser(
        "eval",
        formatter_class=FORMATTER,
        help="lens statistics over a dataset, streamed",
        description="Per-layer KL to final, loss, entropy and accuracy over a dataset, in bounded memory.",
        epilog="example:\n  tl-logitlens eval --model ./stories260k --data stories.txt --max-tokens 20000 "
        "--out eval-out\n"
        "  tl-logitlens eval --model demo --data tokens.pt --quiet\n"
        "  tl-logitlens eval --model ./stories260k --data stories.txt --lens tuned-lens-dir --out cmp-out",
    )
    _data(ev)
    ev.add_argument("--max-tokens", type=int, help="stop after this many tokens")
    ev.add_argument("--batch-size", type=int, default=8, help="documents per forward pass (default 8)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.add_argument(
        "--out",
        metavar="DIR",
        help="folder for lens_eval.csv, lens_eval.json and the lens_eval figure "
        "(with --lens: lens_compare.csv, lens_compare.json and its figure)",
    )
    ev.add_argument(
        "--lens",
        metavar="PATH",
        help="also evaluate this lens (a tuned lens's folder, or a Jacobian lens's .pt file) "
        "and compare it with the logit lens, in the same pass",
    )
    _html(ev)
    _common(ev)
    ev.set_defaults(func=cmd_eval)


def _add_train_lens(sub: Any) -> None:
    """Add the ``train-lens`` sub-command (train a tuned lens) and its options to ``sub``."""
    tr = sub.add_parser(
        "train-lens",
        formatter_class=FORMATTER,
        help="train a tuned lens on a dataset",
        description="Train one affine translator per layer (the tuned lens) so that each layer's reading "
        "matches the final distribution; write it in the tuned-lens format with a checkpoint "
        "that --resume continues.",
        epilog="example:\n  tl-logitlens train-lens --model ./stories260k --data stories.txt --steps 50 "
        "--tokens-per-step 4096 --out stories-lens\n"
        "  tl-logitlens train-lens --model ./stories260k --data stories.txt --steps 50 "
        "--tokens-per-step 4096 --out stories-lens --resume",
    )
    _data(tr)
    tr.add_argument("--steps", type=int, default=250, help="optimiser steps (default 250, as tuned-lens)")
    tr.add_argument(
        "--tokens-per-step", type=int, default=2**18, help="tokens per step (default 262144, as tuned-lens)"
    )
    tr.add_argument("--batch-size", type=int, default=8, help="documents per forward pass (default 8)")
    tr.add_argument(
        "--loss",
        choices=("kl", "ce"),
        default="kl",
        help="kl: KL from the final distribution (default); ce: next-token cross-entropy",
    )
    tr.add_argument("--incl-mid", action="store_true", help="also train translators for the L_mid entries")
    tr.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default min(50, steps // 5))")
    tr.add_argument(
        "--out",
        metavar="DIR",
        default="tuned-lens",
        help="folder for the lens (config.json, params.pt) and checkpoint.pt (default ./tuned-lens)",
    )
    tr.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --out (same settings and data); without it an existing "
        "checkpoint is refused",
    )
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    _common(tr)
    tr.set_defaults(func=cmd_train_lens)


def _add_fit_lens(sub: Any) -> None:
    """Add the ``fit-lens`` sub-command (fit a Jacobian lens) and its options to ``sub``."""
    fit = sub.add_parser(
        "fit-lens",
        formatter_class=FORMATTER,
        help="fit a Jacobian lens on a dataset",
        description="Fit one linear map per layer (the Jacobian lens: the average derivative of the final "
        "stream with respect to the layer's stream, TransformerLens 4.3's estimator) and write it in "
        "TransformerLens's artifact format. Under torchrun the prompts are shared among the ranks.",
        epilog="example:\n  tl-logitlens fit-lens --kind jacobian --model ./stories260k --data stories.txt "
        "--out stories-jlens.pt\n"
        "  tl-logitlens lens --model ./stories260k --prompt 'Once upon a time' --lens stories-jlens.pt "
        "--layers 1_pre,2_pre,final_post",
    )
    fit.add_argument(
        "--kind", choices=("jacobian",), default="jacobian", help="the lens to fit (train-lens fits the tuned lens)"
    )
    _data(fit)
    fit.add_argument("--out", metavar="FILE", default="jacobian-lens.pt", help="the lens's .pt file")
    fit.add_argument("--source-layers", metavar="L,..", help="stack entries to fit (default every L_pre)")
    fit.add_argument("--incl-mid", action="store_true", help="also fit the L_mid entries")
    fit.add_argument("--max-seq-len", type=int, default=128, help="prompts are cut to this many tokens (default 128)")
    fit.add_argument(
        "--skip-first-positions", type=int, default=16, help="leading positions left out of the average (default 16)"
    )
    fit.add_argument(
        "--checkpoint-every", type=int, help="prompts between checkpoints (in OUT.checkpoints/; default none)"
    )
    fit.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUT.checkpoints/")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    _common(fit)
    fit.set_defaults(func=cmd_fit_lens)
