"""The kernel: ``d_model`` vectors read through the final norm and the unembedding, tile by tile.

It knows no model class, no lens and no analysis: callers hand it an :class:`Unembedding`
(the final norm's parameters, ``W_U``, ``b_U`` and the logit transform) and vectors already
through any lens. Two directions over the same tile rules and tuning:

- forward (:mod:`.read`, over :mod:`.tiles`): statistics of every vector (top-k, entropy, KL,
  loss, targets and their ranks, token groups), ``[rows, d_vocab]`` logits never held;
- backward (:mod:`.loss`): a differentiable lens loss (KL to the final distribution or
  cross-entropy) whose gradient comes out of the same kind of tiled pass.

- :mod:`.precision`: the one compute dtype, half precision, finiteness
- :mod:`.norm`: the final norm as parameters, in its three modes
- :mod:`.tuning`: tile shapes measured for the processor at hand
- :mod:`.tiles`: one product's worth of rows, a tile of vocabulary columns at a time
- :mod:`.workers`: single-threaded workers that take a product's pieces in turn on the CPU
- :mod:`.read`: :func:`read_rows` and its :class:`Readout`
- :mod:`.loss`: :func:`lens_loss` and :func:`final_stats`

Example::

    >>> import torch
    >>> u = Unembedding(torch.randn(8, 40), None, FinalNorm("LN", None, None, 1e-5))
    >>> r = read_rows(u, torch.randn(1, 5, 8), norm="recompute", top_k=3)
    >>> tuple(r.entropy.shape)
    (1, 5)
"""

from __future__ import annotations

from .loss import FinalStats, final_stats, lens_loss
from .norm import NORM_MODES, FinalNorm
from .precision import HALF_DTYPES, compute_dtype, is_half, require_finite
from .read import (
    DEFAULT_CHUNK_BUDGET_BYTES,
    GroupMembers,
    Readout,
    Unembedding,
    check_chunk_size,
    group_statistics,
    read_rows,
    reshape_readout,
)

__all__ = [
    "FinalStats",
    "final_stats",
    "lens_loss",
    "NORM_MODES",
    "FinalNorm",
    "HALF_DTYPES",
    "compute_dtype",
    "is_half",
    "require_finite",
    "DEFAULT_CHUNK_BUDGET_BYTES",
    "GroupMembers",
    "Readout",
    "Unembedding",
    "check_chunk_size",
    "group_statistics",
    "read_rows",
    "reshape_readout",
]
