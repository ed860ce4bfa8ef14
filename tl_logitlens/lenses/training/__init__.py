"""Tuned-lens training, split along what one run does.

- :mod:`.settings`: the settings checked before any forward pass; the optimiser and schedule
- :mod:`.batches`: micro-batches of an exact number of scored tokens, from a resumable stream
- :mod:`.step`: one micro-batch: forward through the frozen model, the tiled loss, backward
- :mod:`.ranks`: the multi-process step (who runs which micro-batch, one all-reduce a step)
- :mod:`.checkpoint`: the atomic checkpoint a killed run resumes from
- :mod:`.tuned`: :func:`train_tuned_lens`, the loop over steps
- :mod:`.jacobian`: :func:`fit_jacobian_lens` (TransformerLens's Jacobian-lens estimator, checkpointed, sharded)
"""

from __future__ import annotations

from .checkpoint import CHECKPOINT
from .jacobian import JACOBIAN_CHECKPOINT, fit_jacobian_lens
from .tuned import train_tuned_lens

__all__ = ["CHECKPOINT", "JACOBIAN_CHECKPOINT", "fit_jacobian_lens", "train_tuned_lens"]
