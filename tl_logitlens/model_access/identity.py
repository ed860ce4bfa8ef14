"""Who a lens belongs to: fingerprints of a model that lens files record and check.

:func:`unembed_hash` is tuned-lens's fingerprint of the unembedding and :func:`unembed_sample`
ours (files carry both, so that a lens applied to another model is noticed); :func:`unembed_matches`
compares either with a model, whatever dtype or device either side had; :func:`stream_change` says
why a model's residual stream is not the Hugging Face one a tuned-lens file is defined on; :func:`describe` gives the
sizes and name a lens is built for, without the checks of :func:`~tl_logitlens.model_access.view`.

Example::

    >>> from tl_logitlens.demo import demo_model
    >>> facts = describe(demo_model())
    >>> facts.n_layers, facts.d_model
    (2, 64)
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch


class ModelFacts(NamedTuple):
    """The sizes and name a lens is built for, and where its parameters live (the unembedding's device)."""

    d_model: int
    n_layers: int
    model_name: str
    device: torch.device


def describe(model: Any) -> ModelFacts:
    """``model``'s :class:`ModelFacts`, read from its config and unembedding."""
    cfg = model.cfg
    return ModelFacts(int(cfg.d_model), int(cfg.n_layers), str(getattr(cfg, "model_name", "") or ""), model.W_U.device)


def unembed_hash(model: Any) -> str:
    """tuned-lens's fingerprint of the unembedding: sha256 of ``numpy.array_str(W, precision=1)``.

    ``W`` is the Hugging Face ``lm_head.weight`` orientation, ``[d_vocab, d_model]`` in
    float32, i.e. TransformerLens's ``W_U`` transposed. ``array_str`` summarises large
    arrays, so only the corners count: they alone are read (a few dozen numbers, on the
    weights' device), and the text is the one ``array_str`` prints for the whole matrix under
    numpy's default print options. A model whose ``W_U`` was processed (centred, norm folded
    in) hashes differently from its Hugging Face original. The hash of the same weights in
    another dtype can differ (a corner value rounded across a printed digit):
    :func:`unembed_matches` compares a recorded hash with a model allowing for that.
    """
    block, summarised = _shown_block(model)
    return _array_hash(block, summarised)


def unembed_sample(model: Any) -> List[float]:
    """The unembedding's identity that survives dtypes and devices: ``W_U`` at 64 fixed places, as floats.

    The places are spread over the whole matrix ``W_U [d_model, d_vocab]`` and depend only on
    its shape. Lens files record it (``tl_logitlens.json``) beside tuned-lens's
    :func:`unembed_hash`; :func:`unembed_matches` compares it with a model within the rounding
    of bfloat16, so the same weights in another dtype or on another device match and another
    model's (or a processed ``W_U``, centred or with a norm folded in) do not.

    Example::

        >>> import torch
        >>> from types import SimpleNamespace
        >>> from tl_logitlens.demo import demo_model
        >>> model = demo_model()
        >>> sample = unembed_sample(model)
        >>> len(sample)
        64
        >>> in_bfloat16 = SimpleNamespace(W_U=model.W_U.to(torch.bfloat16))  # what a bfloat16 copy reads
        >>> unembed_matches(in_bfloat16, sample)
        True
    """
    W_U = model.W_U.detach()
    d_model, d_vocab = W_U.shape
    k = torch.arange(_SAMPLE, device=W_U.device)
    # Two large primes walk the rows and columns independently, so the places cover the matrix.
    return W_U[(k * 7919 + 1) % d_model, (k * 104729 + 3) % d_vocab].float().cpu().tolist()


def unembed_matches(model: Any, recorded: Union[str, Sequence[float]]) -> bool:
    """Whether ``recorded`` (an :func:`unembed_sample`, or tuned-lens's :func:`unembed_hash`) is ``model``'s,
    whatever dtype or device either side had.

    A sample matches when every value agrees within bfloat16's rounding (a relative ``2**-6``,
    four times a bfloat16 step, plus ``2**-14`` of the largest value for float16's smallest
    numbers). A hash matches when the hash of ``model``'s weights equals it, or the hash of
    the same weights as another precision would have held them: each corner value anywhere
    within the model's own rounding (a bfloat16 or float16 model's weights stand for any
    float32 value that rounds to them), or rounded to bfloat16 or float16 (a lens made on a
    lower-precision copy). Only a hash printed in scientific notation (a corner value below
    ``1e-4``) can still differ across bfloat16 rounding: files of this package carry the sample.

    Example::

        >>> import torch
        >>> from types import SimpleNamespace
        >>> from tl_logitlens.demo import demo_model
        >>> model = demo_model()
        >>> saved = unembed_hash(model)
        >>> in_bfloat16 = SimpleNamespace(W_U=model.W_U.to(torch.bfloat16))  # what a bfloat16 copy reads
        >>> unembed_matches(in_bfloat16, saved)
        True
        >>> unembed_matches(model, "0" * 64)
        False
    """
    if not isinstance(recorded, str):
        mine = torch.tensor(unembed_sample(model), dtype=torch.float64)
        theirs = torch.as_tensor(list(recorded), dtype=torch.float64)
        if theirs.shape != mine.shape or not bool(torch.isfinite(theirs).all()):
            return False
        atol = 2**-14 * float(torch.maximum(mine.abs().max(), theirs.abs().max()))
        return bool(((mine - theirs).abs() <= 2**-6 * torch.maximum(mine.abs(), theirs.abs()) + atol).all())
    block, summarised = _shown_block(model)
    if _array_hash(block, summarised) == recorded:
        return True
    # numpy prints every value in one notation (scientific when a value is tiny or huge): try each.
    return any(_some_rounding_matches(block, summarised, model.W_U.dtype, sci, recorded) for sci in (False, True))


def _some_rounding_matches(block: np.ndarray, summarised: bool, dtype: torch.dtype, sci: bool, recorded: str) -> bool:
    """Whether a rounding of ``block``'s entries (each printed distinctly in that notation) hashes to ``recorded``."""
    ambiguous = [(index, values) for index, values in _print_forms(block, dtype, sci) if len(values) > 1]
    tries = 1
    for _, values in ambiguous:
        tries *= len(values)
    if tries > _MAX_TRIES:  # too many to try (scientific notation at two digits): the exact comparison stands
        return False
    for combo in itertools.product(*(values for _, values in ambiguous)):
        trial = block.copy()
        for (index, _), value in zip(ambiguous, combo):
            trial[index] = value
        if _array_hash(trial, summarised) == recorded:
            return True
    return False


_SAMPLE = 64
_EDGE, _THRESHOLD = 3, 1000  # numpy's default print options: edgeitems, threshold
_MAX_TRIES = 4096


def _shown(n: int) -> List[int]:
    """The indices ``array_str`` prints along an axis of ``n`` (index 3 stands in for the hidden middle)."""
    return list(range(n)) if n <= 2 * _EDGE else [0, 1, 2, 3, n - 3, n - 2, n - 1]


def _shown_block(model: Any) -> Tuple[np.ndarray, bool]:
    """``(the part of W = W_U.T that array_str prints, as float32 numpy; whether it is summarised)``."""
    W_U = model.W_U.detach()  # [d_model, d_vocab]
    d_model, d_vocab = W_U.shape
    if d_model * d_vocab <= _THRESHOLD:
        return W_U.T.float().cpu().numpy(), False
    cols = torch.tensor(_shown(d_model), device=W_U.device)
    rows = torch.tensor(_shown(d_vocab), device=W_U.device)
    return W_U[cols.unsqueeze(1), rows.unsqueeze(0)].T.float().cpu().numpy(), True  # 49 numbers gathered


def _array_hash(block: np.ndarray, summarised: bool) -> str:
    """sha256 of what ``numpy.array_str(W, precision=1)`` prints for the matrix ``block`` shows."""
    text = np.array2string(
        block,
        max_line_width=75,
        precision=1,
        suppress_small=False,
        separator=" ",
        prefix="",
        threshold=0 if summarised else _THRESHOLD,
        edgeitems=_EDGE,
        floatmode="maxprec",
        sign="-",
        legacy=False,
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _print_forms(
    block: np.ndarray, dtype: torch.dtype, sci: bool
) -> Iterator[Tuple[Tuple[int, ...], List[np.float32]]]:
    """Per entry: one value per distinct way numpy may print it (in scientific notation if ``sci``), over the
    values the weights may stand for."""
    x = torch.from_numpy(block).double()
    if dtype in (torch.bfloat16, torch.float16):
        info = torch.finfo(dtype)
        delta = (x.abs() * info.eps).clamp_min(info.tiny * info.eps)  # at least half the rounding step
    else:
        delta = torch.zeros_like(x)
    ends = [x, x - delta, x + delta]
    near = ends + [v.to(low).double() for low in (torch.bfloat16, torch.float16) for v in ends]
    values = torch.stack(near, -1).float().numpy()  # [*block, candidates]
    for index in np.ndindex(block.shape):
        forms: Dict[Tuple[Any, ...], np.float32] = {}
        for value in values[index]:
            forms.setdefault(_printed(value, sci), value)
        yield index, list(forms.values())


def _printed(value: np.float32, sci: bool) -> Tuple[Any, ...]:
    """What numpy's print of ``value`` at precision 1 depends on: its digits in that notation, and whether
    it is small or large enough to switch the whole array to scientific notation."""
    magnitude = abs(float(value))
    if sci:
        digits = np.format_float_scientific(value, precision=1, unique=True, trim=".")
    else:
        digits = np.format_float_positional(value, precision=1, unique=True, fractional=True, trim=".")
    return digits, 0 < magnitude < 1e-4, magnitude >= 1e8


def stream_change(model: Any) -> Optional[str]:
    """Why ``model``'s residual stream differs from Hugging Face hidden states, or ``None``.

    Checked: a ``TransformerBridge`` in compatibility mode on a LayerNorm model, and any
    LayerNorm model whose token embedding rows all have zero mean (what
    ``center_writing_weights`` leaves: a ``HookedTransformer.from_pretrained`` default).
    Both centre every write to the stream, so the stream is the Hugging Face stream minus
    its mean. Folding the norms (``fold_ln``, ``fold_value_biases``, ``center_unembed``)
    changes only the weights that read or unembed the stream, not the stream, and passes.
    """
    cfg = getattr(model, "cfg", None)
    norm_type = str(getattr(cfg, "normalization_type", "") or "")
    if not norm_type.startswith("LN"):
        return None  # RMSNorm models are never centred by TransformerLens
    if getattr(model, "compatibility_mode", False):
        return (
            "it is a TransformerBridge in compatibility mode on a LayerNorm model, which centres the "
            "weights that write to the residual stream"
        )
    W_E = getattr(model, "W_E", None)
    if W_E is None:
        return None
    W_E = W_E.detach().float()
    eps = max(torch.finfo(model.W_E.dtype).eps, 1e-6)
    if bool((W_E.mean(-1).abs() <= eps * W_E.abs().mean()).all()):
        return (
            "its token embedding rows all have zero mean: the weights that write to the residual "
            "stream were centred (center_writing_weights)"
        )
    return None
