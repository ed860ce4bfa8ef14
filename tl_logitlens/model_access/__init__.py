"""The one reader of the model: TransformerLens versions, classes, weights, hooks and forward runs.

Everything else in the package talks to a :class:`ModelView` (from :func:`view`) and runs the
model through :mod:`.runs`; nothing else reads ``model.cfg`` or calls the model. Supported:
``HookedTransformer`` (transformer-lens 2.x and 3.x) and ``TransformerBridge`` (3.x and 4.x),
raw or in compatibility mode. Cache helpers whose meaning changed across versions are not used:
everything is computed from hooks and weights.

- :mod:`.versions`: the installed transformer-lens and its model classes, ``prepare_model``
- :mod:`.view`: :class:`ModelView` and :func:`view` (architecture, eval mode, final norm, unembedding)
- :mod:`.norms`: norms read as parameters and checked against their modules (final norm, post-norms)
- :mod:`.logits`: :class:`LogitTransform`, what a model does to its logits (linear scales, soft caps)
- :mod:`.blocks`: :class:`SublayerWrite`, how block outputs reach the stream (post-norms, multipliers)
- :mod:`.experts`: expert layers read per (expert, neuron)
- :mod:`.runs`: every forward pass (caching, hooks-only capture, patched runs, batched stream patches
  with one captured read per row) and cache reading
- :mod:`.identity`: the fingerprints a lens file records (``unembed_hash``, ``unembed_sample``), compared with
  ``unembed_matches``; ``stream_change``

Example::

    >>> from tl_logitlens.demo import demo_model
    >>> v = view(demo_model())
    >>> v.final_norm.kind, v.n_layers
    ('LN', 2)
"""

from __future__ import annotations

from .blocks import SublayerWrite
from .experts import ExpertLayer, ExpertReading, read_experts
from .identity import ModelFacts, describe, stream_change, unembed_hash, unembed_matches, unembed_sample
from .logits import LogitTransform
from .runs import (
    PATCH_BUDGET_BYTES,
    StreamPatch,
    cache_has,
    cache_tensor,
    capture,
    capture_differentiable,
    model_from_cache,
    patched_rows_per_pass,
    run_patched,
    run_with_cache,
    run_with_patches,
)
from .versions import (
    TL_MAJOR,
    TL_VERSION,
    ActivationCache,
    HookedTransformer,
    HookedTransformerConfig,
    TransformerBridge,
    TransformerBridgeConfig,
    is_bridge,
    is_supported_model,
    prepare_model,
)
from .view import (
    UNEMBED_MODES,
    ModelView,
    compute_device,
    input_device,
    norm_check_rtol,
    require_eval_mode,
    view,
)

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
    "capture_differentiable",
    "ExpertLayer",
    "ExpertReading",
    "LogitTransform",
    "SublayerWrite",
    "read_experts",
    "UNEMBED_MODES",
    "ModelView",
    "compute_device",
    "input_device",
    "norm_check_rtol",
    "require_eval_mode",
    "view",
    "cache_has",
    "cache_tensor",
    "capture",
    "model_from_cache",
    "run_with_cache",
    "run_with_patches",
    "PATCH_BUDGET_BYTES",
    "StreamPatch",
    "patched_rows_per_pass",
    "run_patched",
    "ModelFacts",
    "describe",
    "stream_change",
    "unembed_hash",
    "unembed_matches",
    "unembed_sample",
]
