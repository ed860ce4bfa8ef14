"""Who a lens belongs to: fingerprints of a model that lens files record and check.

:func:`unembed_hash` is tuned-lens's fingerprint of the unembedding (files carry it so that a
lens applied to another model is noticed); :func:`stream_change` says why a model's residual
stream is not the Hugging Face one a tuned-lens file is defined on; :func:`describe` gives the
sizes and name a lens is built for, without the checks of :func:`~tl_logitlens.model_access.view`.

Example::

    >>> from tl_logitlens.demo import demo_model
    >>> facts = describe(demo_model())
    >>> facts.n_layers, facts.d_model
    (2, 64)
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple, Optional

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
    arrays, so this reads only the corners. A model whose ``W_U`` was processed (centred,
    norm folded in) hashes differently from its Hugging Face original.
    """
    weight = model.W_U.detach().T.float().cpu().numpy()
    return hashlib.sha256(np.array_str(weight, precision=1).encode("utf-8")).hexdigest()


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
