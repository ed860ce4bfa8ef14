"""The TransformerLens classes of the installed version, detected once, here only.

transformer-lens 2.x has ``HookedTransformer``; 3.x has it and ``TransformerBridge``; 4.x has
only the bridge (importing ``HookedTransformer`` raises ImportError there, so detection uses
``try``/``except ImportError``). The rest of the package (the demo model, the command line, the
tests) imports the classes from :mod:`tl_logitlens.model_access`.

Example::

    >>> from tl_logitlens.model_access import TL_MAJOR
    >>> TL_MAJOR >= 2
    True
"""

from __future__ import annotations

import importlib.metadata
from typing import Any, Optional

import torch

__all__ = [
    "TL_MAJOR",
    "TL_VERSION",
    "ActivationCache",
    "HookedTransformer",
    "HookedTransformerConfig",
    "TransformerBridge",
    "TransformerBridgeConfig",
    "is_bridge",
    "is_supported_model",
    "prepare_model",
]

# The model classes of the installed transformer-lens, detected once, here only: the rest of
# the package (the demo model, the command line) imports them from this module.
try:  # 2.x and 3.x
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError:  # 4.x removed it
    HookedTransformer = HookedTransformerConfig = None  # type: ignore[assignment,misc]

try:  # 3.x and 4.x
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
except ImportError:  # 2.x
    TransformerBridge = TransformerBridgeConfig = None  # type: ignore[assignment,misc]

from transformer_lens import ActivationCache  # noqa: E402 - every version has it; after the detection above

TL_VERSION = importlib.metadata.version("transformer-lens")
TL_MAJOR = int(TL_VERSION.split(".")[0])


def prepare_model(model: Any, *, dtype: Optional[torch.dtype] = None, device: Any = None) -> Any:
    """Move and cast a loaded model for the analyses (the CLI's ``--device`` and ``--dtype``).

    Half precision is best chosen at load time
    (``TransformerBridge.boot_transformers(path, dtype=torch.bfloat16)``); this casts a
    model already loaded, in place, and returns it in eval mode. ``None`` leaves the
    device or dtype as it is.

    Example::

        >>> import contextlib, io, torch
        >>> from tl_logitlens.demo import demo_model
        >>> with contextlib.redirect_stdout(io.StringIO()):  # transformer-lens says what it casts
        ...     model = prepare_model(demo_model(), dtype=torch.float64)
        >>> model.W_U.dtype
        torch.float64
    """
    if device is not None:
        model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
        cfg = getattr(model, "cfg", None)
        if cfg is not None and hasattr(cfg, "dtype"):
            cfg.dtype = dtype  # HookedTransformer's norms read cfg.dtype to decide on upcasting
    return model.eval()


def is_bridge(model: Any) -> bool:
    """Whether ``model`` is a ``TransformerBridge`` (3.x/4.x)."""
    return TransformerBridge is not None and isinstance(model, TransformerBridge)


def is_supported_model(model: Any) -> bool:
    """Whether ``model`` is one of the classes this package reads."""
    return is_bridge(model) or (HookedTransformer is not None and isinstance(model, HookedTransformer))
