"""The ``tl-logitlens`` command line: the package's analyses on prompts, from a terminal.

Commands (``tl-logitlens COMMAND --help`` documents every option with an example)::

    tl-logitlens demo [--n N] [--out DIR]
    tl-logitlens lens --model MODEL (--prompt TEXT ... | --prompts FILE | --tokens IDS ...) [--position P]
                      [--layers L,..] [--metric M] [--top-k K] [--target TOKEN ...] [--norm N] [--out DIR]
    tl-logitlens dla  --model MODEL (--prompt ... | --prompts ... | --tokens ...) --answer TOKEN [--wrong TOKEN]
                      [--by KIND] [--position P] [--top K] [--out DIR]
    tl-logitlens eval --model MODEL --data FILE [--max-tokens N] [--out DIR]

Every command also takes ``--device``, ``--dtype``, ``--format png|pdf|svg``, ``--dpi`` and
``--verbose``. ``MODEL`` is ``demo`` (the built-in model), a local Hugging Face model folder
(booted through ``TransformerBridge``, transformer-lens 3.x/4.x), or a hub name (needs the hub).
A token (``--answer``, ``--wrong``, ``--target``) is its text or vocabulary piece, or ``id:N``
for the id ``N`` (so that ``317`` stays the text "317").

Usage errors exit with status 2 and one line on stderr, never a traceback. Building the parser
imports neither torch nor transformer_lens, matplotlib or pandas, so ``--help`` and errors that
need no model answer at once; the heavy imports happen inside the commands.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

from .errors import LensInputError, ModelStateError, NonFiniteActivationError, UnsupportedModelError

METRICS = ("prob", "logit", "rank", "entropy", "kl", "loss")
DTYPES = ("float32", "float64", "bfloat16", "float16")
FORMATS = ("png", "pdf", "svg")
_DEVICE_RE = re.compile(r"^(cpu|cuda|mps|xpu)(:\d+)?$")
_DEMO_CONFIG = Path(__file__).resolve().parent / "demo" / "demo_config.json"


class UsageError(Exception):
    """A mistake in how the command was called: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(message)


# -- argument checks that need no model (and no torch) ------------------------------------
def parse_token(spec: Optional[str], option: str) -> Union[None, int, str]:
    """``id:N`` -> the int ``N``; anything else stays text (the token's text or vocabulary piece)."""
    if spec is None:
        return None
    if spec.startswith("id:"):
        digits = spec[3:].strip()
        if not digits.isdigit():
            raise UsageError(f"{option} {spec!r}: after 'id:' give a token id (a non-negative integer), e.g. id:317")
        return int(digits)
    if spec == "":
        raise UsageError(f"{option} is empty; give a token's text, its vocabulary piece, or id:N")
    return spec


def parse_tokens(values: Sequence[str]) -> List[List[int]]:
    """``--tokens`` values as prompts of ids: ids split by commas or spaces, prompts by ``;``."""
    prompts = []
    for value in values:
        for part in value.split(";"):
            if not part.strip():
                raise UsageError(f"--tokens {value!r} holds an empty prompt; give ids like 49,12,7,50 (prompts split by ';')")
            pieces = [p for p in re.split(r"[,\s]+", part.strip()) if p]
            bad = [p for p in pieces if not p.isdigit()]
            if bad:
                raise UsageError(f"--tokens {value!r}: {bad[0]!r} is not a token id; give non-negative integers like 49,12,7,50")
            prompts.append([int(p) for p in pieces])
    return prompts


def parse_layers(spec: Optional[str]) -> Optional[List[Union[int, str]]]:
    """``--layers 0,2,-1,final_post``: stack entries by index (negative counts from the end) or label."""
    if spec is None:
        return None
    items = [s.strip() for s in spec.split(",")]
    if not all(items):
        raise UsageError(f"--layers {spec!r} has an empty entry; give indices or labels like 0,2,final_post")
    return [int(s) if re.fullmatch(r"-?\d+", s) else s for s in items]


def _read_text(path: str, what: str, option: str) -> str:
    file = Path(path)
    if not file.is_file():
        kind = "is a folder, not a file" if file.is_dir() else ("is not a regular file" if file.exists() else "does not exist")
        raise UsageError(f"{option}: {path!r} {kind}; pass {what}")
    raw = file.read_bytes()
    if b"\x00" in raw:
        raise UsageError(f"{option}: {path!r} looks binary (it holds NUL bytes); pass {what}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{option}: {path!r} is not UTF-8 text (byte {err.start}); pass {what}") from None


def _prompt_spec(args: argparse.Namespace) -> Dict[str, Any]:
    """The prompts as given: ``{"text": [str, ...]}`` or ``{"tokens": [[int, ...], ...]}``."""
    if args.tokens:
        prompts = parse_tokens(args.tokens)
        lengths = sorted({len(p) for p in prompts})
        if len(lengths) > 1:
            raise UsageError(
                f"the --tokens prompts have different lengths {lengths}; token prompts are read as one "
                "[batch, pos] tensor, all of it real tokens, so give prompts of equal length (or run them separately)"
            )
        return {"tokens": prompts}
    if args.prompts is not None:
        text = _read_text(args.prompts, "a UTF-8 text file with one prompt per line", "--prompts")
        prompts = [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise UsageError(f"--prompts: {args.prompts!r} holds no prompt (every line is empty)")
        return {"text": prompts}
    for prompt in args.prompt:
        if not prompt.strip():
            raise UsageError("--prompt is empty; give the text to read")
    return {"text": list(args.prompt)}


def _check_out(out: Optional[str]) -> Optional[Path]:
    """The output folder, refused before any work if it names an existing file."""
    if out is None:
        return None
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out!r} is an existing file, not a folder; name a folder (it is created if missing)")
    return path


def _make_out(path: Optional[Path]) -> Optional[Path]:
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {str(path)!r}: cannot create the folder ({err.strerror})") from None
    return path


def _check_device_syntax(spec: str) -> None:
    if not _DEVICE_RE.match(spec):
        raise UsageError(f"--device {spec!r} is not a device; use cpu, cuda, cuda:N or mps")


def _check_model_spec(spec: str) -> None:
    path = Path(spec).expanduser()
    looks_local = spec.startswith((".", "/", "~")) or path.exists()
    if spec != "demo" and looks_local and not path.is_dir():
        raise UsageError(f"no model directory at {spec!r}; pass 'demo', a local Hugging Face model folder, or a hub name")


def _check_common(args: argparse.Namespace) -> None:
    """Every check that needs neither torch nor a model, in one place, before any import."""
    _check_device_syntax(args.device)
    if getattr(args, "model", None) is not None:
        _check_model_spec(args.model)
    if args.dpi <= 0:
        raise UsageError(f"--dpi must be a positive number, got {args.dpi}")
    _check_out(args.out)


# -- torch, devices, dtypes, models -------------------------------------------------------
def resolve_device(spec: str) -> Any:
    """``--device`` as a ``torch.device`` that exists on this machine, or a usage error saying why not."""
    import torch

    _check_device_syntax(spec)
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine (torch {torch.__version__} "
                             "sees no CUDA device); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered 0..{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {spec}: MPS (Apple GPU) is not available on this machine; use --device cpu")
    elif device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise UsageError(f"--device {spec}: no XPU is available on this machine; use --device cpu")
    return device


def resolve_dtype(name: str) -> Any:
    """``--dtype`` name as a ``torch.dtype``."""
    import torch

    if name not in DTYPES:
        raise UsageError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_model(spec: str, device: str = "cpu", dtype: str = "float32") -> Any:
    """``demo``, a local HF model directory, or a hub name, as a TransformerLens model in eval mode.

    An HF folder is booted with the dtype and device directly; the demo model is built on the
    CPU in float32 and cast with ``.to``.
    """
    _check_model_spec(spec)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    if spec == "demo":
        from .demo import demo_model

        from .model_access import prepare_model

        with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints what it moves and casts
            return prepare_model(demo_model(), dtype=torch_dtype, device=torch_device)
    path = Path(spec).expanduser()
    looks_local = spec.startswith((".", "/", "~")) or path.exists()
    from .model_access import TransformerBridge

    if TransformerBridge is None:
        raise UsageError(
            "loading a Hugging Face model needs transformer-lens 3.x or 4.x (TransformerBridge); "
            "with 2.x, load the model in Python and call tl_logitlens directly"
        )
    _silence_loaded_libraries()
    try:
        model = TransformerBridge.boot_transformers(str(path) if looks_local else spec, device=str(torch_device),
                                                    dtype=torch_dtype)
    except Exception as err:  # noqa: BLE001 - any loader failure is reported in one line
        where = f"the folder {spec!r}" if looks_local else f"the hub name {spec!r} (is the hub reachable?)"
        raise UsageError(f"could not load a model from {where}: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}") from None
    return model.eval()


def _prompt_input(model: Any, prompts: Dict[str, Any]) -> Any:
    """Prompts as the API takes them: one text, a list of texts, or an id tensor ``[batch, pos]``."""
    if "tokens" in prompts:
        import torch

        return torch.tensor(prompts["tokens"], dtype=torch.long)
    if getattr(model, "tokenizer", None) is None:
        raise UsageError("this model has no tokenizer, so --prompt text cannot be read; pass --tokens ids instead")
    text = prompts["text"]
    return text[0] if len(text) == 1 else text


def _tokens_arg(values: Optional[Sequence[str]], option: str) -> Any:
    """Repeated ``--answer``/``--wrong``: one token shared by all prompts, or one per prompt."""
    if not values:
        return None
    tokens = [parse_token(v, option) for v in values]
    return tokens[0] if len(tokens) == 1 else tokens


# -- quiet output -------------------------------------------------------------------------
_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
              "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def _silence_loaded_libraries() -> None:
    """Turn off transformers' and huggingface_hub's logs and progress bars (e.g. 'Loading weights')."""
    if os.environ.get("TL_LOGITLENS_VERBOSE") == "1":
        return
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


@contextlib.contextmanager
def _output_policy(verbose: bool) -> Iterator[None]:
    """Unless ``verbose``: no third-party warnings, logs or progress bars; this package's own
    warnings as one line each. Everything is restored afterwards (``main`` may run in-process)."""
    saved_env = {k: os.environ.get(k) for k in (*_QUIET_ENV, "TL_LOGITLENS_VERBOSE")}
    saved_hf = None
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        saved_hf = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    saved_hub = None
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import are_progress_bars_disabled

        saved_hub = are_progress_bars_disabled()
    with warnings.catch_warnings():
        if verbose:
            os.environ["TL_LOGITLENS_VERBOSE"] = "1"
        else:
            os.environ.pop("TL_LOGITLENS_VERBOSE", None)
            os.environ.update(_QUIET_ENV)
            warnings.simplefilter("ignore")
            warnings.filterwarnings("always", module=r"tl_logitlens(\.|$)")

            def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
                print(f"tl-logitlens: warning: {message}", file=sys.stderr)

            warnings.showwarning = show
            _silence_loaded_libraries()
        try:
            yield
        finally:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            if "transformers" in sys.modules:
                from transformers.utils import logging as hf_logging

                verbosity, bars = saved_hf if saved_hf is not None else (hf_logging.WARNING, True)
                hf_logging.set_verbosity(verbosity)
                (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
            if "huggingface_hub" in sys.modules:
                from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

                (disable_progress_bars if saved_hub else enable_progress_bars)()


# -- files ----------------------------------------------------------------------------------
def _save(fig: Any, out: Path, stem: str, args: argparse.Namespace, written: List[str]) -> None:
    name = f"{stem}.{args.format}"
    fig.savefig(out / name, dpi=args.dpi, bbox_inches="tight")
    written.append(str(out / name))
    import matplotlib.pyplot as plt

    plt.close(fig)


def _write_table(frame: Any, out: Path, name: str, written: List[str]) -> None:
    frame.to_csv(out / name, index=False)
    written.append(str(out / name))


def _write_summary(summary: Dict[str, Any], out: Path, written: List[str]) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    written.append(str(out / "summary.json"))
    print("\nWrote:\n  " + "\n  ".join(written))


# -- reports ----------------------------------------------------------------------------------
def lens_summary(result: Any, position: int = -1, prompt: int = 0) -> List[Dict[str, Any]]:
    """Each layer's top-1 prediction (and every target's probability and rank) at one position of one prompt."""
    rows = []
    for i, label in enumerate(result.labels):
        index = (i, prompt, position) if result.has_pos_axis else (i, prompt)
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
            row["targets"] = [
                {"token": result.decode(int(t)), "prob": round(float(p), 4), "rank": int(r)}
                for t, p, r in zip(result.target_ids[index], result.target_probs[index], result.target_ranks[index])
            ]
        rows.append(row)
    return rows


def _print_lens(rows: List[Dict[str, Any]], token: str, where: str = "") -> None:
    print(f"What each layer predicts after {token!r}{where}:")
    for row in rows:
        extra = "".join(f"   {t['token']!r}: p={t['prob']:.3f} rank={t['rank']}" for t in row.get("targets", []))
        print(f"  {row['layer']:>11}  {row['top1']!r:<16} p={row['top1_prob']:.3f}{extra}")


def attribution_rows(att: Any, k: int) -> List[Any]:
    """What the ``dla`` command prints: the ``k`` largest pieces, or every stack entry in layer
    order for ``by="accumulated"`` (the stream grows layer by layer; sorting it by size hides that)."""
    if att.by == "accumulated":
        mean = att.values.reshape(att.values.shape[0], -1).mean(1)
        return [(label, float(v)) for label, v in zip(att.labels, mean.tolist())]
    return att.top(k)


def _print_attribution(att: Any, k: int) -> None:
    value = float(att.model_value.mean())
    what = "logit difference" if att.wrong_ids is not None else "logit"
    print(f"Direct logit attribution (by={att.by}) of the {what} {value:.3f}; "
          f"constant terms {float(att.constant.mean()):.3f}; residual error {att.residual_error():.2e}")
    for label, v in attribution_rows(att, k):
        print(f"  {label:>14}  {v:+.3f}")


# -- commands -------------------------------------------------------------------------------
_GRAD_STATE: List[bool] = []


def _start_torch() -> None:
    """Import torch (only now: ``--help`` and usage errors never pay for it) and turn off autograd."""
    import torch

    _GRAD_STATE.append(torch.is_grad_enabled())
    torch.set_grad_enabled(False)


def cmd_demo(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the built-in model on an induction prompt and write every figure and table."""
    n_ctx = json.loads(_DEMO_CONFIG.read_text())["model"]["n_ctx"]
    most = (n_ctx - 1) // 2
    if not 2 <= args.n <= most:
        raise UsageError(f"--n {args.n}: the prompt <bos> + n words + n words must fit the demo model's context of "
                         f"{n_ctx} tokens and hold two different words; give 2 <= n <= {most}")
    out = _check_out(args.out)
    _start_torch()
    import tl_logitlens as tll
    from .demo import INDUCTION_HEAD, induction_prompt

    model = load_model("demo", args.device, args.dtype)
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
    head_top = sorted(heads.top(len(heads.labels)), key=lambda item: -item[1])[:3]
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
    out = _make_out(out)
    if out is not None:
        from . import plots

        written: List[str] = []
        _save(plots.plot_lens(lens), out, "lens_heatmap", args, written)
        _save(plots.plot_trajectory(at_end), out, "trajectory", args, written)
        _save(plots.plot_lens_metrics(lens), out, "lens_metrics", args, written)
        _save(plots.plot_attribution(components), out, "attribution_components", args, written)
        _save(plots.plot_attribution(heads), out, "attribution_heads", args, written)
        _save(plots.plot_attribution(neurons), out, "attribution_neurons", args, written)
        for name, result in (("lens.csv", lens), ("attribution_components.csv", components),
                             ("attribution_heads.csv", heads), ("attribution_neurons.csv", neurons)):
            _write_table(result.to_dataframe(), out, name, written)
        _write_summary(summary, out, written)
    return summary


def cmd_lens(args: argparse.Namespace) -> Dict[str, Any]:
    """The logit lens on one or more prompts: a table of each layer's prediction, and optional files."""
    prompts = _prompt_spec(args)
    layers = parse_layers(args.layers)
    targets = None if not args.target else [parse_token(t, "--target") for t in args.target]
    out = _check_out(args.out)
    _start_torch()
    import tl_logitlens as tll

    model = load_model(args.model, args.device, args.dtype)
    prompt = _prompt_input(model, prompts)
    common = dict(layers=layers, top_k=args.top_k, norm=args.norm)
    at = tll.logit_lens(model, prompt, positions=args.position, targets=targets, **common)
    n_prompts = int(at.lengths.shape[0])
    tables = []
    for b in range(n_prompts):
        rows = lens_summary(at, prompt=b)
        token = at.input_tokens()[b][0] if at.input_ids is not None else "?"
        where = f" (prompt {b}, position {int(at.positions[b, 0])})" if n_prompts > 1 or args.position != -1 else ""
        if b:
            print()
        _print_lens(rows, token, where)
        tables.append(rows)
    summary = {"model": args.model, "prompts": prompts.get("text", prompts.get("tokens")), "norm": args.norm,
               "position": args.position, "dtype": args.dtype, "device": args.device,
               "lens_at_position": tables, "lens_at_last_position": tables[0]}
    out = _make_out(out)
    if out is not None:
        from . import plots

        full = tll.logit_lens(model, prompt, targets="next" if args.metric == "rank" else None, **common)
        written: List[str] = []
        _save(plots.plot_lens(full, metric=args.metric), out, "lens_heatmap", args, written)
        if targets is not None:
            _save(plots.plot_trajectory(at), out, "trajectory", args, written)
        _save(plots.plot_lens_metrics(full), out, "lens_metrics", args, written)
        _write_table(full.to_dataframe(), out, "lens.csv", written)
        _write_summary(summary, out, written)
    return summary


def cmd_dla(args: argparse.Namespace) -> Dict[str, Any]:
    """Direct logit attribution of an answer (or answer - wrong) on one or more prompts."""
    prompts = _prompt_spec(args)
    answers = _tokens_arg(args.answer, "--answer")
    wrong = _tokens_arg(args.wrong, "--wrong")
    if args.top <= 0:
        raise UsageError(f"--top must be a positive number of rows, got {args.top}")
    out = _check_out(args.out)
    _start_torch()
    import tl_logitlens as tll

    model = load_model(args.model, args.device, args.dtype)
    prompt = _prompt_input(model, prompts)
    att = tll.direct_logit_attribution(model, prompt, answers=answers, wrong=wrong, by=args.by,
                                       positions=args.position)
    _print_attribution(att, args.top)
    summary = {
        "model": args.model, "prompts": prompts.get("text", prompts.get("tokens")),
        "answer": answers, "wrong": wrong, "by": args.by, "position": args.position,
        "dtype": args.dtype, "device": args.device,
        "model_value": float(att.model_value.mean()), "constant": float(att.constant.mean()),
        "model_values": att.model_value.reshape(-1).tolist(),
        "residual_error": att.residual_error(), "top": dict(attribution_rows(att, args.top)),
    }
    out = _make_out(out)
    if out is not None:
        from . import plots

        written: List[str] = []
        _save(plots.plot_attribution(att), out, f"attribution_{args.by}", args, written)
        _write_table(att.to_dataframe(), out, f"attribution_{args.by}.csv", written)
        _write_summary(summary, out, written)
    return summary


def _read_data(path: str) -> Any:
    """A ``.pt`` token tensor ``[n, seq]`` or a UTF-8 text file (one document per line), checked."""
    what = "a UTF-8 text file (one document per line) or a .pt token tensor [n, seq]"
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"no data file at {path!r}; pass {what}")
    if file.suffix == ".pt":
        import torch

        try:
            data = torch.load(file, weights_only=True, map_location="cpu")
        except Exception as err:  # noqa: BLE001 - a damaged or foreign file, in one line
            raise UsageError(f"--data {path!r} is not a readable torch file ({type(err).__name__}); pass {what}") from None
        if not isinstance(data, torch.Tensor):
            raise UsageError(f"--data {path!r} holds a {type(data).__name__}, not a token tensor [n, seq]")
        if data.dtype.is_floating_point or data.dtype.is_complex or data.dtype == torch.bool or data.ndim not in (1, 2):
            raise UsageError(f"--data {path!r} holds a {data.dtype} tensor of shape {tuple(data.shape)}; "
                             "expected integer token ids [n, seq]")
        if data.numel() == 0:
            raise UsageError(f"--data {path!r} holds an empty tensor")
        return data if data.ndim == 2 else data.unsqueeze(0)
    text = _read_text(path, what, "--data")
    docs = [line for line in text.splitlines() if line.strip()]
    if not docs:
        raise UsageError(f"--data {path!r} holds no text")
    return docs


def cmd_eval(args: argparse.Namespace) -> Dict[str, Any]:
    """Streaming lens statistics over a dataset."""
    out = _check_out(args.out)
    if not Path(args.data).is_file():
        raise UsageError(f"no data file at {args.data!r}; pass a UTF-8 text file (one document per line) "
                         "or a .pt token tensor [n, seq]")
    _start_torch()
    import tl_logitlens as tll

    data = _read_data(args.data)
    model = load_model(args.model, args.device, args.dtype)
    evaluation = tll.evaluate_lens(model, data, batch_size=args.batch_size, max_tokens=args.max_tokens,
                                   progress=not args.quiet)
    frame = evaluation.to_dataframe()
    shown = ["layer", "kl_to_final_mean", "next_token_loss_mean", "perplexity", "entropy_mean", "top1_agreement", "top1_accuracy"]
    print(f"{evaluation.n_tokens} tokens")
    print(frame[[c for c in shown if c in frame]].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    out = _make_out(out)
    if out is not None:
        written: List[str] = []
        _write_table(frame, out, "lens_eval.csv", written)
        evaluation.save(out / "lens_eval.json")
        written.append(str(out / "lens_eval.json"))
        _save(evaluation.plot(), out, "lens_eval", args, written)
        print("\nWrote:\n  " + "\n  ".join(written))
    return {"tokens": evaluation.n_tokens}


# -- parser -----------------------------------------------------------------------------------
MODEL_HELP = "'demo' (built in), a local Hugging Face model folder, or a hub name (needs the hub)"
TOKEN_HELP = "a token's text, its exact vocabulary piece, or id:N for token id N"


def _common(sub: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        sub.add_argument("--model", required=True, help=MODEL_HELP)
    sub.add_argument("--device", default="cpu", help="where to run: cpu (default), cuda, cuda:N or mps")
    sub.add_argument("--dtype", choices=DTYPES, default="float32",
                     help="model precision (default float32); an HF folder is loaded in it, the demo model cast to it")
    sub.add_argument("--format", choices=FORMATS, default="png", help="figure file format (default png)")
    sub.add_argument("--dpi", type=float, default=130, help="figure resolution in dots per inch (default 130)")
    sub.add_argument("--verbose", action="store_true",
                     help="let third-party warnings, logs and progress bars through (hidden by default)")


def _prompts(sub: argparse.ArgumentParser) -> None:
    group = sub.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", action="append", metavar="TEXT",
                       help="a prompt as text; repeat for several prompts (right-padded, each keeps its own length)")
    group.add_argument("--prompts", metavar="FILE", help="a UTF-8 text file with one prompt per line")
    group.add_argument("--tokens", action="append", metavar="IDS",
                       help="a prompt as token ids, e.g. 49,12,7,50 (commas or spaces); repeat it or separate prompts "
                            "with ';' for several prompts, which must then have equal lengths")
    sub.add_argument("--position", type=int, default=-1,
                     help="the position read: 0-based, negative counts back from each prompt's last token (default -1)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command (imports nothing heavy)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="tl-logitlens", formatter_class=fmt,
        description="The logit lens and direct logit attribution for TransformerLens models.",
        epilog="examples:\n  tl-logitlens demo --out logitlens-demo\n"
               "  tl-logitlens lens --model demo --prompt 'red cat sun red cat' --target sun\n"
               "  tl-logitlens dla --model ./my-hf-model --prompt 'The capital of France is' --answer ' Paris' --wrong ' Rome' --by head\n"
               "  tl-logitlens lens --model ./capp-gpt2 --tokens 49,12,7,50 --target id:14\n"
               "  tl-logitlens eval --model ./stories260k --data stories.txt --out eval-out",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    demo = sub.add_parser("demo", formatter_class=fmt, help="run the built-in induction model and write every figure",
                          description="Run the built-in model on a repeated random word sequence, print what each layer "
                                      "predicts and which heads write the answer, and write figures, tables and summary.json.",
                          epilog="example:\n  tl-logitlens demo --n 12 --seed 0 --format svg --out logitlens-demo")
    demo.add_argument("--out", metavar="DIR", help="folder for figures, CSV tables and summary.json (created if missing)")
    demo.add_argument("--n", type=int, default=12, help="words in the repeated sequence, 2..31 (default 12)")
    demo.add_argument("--seed", type=int, default=0, help="seed for the random words (default 0)")
    _common(demo, model=False)
    demo.set_defaults(func=cmd_demo)

    lens = sub.add_parser("lens", formatter_class=fmt, help="what each layer predicts (the logit lens)",
                          description="Read every layer's residual stream through the final norm and unembedding; "
                                      "print each layer's top token (and targets) at --position of every prompt.",
                          epilog="example:\n  tl-logitlens lens --model demo --prompt 'red cat sun red cat' --target sun "
                                 "--layers 0,-1 --out lens-out\n"
                                 "  tl-logitlens lens --model ./capp-gpt2 --tokens '49,12,7;49,12,8' --target id:50 --position 2")
    _prompts(lens)
    lens.add_argument("--layers", metavar="L,..", help="stack entries to read, by index (negative from the end) or "
                                                       "label, comma-separated, e.g. 0,2,final_post (default all)")
    lens.add_argument("--metric", choices=METRICS, default="prob",
                      help="heatmap colour: top-1 prob, top-1 logit, rank of the true next token, entropy, KL to final, or next-token loss")
    lens.add_argument("--top-k", type=int, default=5, help="top tokens kept per cell (default 5)")
    lens.add_argument("--target", action="append", metavar="TOKEN",
                      help=f"a token to follow across layers (probability and rank): {TOKEN_HELP}; repeat for several")
    lens.add_argument("--norm", choices=("recompute", "cached", "none"), default="recompute",
                      help="final norm: own statistics (default), the final stream's scale, or none")
    lens.add_argument("--out", metavar="DIR", help="folder for the heatmap, curves, lens.csv and summary.json")
    _common(lens)
    lens.set_defaults(func=cmd_lens)

    dla = sub.add_parser("dla", formatter_class=fmt, help="which components write the answer (direct logit attribution)",
                         description="Attribute the answer's logit (or answer - wrong) at --position to components; "
                                     "several prompts are averaged. The final norm's scale is the forward pass's own "
                                     "(cached), which keeps the pieces adding up to the model's logit exactly.",
                         epilog="example:\n  tl-logitlens dla --model demo --prompt 'red cat sun red cat' --answer sun --wrong red --by head\n"
                                "  tl-logitlens dla --model ./capp-gpt2 --tokens 49,12,7,50 --answer id:14 --by accumulated")
    _prompts(dla)
    dla.add_argument("--answer", required=True, action="append", metavar="TOKEN",
                     help=f"the correct next token: {TOKEN_HELP}; repeat once per prompt for different answers")
    dla.add_argument("--wrong", action="append", metavar="TOKEN",
                     help="a wrong token (same forms): attribute the logit difference answer - wrong")
    dla.add_argument("--by", choices=("component", "head", "neuron", "accumulated"), default="component",
                     help="split by component (default), head, neuron, or accumulated layer (printed in layer order)")
    dla.add_argument("--top", type=int, default=10,
                     help="how many pieces to print, largest first; by head or neuron only heads or neurons (default 10)")
    dla.add_argument("--out", metavar="DIR", help="folder for the figure, CSV and summary.json")
    _common(dla)
    dla.set_defaults(func=cmd_dla)

    ev = sub.add_parser("eval", formatter_class=fmt, help="lens statistics over a dataset, streamed",
                        description="Per-layer KL to final, loss, entropy and accuracy over a dataset, in bounded memory.",
                        epilog="example:\n  tl-logitlens eval --model ./stories260k --data stories.txt --max-tokens 20000 --out eval-out\n"
                               "  tl-logitlens eval --model demo --data tokens.pt --quiet")
    ev.add_argument("--data", required=True, metavar="FILE", help="a UTF-8 text file (one document per line) or a .pt token tensor [n, seq]")
    ev.add_argument("--max-tokens", type=int, help="stop after this many tokens")
    ev.add_argument("--batch-size", type=int, default=8, help="documents per forward pass (default 8)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.add_argument("--out", metavar="DIR", help="folder for lens_eval.csv, lens_eval.json and the lens_eval figure")
    _common(ev)
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tl-logitlens`` and ``python -m tl_logitlens``; returns the exit status."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        args = build_parser().parse_args(argv)
        _check_common(args)
        with _output_policy(args.verbose):
            args.func(args)
    except UsageError as err:
        print(f"tl-logitlens: error: {err}", file=sys.stderr)
        return 2
    except (LensInputError, ModelStateError, UnsupportedModelError, NonFiniteActivationError) as err:
        # The package's messages name the problem and the mend; one line here, whatever their layout.
        print(f"tl-logitlens: error: {' '.join(str(err).split()) or type(err).__name__}", file=sys.stderr)
        return 2
    finally:
        while _GRAD_STATE:
            import torch

            torch.set_grad_enabled(_GRAD_STATE.pop())
    return 0


if __name__ == "__main__":
    sys.exit(main())
