"""One micro-batch of tuned-lens training: forward through the frozen model, the tiled loss, backward.

The model runs with hooks on the residual stream only (it stops before ``ln_final``); every
entry below ``final_post`` goes through its translator and the model's final norm
(recomputed, as the logit lens reads), and :func:`~tl_logitlens.kernel.lens_loss` scores it
against the final layer's distribution (or the next token) without materialising logits.
Gradients accumulate in the lens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from ...errors import NonFiniteActivationError
from ...kernel import FinalNorm, final_stats, lens_loss
from ...model_access import capture, input_device
from .batches import MicroBatch


@dataclass
class LossStep:
    """What every micro-batch of a run shares: the model, the lens, the hooks and labels it reads,
    the unembedding ``W``/``b`` and final norm in float32 on ``device``, the loss and the step's budget."""

    view: Any
    lens: Any
    names: List[str]
    labels: List[str]
    W: torch.Tensor
    b: Optional[torch.Tensor]
    fnorm: FinalNorm
    device: torch.device
    loss: str
    tokens_per_step: int

    def run(self, tokens: MicroBatch, step: int, seen: int) -> float:
        """Forward, loss and backward of one micro-batch (``step`` counted from 1, ``seen`` tokens before it,
        both for messages). Returns its contribution to the step's loss: sum over entries and tokens /
        tokens_per_step."""
        ids = tokens.ids
        scored = tokens.mask()  # [b, seq-1]
        store = capture(self.view.model, ids.to(input_device(self.view)), self.names)

        def rows(acts: torch.Tensor, label: str) -> torch.Tensor:
            out = acts[:, :-1][scored.to(acts.device)].to(device=self.device, dtype=torch.float32)
            if not bool(torch.isfinite(out).all()):
                raise NonFiniteActivationError(
                    f"train_tuned_lens: the residual stream at {label} holds NaN or inf values at step {step} "
                    f"(after {seen:,} tokens of training); the model's forward pass overflowed or the data is "
                    "corrupted. The last checkpoint was left as it was."
                )
            return out

        vectors = [rows(store.pop(name), label) for name, label in zip(self.names, self.labels + ["final_post"])]
        final = vectors.pop()
        x = torch.stack(
            [self.fnorm.apply(self.lens.transform(v, label), "recompute") for v, label in zip(vectors, self.labels)]
        )
        if self.loss == "kl":
            per_row = lens_loss(
                x, self.W, self.b, final=final_stats(self.fnorm.apply(final, "recompute"), self.W, self.b)
            )
        else:
            next_ids = ids[:, 1:][scored].to(self.device)
            per_row = lens_loss(x, self.W, self.b, next_tokens=next_ids, loss="ce")
        per_layer = per_row.sum(-1)  # [entries]
        bad = ~torch.isfinite(per_layer.detach())
        if bool(bad.any()):
            label = self.labels[int(bad.nonzero()[0])]
            raise NonFiniteActivationError(
                f"train_tuned_lens: the loss at {label} is not finite at step {step} (after {seen:,} tokens of "
                "training); the lens's translator there holds NaN or inf values or has diverged (try a smaller "
                "lr). The last checkpoint was left as it was."
            )
        total = per_layer.sum() / self.tokens_per_step
        total.backward()
        return float(total.detach())
