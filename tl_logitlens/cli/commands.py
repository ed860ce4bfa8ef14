"""The commands: each reads its arguments, runs the package's analyses, prints a report and writes files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import LensInputError
from .arguments import (
    CHECKPOINT,
    DEMO_CONFIG,
    UsageError,
    check_html,
    check_out,
    load_model,
    make_out,
    parse_layers,
    parse_token,
    prompt_input,
    prompt_spec,
    read_data,
    tokens_arg,
)
from .output import (
    attribution_rows,
    attribution_stem,
    lens_summary,
    print_attribution,
    print_lens,
    save_figure,
    write_page,
    write_summary,
    write_table,
)

# -- commands -------------------------------------------------------------------------------
GRAD_STATE: List[bool] = []


def _start_torch() -> None:
    """Import torch (only now: ``--help`` and usage errors never pay for it) and turn off autograd."""
    import torch

    GRAD_STATE.append(torch.is_grad_enabled())
    torch.set_grad_enabled(False)


def _lens_dir(spec: Optional[str]) -> Optional[Path]:
    """``--lens PATH`` checked before any import: a tuned lens's folder (config.json) or a Jacobian lens's file."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    if path.is_file():
        return path  # a Jacobian lens (.pt): JacobianLens.load names what it holds if it is not one
    if not path.is_dir():
        raise UsageError(
            f"--lens {spec!r}: no such folder or file; pass a tuned lens's folder (TunedLens.save or tuned-lens: "
            "config.json and params.pt) or a Jacobian lens's .pt file (JacobianLens.save or TransformerLens)"
        )
    if not (path / "config.json").is_file():
        raise UsageError(
            f"--lens {spec!r} holds no config.json; pass a folder written by TunedLens.save or "
            "tuned-lens (config.json and params.pt), or a Jacobian lens's .pt file"
        )
    return path


def _load_lens(path: Optional[Path], model: Any) -> Any:
    """The lens at ``path`` for ``model``: a folder is a tuned lens, a file a Jacobian lens (their loaders check
    what does not match), or ``None``."""
    if path is None:
        return None
    import tl_logitlens as tll

    if path.is_file():
        return tll.JacobianLens.load(path, model)
    return tll.TunedLens.load(path, model)


def cmd_demo(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the built-in model on an induction prompt and write every figure and table."""
    n_ctx = json.loads(DEMO_CONFIG.read_text())["model"]["n_ctx"]
    most = (n_ctx - 1) // 2
    if not 2 <= args.n <= most:
        raise UsageError(
            f"--n {args.n}: the prompt <bos> + n words + n words must fit the demo model's context of "
            f"{n_ctx} tokens and hold two different words; give 2 <= n <= {most}"
        )
    out = check_out(args.out, args.overwrite)
    _start_torch()
    import tl_logitlens as tll

    from ..demo import INDUCTION_HEAD, induction_prompt

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
    print_lens(rows, lens.decode(int(tokens[0, -1])))
    print(f"\nThe answer is {lens.decode(answer)!r} (copied from the first repeat); wrong is {lens.decode(wrong)!r}.")
    print("Top heads by direct logit attribution:")
    # The heads that write the answer: largest positive direct effect on the logit difference.
    head_top = sorted(heads.top(len(heads.labels)), key=lambda item: -item[1])[:3]
    for label, v in head_top:
        print(f"  {label:>6}  {v:+.3f}")
    print(
        f"(layer {INDUCTION_HEAD[0]} is the induction layer; its heads share the copying, and averaged "
        f"over prompts L{INDUCTION_HEAD[0]}H{INDUCTION_HEAD[1]} writes the most)"
    )

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
    out = make_out(out, args.overwrite)
    if out is not None:
        from .. import plots

        written: List[str] = []
        save_figure(plots.plot_lens(lens), out, "lens_heatmap", args, written)
        save_figure(plots.plot_trajectory(at_end), out, "trajectory", args, written)
        save_figure(plots.plot_lens_metrics(lens), out, "lens_metrics", args, written)
        attributions = {attribution_stem(a.by): a for a in (components, heads, neurons)}
        for stem, result in attributions.items():
            save_figure(plots.plot_attribution(result), out, stem, args, written)
        for stem, result in {"lens": lens, **attributions}.items():
            write_table(result.to_dataframe(), out, f"{stem}.csv", written)
        _demo_pages(out, written, {"lens": lens, **attributions})
        write_summary(summary, out, written)
    return summary


def _demo_pages(out: Any, written: List[str], pages: Dict[str, Any]) -> None:
    """The interactive pages (when plotly is installed), sharing one plotly.min.js, and index.html, which
    shows or links every file."""
    import importlib.util

    from ..demo.index import index_html

    notes = ["The built-in model on a repeated random word sequence: the logit lens and direct logit attribution."]
    if importlib.util.find_spec("plotly") is not None:
        from ..plots.interactive import page_of, write_plotlyjs

        written.append(str(write_plotlyjs(None, folder=out)))
        for stem, result in pages.items():
            written.append(str(out.write_text(f"{stem}.html", page_of(result, plotly="directory"))))
    else:
        notes.append("Interactive pages need plotly: pip install tl-logitlens[interactive]")
    page = index_html(written + ["summary.json"], title="tl_logitlens demo", notes=notes)
    written.append(str(out.write_text("index.html", page)))


def cmd_lens(args: argparse.Namespace) -> Dict[str, Any]:
    """The logit lens on one or more prompts: a table of each layer's prediction, and optional files."""
    prompts = prompt_spec(args)
    layers = parse_layers(args.layers)
    targets = None if not args.target else [parse_token(t, "--target") for t in args.target]
    out = check_out(args.out, args.overwrite)
    html = check_html(args.html, args.overwrite, args.plotly)
    lens_dir = _lens_dir(args.lens)
    _start_torch()
    import tl_logitlens as tll

    model = load_model(args.model, args.device, args.dtype)
    lens = _load_lens(lens_dir, model)
    prompt = prompt_input(model, prompts)
    common = dict(layers=layers, top_k=args.top_k, norm=args.norm, lens=lens)
    if lens is not None:
        print(f"Reading through the {lens.name} lens in {str(lens_dir)!r}.")
    at = tll.logit_lens(model, prompt, positions=args.position, targets=targets, **common)
    n_prompts = int(at.lengths.shape[0])
    tables = []
    for b in range(n_prompts):
        rows = lens_summary(at, prompt=b)
        token = at.input_tokens()[b][0] if at.input_ids is not None else "?"
        where = f" (prompt {b}, position {int(at.positions[b, 0])})" if n_prompts > 1 or args.position != -1 else ""
        if b:
            print()
        print_lens(rows, token, where)
        tables.append(rows)
    summary = {
        "model": args.model,
        "prompts": prompts.get("text", prompts.get("tokens")),
        "norm": args.norm,
        "position": args.position,
        "dtype": args.dtype,
        "device": args.device,
        "lens_at_position": tables,
        "lens_at_last_position": tables[0],
    }
    if lens is not None:
        summary["lens"] = {"name": lens.name, "dir": str(lens_dir)}
    out = make_out(out, args.overwrite)
    if out is not None:
        from .. import plots

        full = tll.logit_lens(model, prompt, targets="next" if args.metric == "rank" else None, **common)
        written: List[str] = []
        save_figure(plots.plot_lens(full, metric=args.metric), out, "lens_heatmap", args, written)
        if targets is not None:
            save_figure(plots.plot_trajectory(at), out, "trajectory", args, written)
        save_figure(plots.plot_lens_metrics(full), out, "lens_metrics", args, written)
        frame = full.to_dataframe()
        if lens is not None:
            frame.insert(0, "lens", lens.name)
        write_table(frame, out, "lens.csv", written)
        write_summary(summary, out, written)
    if html is not None:  # every position, with the true next token's probability and rank in the hover
        page = tll.logit_lens(model, prompt, targets="next", **common)
        write_page(page, html, args.overwrite, args.plotly, out)
    return summary


def cmd_patchscope(args: argparse.Namespace) -> Dict[str, Any]:
    """A Patchscope on one or more prompts: what the target prompt says of each layer's state, and optional files."""
    prompts = prompt_spec(args)
    layers = parse_layers(args.layers)
    if args.target is not None and not args.target.strip():
        raise UsageError("--target is empty; give the target prompt's text (or leave it out for the identity prompt)")
    out = check_out(args.out, args.overwrite)
    html = check_html(args.html, args.overwrite, args.plotly)
    _start_torch()
    import tl_logitlens as tll

    model = load_model(args.model, args.device, args.dtype)
    prompt = prompt_input(model, prompts)
    common = dict(target=args.target, layers=layers, top_k=args.top_k, progress=not args.quiet)
    scope = tll.patchscope(model, prompt, positions=args.position, **common)
    tables = []
    for b in range(int(scope.lengths.shape[0])):
        rows = lens_summary(scope, prompt=b)
        token = scope.input_tokens()[b][0]
        if b:
            print()
        print_lens(rows, token, f" (prompt {b}, position {int(scope.positions[b, 0])})", heading=_SCOPE_HEADING)
        tables.append(rows)
    summary = {
        "model": args.model,
        "prompts": prompts.get("text", prompts.get("tokens")),
        "target": args.target if args.target is not None else tll.IDENTITY_PROMPT,
        "position": args.position,
        "dtype": args.dtype,
        "device": args.device,
        "patchscope_at_position": tables,
    }
    full = tll.patchscope(model, prompt, positions=None, **common) if out is not None or html is not None else None
    out = make_out(out, args.overwrite)
    if out is not None:
        written: List[str] = []
        save_figure(full.plot(metric="prob"), out, "patchscope_heatmap", args, written)
        write_table(full.to_dataframe(), out, "patchscope.csv", written)
        write_summary(summary, out, written)
    if html is not None:
        write_page(full, html, args.overwrite, args.plotly, out)
    return summary


#: What ``patchscope`` prints above each prompt's table.
_SCOPE_HEADING = "What the target prompt reads from each layer's state of"


def cmd_dla(args: argparse.Namespace) -> Dict[str, Any]:
    """Direct logit attribution of an answer (or answer - wrong) on one or more prompts."""
    prompts = prompt_spec(args)
    answers = tokens_arg(args.answer, "--answer")
    wrong = tokens_arg(args.wrong, "--wrong")
    out = check_out(args.out, args.overwrite)
    html = check_html(args.html, args.overwrite, args.plotly)
    _start_torch()
    import tl_logitlens as tll

    model = load_model(args.model, args.device, args.dtype)
    prompt = prompt_input(model, prompts)
    att = tll.direct_logit_attribution(
        model, prompt, answers=answers, wrong=wrong, by=args.by, positions=args.position, norm=args.norm
    )
    print_attribution(att, args.top_k)
    summary = {
        "model": args.model,
        "prompts": prompts.get("text", prompts.get("tokens")),
        "answer": answers,
        "wrong": wrong,
        "by": args.by,
        "position": args.position,
        "norm": args.norm,
        "dtype": args.dtype,
        "device": args.device,
        "model_value": float(att.model_value.mean()),
        "constant": float(att.constant.mean()),
        "model_values": att.model_value.reshape(-1).tolist(),
        "residual_error": att.residual_error(),
        "top": dict(attribution_rows(att, args.top_k)),
    }
    out = make_out(out, args.overwrite)
    if out is not None:
        from .. import plots

        written: List[str] = []
        save_figure(plots.plot_attribution(att), out, attribution_stem(args.by), args, written)
        write_table(att.to_dataframe(), out, f"{attribution_stem(args.by)}.csv", written)
        write_summary(summary, out, written)
    if html is not None:
        write_page(att, html, args.overwrite, args.plotly, out)
    return summary


def cmd_eval(args: argparse.Namespace) -> Dict[str, Any]:
    """Streaming lens statistics over a dataset."""
    out = check_out(args.out, args.overwrite)
    html = check_html(args.html, args.overwrite, args.plotly)
    if not Path(args.data).is_file():
        raise UsageError(
            f"no data file at {args.data!r}; pass a UTF-8 text file (one document per line) "
            "or a .pt token tensor [n, seq]"
        )
    lens_dir = _lens_dir(args.lens)
    _start_torch()
    import tl_logitlens as tll

    from ..distributed import init_from_env, is_main_process, timeout_from_env

    data = read_data(args.data)
    device = args.device
    if init_from_env(timeout=timeout_from_env()):  # under torchrun: shard, merge, rank 0 reports
        import os

        if device == "cuda":
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one device per local rank
    model = load_model(args.model, device, args.dtype)
    if lens_dir is not None:
        return _compare(args, model, data, _load_lens(lens_dir, model), out, html)
    evaluation = tll.evaluate_lens(
        model, data, batch_size=args.batch_size, max_tokens=args.max_tokens, progress=not args.quiet
    )
    if not is_main_process():
        return {"tokens": evaluation.n_tokens}
    _report(evaluation, f"{evaluation.n_tokens} tokens", ["layer"], "lens_eval", args, out, html)
    return {"tokens": evaluation.n_tokens}


#: The columns of an evaluation's table printed to the terminal (after the key columns).
_SHOWN = ["kl_to_final_mean", "next_token_loss_mean", "perplexity", "entropy_mean", "top1_agreement", "top1_accuracy"]


def _report(
    result: Any, header: str, keys: List[str], stem: str, args: argparse.Namespace, out: Any, html: Any
) -> None:
    """Print a LensEvaluation's or LensComparison's table; write ``<stem>.csv``, ``.json``, the figure and the page."""
    frame = result.to_dataframe()
    print(header)
    print(frame[[c for c in keys + _SHOWN if c in frame]].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    out = make_out(out, args.overwrite)
    if out is not None:
        written: List[str] = []
        write_table(frame, out, f"{stem}.csv", written)
        written.append(str(out.write_text(f"{stem}.json", json.dumps(result.to_dict()))))  # as result.save writes
        save_figure(result.plot(), out, stem, args, written)
        print("\nWrote:\n  " + "\n  ".join(written))
    if html is not None:
        write_page(result, html, args.overwrite, args.plotly, out)


def _load_model_for_fitting(args: argparse.Namespace) -> Any:
    """The model a fitting command (train-lens, fit-lens) runs on: under ``torchrun`` the process group is joined
    first and each rank takes the CUDA device of its local rank."""
    _start_torch()
    from ..distributed import init_from_env, timeout_from_env

    device = args.device
    if init_from_env(timeout=timeout_from_env()) and device == "cuda":  # under torchrun: one device per local rank
        import os

        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return load_model(args.model, device, args.dtype)


def cmd_train_lens(args: argparse.Namespace) -> Dict[str, Any]:
    """Train a tuned lens on a dataset and write it (tuned-lens format) with its checkpoint to --out."""
    out = check_out(args.out, args.overwrite)  # the numbers were checked with every command's (check_common)
    if (out / CHECKPOINT).is_file() and not args.resume:
        raise UsageError(
            f"--out {str(out)!r} holds a training checkpoint; pass --resume to continue it, or name another folder"
        )
    data = read_data(args.data)
    model = _load_model_for_fitting(args)
    import tl_logitlens as tll

    from ..distributed import is_main_process

    # train_tuned_lens claims --out itself (rank 0 alone writes) and creates it at the first checkpoint, so a run
    # that fails before training (nothing to train on) leaves nothing behind.
    try:
        lens = tll.train_tuned_lens(
            model,
            data,
            steps=args.steps,
            tokens_per_step=args.tokens_per_step,
            batch_size=args.batch_size,
            loss=args.loss,
            incl_mid=args.incl_mid,
            checkpoint_dir=out,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except LensInputError as err:
        if getattr(err, "resume_problem", None) is None:
            raise
        raise UsageError(_resume_refusal(err, out)) from None
    if not is_main_process():
        return {"translators": len(lens.labels)}
    import torch

    saved = torch.load(out / CHECKPOINT, weights_only=True)
    print(
        f"Trained {len(lens.labels)} translators for {saved['step']} steps on {saved['tokens_seen']:,} tokens "
        f"(loss={args.loss})."
    )
    print(f"Wrote the lens (tuned-lens format) and its checkpoint to {out}")
    return {"steps": int(saved["step"]), "tokens": int(saved["tokens_seen"]), "out": str(out)}


#: The training settings a checkpoint records, as the command line names them (the rest are Python-only or the model's).
_RESUME_FLAGS = {
    "steps": "--steps",
    "tokens_per_step": "--tokens-per-step",
    "batch_size": "--batch-size",
    "loss": "--loss",
    "incl_mid": "--incl-mid",
}


def _resume_refusal(err: Any, out: Path) -> str:
    """A refusal to resume the checkpoint in ``--out``, in the command line's words (flags, not Python keywords)."""
    checkpoint = out / CHECKPOINT
    afresh = f"name another --out, or delete {str(checkpoint)!r}, to start afresh"
    if not err.resume_differences:
        return f"{' '.join(err.resume_problem.split())}; {afresh}"

    def word(key: str, value: Any) -> str:
        return ("given" if value else "not given") if key == "incl_mid" else repr(value)

    parts = []
    for key, saved, now in err.resume_differences:
        if key in _RESUME_FLAGS:
            name = _RESUME_FLAGS[key]
        elif key in ("d_model", "n_layers", "d_vocab"):
            name = f"the model's {key} (another --model)"
        else:  # optimizer, lr, weight_decay: set from Python only
            name = f"{key} (set from Python, not a command-line option)"
        parts.append(f"{name}: checkpoint {word(key, saved)}, now {word(key, now)}")
    return (
        f"--out {str(out)!r} holds a checkpoint made with other settings ({'; '.join(parts)}); rerun with the "
        f"checkpoint's settings and --resume to continue it, or {afresh}"
    )


def _compare(args: argparse.Namespace, model: Any, data: Any, lens: Any, out: Any, html: Any) -> Dict[str, Any]:
    """``eval --lens``: the logit lens and the tuned lens over the data in one pass, side by side."""
    import tl_logitlens as tll

    from ..distributed import is_main_process

    name = lens.name if lens.name != "logit" else "tuned"
    comparison = tll.compare_lenses(
        model,
        data,
        {"logit": None, name: lens},
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        progress=not args.quiet,
    )
    if not is_main_process():  # under torchrun every rank holds the merged result; rank 0 reports
        return {"tokens": comparison.n_tokens}
    _report(
        comparison,
        f"{comparison.n_tokens} tokens, lenses {', '.join(comparison.lenses)}",
        ["lens", "layer"],
        "lens_compare",
        args,
        out,
        html,
    )
    return {"tokens": comparison.n_tokens, "lenses": comparison.lenses}


def cmd_fit_lens(args: argparse.Namespace) -> Dict[str, Any]:
    """Fit a Jacobian lens on a dataset and write it (TransformerLens's artifact format) to --out."""
    from ..files import check_file

    out = check_file(args.out, overwrite=args.overwrite, what="fit-lens --out", mend="pass --overwrite")
    checkpoints = out.parent / f"{out.name}.checkpoints" if args.checkpoint_every else None
    data = read_data(args.data)
    layers = parse_layers(args.source_layers)
    model = _load_model_for_fitting(args)
    import tl_logitlens as tll

    from ..distributed import is_main_process

    lens = tll.fit_jacobian_lens(
        model,
        data,
        source_layers=layers,
        incl_mid=args.incl_mid,
        max_seq_len=args.max_seq_len,
        skip_first_positions=args.skip_first_positions,
        checkpoint_dir=checkpoints,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        progress=not args.quiet,
    )
    if not is_main_process():
        return {"matrices": len(lens.labels)}
    lens.save(out, overwrite=args.overwrite)
    print(
        f"Fitted a Jacobian lens ({len(lens.labels)} matrices: {', '.join(lens.labels)}) on {lens.n_prompts} prompts."
    )
    print(f"Wrote it (TransformerLens's artifact format) to {out}")
    return {"matrices": len(lens.labels), "prompts": lens.n_prompts, "out": str(out)}
