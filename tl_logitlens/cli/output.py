"""What a command shows and writes: third-party output kept quiet, figures, tables and summaries, printed reports."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from typing import Any, Dict, Iterator, List

# -- quiet output -------------------------------------------------------------------------
_QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def silence_loaded_libraries() -> None:
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
def output_policy(verbose: bool) -> Iterator[None]:
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

            def show(
                message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
            ) -> None:
                print(f"tl-logitlens: warning: {message}", file=sys.stderr)

            warnings.showwarning = show
            silence_loaded_libraries()
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


# -- files (every one through the command's claimed --out folder: tl_logitlens.files.OwnedFolder) -----------
def save_figure(fig: Any, out: Any, stem: str, args: argparse.Namespace, written: List[str]) -> None:
    from ..plots import save_figure as save_at_print_size  # the figures' own margins and resolution rules

    name = f"{stem}.{args.format}"
    # The temporary file has no suffix to tell matplotlib the format: name it.
    written.append(str(out.write(name, lambda tmp: save_at_print_size(fig, tmp, dpi=args.dpi, format=args.format))))
    import matplotlib.pyplot as plt

    plt.close(fig)


def attribution_stem(by: str) -> str:
    """The file name (without suffix) of an attribution's figure, table and page, the demo's and ``dla``'s alike:
    ``attribution_components``, ``attribution_heads``, ``attribution_neurons``, ``attribution_accumulated``."""
    return f"attribution_{by}s" if by in ("component", "head", "neuron") else f"attribution_{by}"


def write_table(frame: Any, out: Any, name: str, written: List[str]) -> None:
    written.append(str(out.write(name, lambda tmp: frame.to_csv(tmp, index=False))))


def write_summary(summary: Dict[str, Any], out: Any, written: List[str]) -> None:
    written.append(str(out.write_json("summary.json", summary, indent=2)))
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


def print_lens(
    rows: List[Dict[str, Any]], token: str, where: str = "", heading: str = "What each layer predicts after"
) -> None:
    print(f"{heading} {token!r}{where}:")
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


def print_attribution(att: Any, k: int) -> None:
    value = float(att.model_value[att.real()].mean())
    what = "logit difference" if att.wrong_ids is not None else "logit"
    print(
        f"Direct logit attribution (by={att.by}) of the {what} {value:.3f}; "
        f"constant terms {float(att.constant[att.real()].mean()):.3f}; residual error {att.residual_error():.2e}"
    )
    rows = attribution_rows(att, k)
    for label, v in rows:
        print(f"  {label:>14}  {v:+.3f}")
    if att.by != "accumulated":
        print(rest_of_attribution(att, [label for label, _ in rows]))


def rest_of_attribution(att: Any, shown: List[str]) -> str:
    """The line under the ``dla`` table: where the rest of the value came from (the components not shown,
    heads or neurons apart from the others, and the constant), adding up to the model's value."""
    import re

    real = att.real().reshape(-1)
    mean = att.values.reshape(att.values.shape[0], -1)[:, real].mean(1)  # [component], as Attribution.top ranks
    kind = {"head": r"L\d+H\d+", "neuron": r"L\d+(E\d+|S)?N\d+"}.get(att.by)
    picked = set(shown)
    rest = [i for i, label in enumerate(att.labels) if label not in picked]
    same = [i for i in rest if kind is None or re.fullmatch(kind, att.labels[i])]  # of the kind asked for
    other = [i for i in rest if i not in same]  # by head/neuron: embeddings, MLPs or attention, biases
    constant = float(att.constant.reshape(-1)[real].mean())
    value = float(att.model_value.reshape(-1)[real].mean())
    parts = [f"the rows above {sum(float(mean[att.labels.index(label)]) for label in shown):+.3f}"]
    if same:
        parts.append(f"the other {len(same)} {att.by}s {float(mean[same].sum()):+.3f}")
    if other:
        names = "embeddings, MLPs, biases" if att.by == "head" else "embeddings, attention, biases"
        parts.append(f"the other components ({names}) {float(mean[other].sum()):+.3f}")
    parts.append(f"the constant {constant:+.3f}")
    what = "logit difference" if att.wrong_ids is not None else "logit"
    return f"  sum: {', '.join(parts)} = the model's {what} {value:+.3f}"


def write_page(result: Any, path: Any, overwrite: bool = False, plotly: str = "directory", out: Any = None) -> None:
    """The ``--html`` interactive page of ``result``, written atomically; with ``--plotly directory`` (the
    default) it shares one ``plotly.min.js`` with the other pages of its folder. A page inside the ``--out``
    folder is written through it (recorded there like every other file); a missing folder is created."""
    from pathlib import Path

    from ..plots.interactive import page_of, to_html, write_plotlyjs

    path = Path(path)
    if out is not None and path.parent.resolve() == Path(out.path).resolve():
        if plotly == "directory":
            write_plotlyjs(None, folder=out)
        out.write_text(path.name, page_of(result, plotly=plotly))
    else:
        path.parent.mkdir(parents=True, exist_ok=True)  # created like --out (checked writable before any work)
        to_html(result, path, overwrite=overwrite, plotly=plotly)
    beside = " (with plotly.min.js beside it)" if plotly == "directory" else ""
    print(f"\nWrote the interactive page {path}{beside}")
