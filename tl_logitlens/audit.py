"""An audit report of one prediction: one self-contained page someone else can check.

:func:`report` reads one prompt with every lens given and with direct logit attribution, and writes
one HTML page (no network needed to open it) holding

- the lens heatmap of each lens, with hover (each cell's top tokens, the answer's probability and rank);
- the answer's probability and rank by layer, one line per lens;
- DLA of the answer's logit (or of ``answer - wrong``) by component, by head and by neuron, and the
  top heads' source tokens (which input positions each head moved the answer from);
- provenance: the model's name, the sha256 of its weights, the package versions, dtype and device,
  every setting, and the identity checks run with their measured residual errors (the pieces of
  each attribution add up to the model's own value; the lens's final entry is the model's own
  prediction; each head's sources add up to the head);
- what a lens reading is not (not a causal claim), and the method papers.

Example::

    >>> import tempfile, pathlib
    >>> import tl_logitlens as tll
    >>> model = tll.demo_model()
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "report.html"
    >>> page = tll.report(model, "red cat sun red cat", answer="sun", wrong="red", path=path)
    >>> "sha256" in page.read_text()
    True
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch

from .errors import LensInputError
from .files import HTML_MARK, check_file, write_owned_text
from .inputs import resolve_inputs, run_or_read, single_token_id
from .lenses import check_lens, lens_name
from .model_access.provenance import package_versions, weights_sha256
from .stacks import stack_labels
from .tokentext import token_text

#: The identity checks' tolerance relative to ``max(1, |model value|)``: float32 sums of a few thousand pieces.
SUM_TOLERANCE = 1e-4


@dataclass
class IdentityCheck:
    """One identity the report checked: what must equal what, the measured residual and its bound."""

    name: str
    residual: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.residual <= self.tolerance


def _lenses(lens: Any, view: Any, labels: List[str]) -> Dict[str, Any]:
    """``{"logit": None, name: lens, ...}``: the logit lens always, then every lens given (checked now)."""
    given = dict(lens) if isinstance(lens, Mapping) else ({} if lens is None else {lens_name(lens): lens})
    out: Dict[str, Any] = {"logit": None}
    for name, one in given.items():
        if not isinstance(name, str) or not name:
            raise LensInputError(f"lens names must be non-empty strings, got {name!r}")
        check_lens(one, view, labels)
        out[name if name not in out or one is None else f"{name} (given)"] = one
    return out


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        return
    if isinstance(prompt, torch.Tensor) and prompt.dim() in (1, 2) and (prompt.dim() == 1 or prompt.shape[0] == 1):
        return
    raise LensInputError("report reads one prompt: a string, or token ids [pos] or [1, pos]")


def _lens_readings(model: Any, prompt: Any, lenses: Dict[str, Any], targets: List[int]) -> Dict[str, Any]:
    from .lens import logit_lens

    return {name: logit_lens(model, prompt, lens=one, targets=targets, top_k=5) for name, one in lenses.items()}


def _attributions(model: Any, prompt: Any, answer: int, wrong: Optional[int]) -> Dict[str, Any]:
    from .attribution import direct_logit_attribution

    kw = dict(answers=answer, wrong=wrong)
    return {
        "component": direct_logit_attribution(model, prompt, by="component", **kw),
        "head": direct_logit_attribution(model, prompt, by="head", by_source=True, **kw),
        "neuron": direct_logit_attribution(model, prompt, by="neuron", **kw),
    }


def _checks(view: Any, tokens: Any, readings: Dict[str, Any], atts: Dict[str, Any]) -> List[IdentityCheck]:
    """Measure every identity: attributions add up, head sources add up, the lens's last entry is the model."""
    checks = []
    value = float(atts["component"].model_value.abs().max())
    bound = SUM_TOLERANCE * max(1.0, value)
    for by, att in atts.items():
        checks.append(
            IdentityCheck(f"DLA by {by}: pieces + constant = the model's own value", att.residual_error(), bound)
        )
    head = atts["head"]
    sources = head.by_source().sum(2) + (0 if head.source_rounding is None else head.source_rounding)
    checks.append(
        IdentityCheck(
            "DLA by head: each head's sources add up to the head", float((sources - head.by_head()).abs().max()), bound
        )
    )
    logits, _ = run_or_read(view, tokens, None, [])
    last = int(tokens.lengths[0]) - 1
    own = torch.softmax(logits[0, last].detach().double(), -1).cpu()
    lens = readings["logit"]
    ids, probs = lens.top_ids[-1, 0, last], lens.top_probs[-1, 0, last].double()
    gap = float((own[ids] - probs).abs().max())
    tol = max(1e-6, 1e-4 * float(probs.max())) if not _half(view) else 2e-2 * float(probs.max())
    checks.append(IdentityCheck("logit lens final_post: top-5 probabilities = the model's own softmax", gap, tol))
    return checks


def _half(view: Any) -> bool:
    return view.W_U.dtype in (torch.float16, torch.bfloat16)


def _provenance(view: Any, settings: Dict[str, Any]) -> Dict[str, Any]:
    from . import __version__

    return {
        "model": view.model_name or type(view.model).__name__,
        "weights sha256": weights_sha256(view.model),
        "dtype": str(view.W_U.dtype).replace("torch.", ""),
        "device": str(view.W_U.device),
        "sizes": f"{view.n_layers} layers, d_model {view.d_model}, vocabulary {view.d_vocab}",
        "versions": {**package_versions(), "tl_logitlens (imported)": __version__},
        "settings": settings,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def report(
    model: Any,
    prompt: Any,
    *,
    answer: Any,
    wrong: Any = None,
    lens: Union[None, Callable[..., Any], Mapping[str, Any]] = None,
    path: Union[str, Path],
    top_heads: int = 5,
    overwrite: bool = False,
) -> Path:
    """Write the audit page of one prediction to ``path`` (HTML, self-contained); returns the path.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` in eval mode.
        prompt: one prompt (text, or token ids ``[pos]`` / ``[1, pos]``); read at its last token.
        answer: the token audited (text, vocabulary piece or id).
        wrong: a contrasting token: DLA then explains ``logit(answer) - logit(wrong)``.
        lens: a lens, or ``{"name": lens, ...}``: each is read besides the logit lens.
        path: the page to write; its folder must exist. An existing file is replaced only if this
            package wrote it (or with ``overwrite=True``).
        top_heads: how many heads' source tokens to list.

    Example::

        >>> import tempfile, pathlib
        >>> import tl_logitlens as tll
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "audit.html"
        >>> tll.report(tll.demo_model(), "red cat sun red cat", answer="sun", path=path).name
        'audit.html'
    """
    from .plots.report import report_page

    _check_prompt(prompt)
    if isinstance(top_heads, bool) or not isinstance(top_heads, int) or top_heads < 1:
        raise LensInputError(f"top_heads must be a positive int, got {top_heads!r}")
    check_file(path, overwrite=overwrite, what="report", mark=HTML_MARK)  # before any work
    view, tokens, _ = resolve_inputs(
        model, prompt if not isinstance(prompt, torch.Tensor) or prompt.dim() == 2 else prompt.unsqueeze(0), None
    )
    answer_id = single_token_id(view, answer, "answer")
    wrong_id = None if wrong is None else single_token_id(view, wrong, "wrong")
    lenses = _lenses(lens, view, stack_labels(view.n_layers, False))
    targets = [answer_id] + ([] if wrong_id is None else [wrong_id])
    readings = _lens_readings(model, tokens.ids, lenses, targets)
    atts = _attributions(model, tokens.ids, answer_id, wrong_id)
    settings = {
        "prompt": prompt if isinstance(prompt, str) else tokens.ids[0].tolist(),
        "answer": f"{token_text(view.tokenizer, answer_id)} (id {answer_id})",
        "wrong": None if wrong_id is None else f"{token_text(view.tokenizer, wrong_id)} (id {wrong_id})",
        "lenses": list(lenses),
        "lens norm": "recompute (each stream through the final norm with its own statistics)",
        "DLA norm": "cached (the final norm's scale from the forward pass: linear, so pieces add up)",
        "position": f"the last token ({int(tokens.lengths[0]) - 1})",
        "top heads listed": top_heads,
    }
    page = report_page(
        readings=readings,
        attributions=atts,
        checks=_checks(view, tokens, readings, atts),
        provenance=_provenance(view, settings),
        top_heads=top_heads,
    )
    return write_owned_text(
        path,
        page,
        overwrite=overwrite,
        what="report",
        mark=HTML_MARK,
    )
