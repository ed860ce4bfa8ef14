"""Where a result came from: a fingerprint of every weight of a model, and the versions that read it.

:func:`weights_sha256` hashes every parameter and buffer by name, dtype, shape and bytes (in
name order), so two models share it exactly when they hold the same numbers under the same names;
:func:`package_versions` lists the packages a reading depends on.

Example::

    >>> from tl_logitlens.demo import demo_model
    >>> len(weights_sha256(demo_model()))
    64
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from typing import Any, Dict

import torch


def weights_sha256(model: Any) -> str:
    """The sha256 of ``model``'s parameters and buffers (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    seen = set()
    for name in sorted(tensors):
        t = tensors[name].detach()
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
        if key is not None and key in seen:  # a tied weight counted once, under its first name
            continue
        seen.add(key)
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def package_versions() -> Dict[str, str]:
    """The versions of Python and of the packages a reading depends on (``"absent"`` where not installed)."""
    out = {"python": platform.python_version()}
    for name in ("tl-logitlens", "torch", "transformer-lens", "transformers", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out
