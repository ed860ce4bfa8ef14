"""``tl-logitlens report``: the audit page of one prediction (:func:`tl_logitlens.report`) from a terminal.

Every argument is checked before torch is imported: one prompt, the answer (and wrong) token, each
``--lens`` folder, and the page's path (``--html``: its folder must exist; a file this package did not write is
refused unless ``--overwrite``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Dict, List

from ..errors import LensInputError
from ..files import HTML_MARK, check_file
from .arguments import UsageError, load_model, parse_token, prompt_input, prompt_spec
from .commands import _lens_dir, _load_lens, _start_torch

TOKEN_HELP = "a token's text, its exact vocabulary piece, or id:N for token id N"


def add_report(sub: Any, prompts: Callable[[argparse.ArgumentParser], None], common: Callable[..., None]) -> None:
    """Add the ``report`` sub-command to ``sub`` (``prompts``, ``common``: the parser's shared option adders)."""
    rep = sub.add_parser(
        "report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="an audit page of one prediction (lens, DLA, provenance, identity checks)",
        description="Write one self-contained HTML page auditing the answer to one prompt: the lens heatmap "
        "(every --lens beside the logit lens), the answer's probability and rank by layer, DLA by component, "
        "head and neuron, the top heads' source tokens, and provenance (weights' sha256, versions, settings, "
        "the identity checks run with their measured residual errors).",
        epilog="example:\n  tl-logitlens report --model demo --prompt 'red cat sun red cat' --answer sun --wrong red "
        "--html report.html\n"
        "  tl-logitlens report --model ./stories260k --prompt 'Once upon a time' --answer ' there' "
        "--lens tuned-lens-dir --html audit.html",
    )
    prompts(rep)
    rep.add_argument("--answer", required=True, metavar="TOKEN", help=f"the token audited: {TOKEN_HELP}")
    rep.add_argument("--wrong", metavar="TOKEN", help="a contrasting token: DLA explains answer - wrong")
    rep.add_argument(
        "--lens",
        action="append",
        metavar="DIR",
        help="also read through a tuned lens (a folder written by TunedLens.save or tuned-lens); repeat for several",
    )
    rep.add_argument("--top-heads", type=int, default=5, help="heads whose source tokens are listed (default 5)")
    rep.add_argument(
        "--html", required=True, metavar="PATH", help="the page to write (self-contained HTML; its folder must exist)"
    )
    common(rep)
    rep.set_defaults(func=cmd_report, out=None)  # no --out folder: the page is the one file written


def _check_page(out: str, overwrite: bool) -> Path:
    path = Path(out)
    if path.is_dir():
        raise UsageError(f"--html {out!r} is a folder; name the page's file, e.g. {str(path / 'report.html')!r}")
    if not path.parent.is_dir():
        raise UsageError(f"--html {out!r}: the folder {str(path.parent)!r} does not exist; create it first")
    try:
        check_file(path, overwrite=overwrite, what="--html", mark=HTML_MARK, mend="pass --overwrite")
    except LensInputError as err:
        raise UsageError(str(err)) from None
    return path


def cmd_report(args: argparse.Namespace) -> Dict[str, Any]:
    """Write the audit page; print where it is and what its identity checks measured."""
    prompts = prompt_spec(args)
    if len(prompts.get("text", prompts.get("tokens"))) != 1:
        raise UsageError("report audits one prompt: give one --prompt (or one --tokens prompt)")
    if args.position != -1:
        raise UsageError("report audits the prompt's last token (--position -1); cut the prompt where the answer comes")
    answer, wrong = parse_token(args.answer, "--answer"), parse_token(args.wrong, "--wrong")
    if args.top_heads < 1 or args.top_heads > 1000:
        raise UsageError(f"--top-heads must be 1..1000, got {args.top_heads}")
    page = _check_page(args.html, args.overwrite)
    lens_dirs: List[Path] = [_lens_dir(d) for d in args.lens or []]  # type: ignore[misc]
    _start_torch()
    import tl_logitlens as tll

    model = load_model(args.model, args.device, args.dtype)
    lenses = {
        f"{d.name} ({i})" if len(lens_dirs) > 1 else d.name: _load_lens(d, model) for i, d in enumerate(lens_dirs)
    }
    prompt = prompt_input(model, prompts)
    written = tll.report(
        model,
        prompt,
        answer=answer,
        wrong=wrong,
        lens=lenses or None,
        path=page,
        top_heads=args.top_heads,
        overwrite=args.overwrite,
    )
    print(f"Wrote the audit page {str(written)!r}.")
    return {"page": str(written)}
