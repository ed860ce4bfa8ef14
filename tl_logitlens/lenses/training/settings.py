"""The settings of a tuned-lens training run, checked before any forward pass, and what they build.

Defaults follow EleutherAI tuned-lens's training script (see
:func:`~tl_logitlens.lenses.training.train_tuned_lens`); :func:`make_optimizer` and
:func:`make_schedule` turn the settings into tuned-lens's SGD (or Adam) and linear decay.

Example::

    >>> s = check_settings(steps=10, tokens_per_step=64, batch_size=2, lr=1.0, optimizer="sgd",
    ...                    weight_decay=1e-3, loss="kl", incl_mid=False, seed=0, checkpoint_every=None)
    >>> s.every, s.warmup
    (2, 0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Dict, List

import torch

from ...errors import LensInputError

#: SGD momentum (tuned-lens's ``Optimizer.momentum``; also Adam's beta1).
MOMENTUM = 0.9
#: Settings a checkpoint must share with the run that resumes it (as :meth:`Settings.record` names them).
RESUME_KEYS = (
    "steps",
    "tokens_per_step",
    "batch_size",
    "loss",
    "incl_mid",
    "optimizer",
    "lr",
    "weight_decay",
    "d_model",
    "n_layers",
    "d_vocab",
)


@dataclass(frozen=True)
class Settings:
    """A training run's settings, validated; ``every`` is the checkpoint interval in steps."""

    steps: int
    tokens_per_step: int
    batch_size: int
    lr: float
    optimizer: str
    weight_decay: float
    loss: str
    incl_mid: bool
    seed: int
    every: int

    @property
    def warmup(self) -> int:
        """Warm-up steps of the learning rate: tuned-lens's ``min(1000, steps // 5)`` for Adam, none for SGD."""
        return min(1000, self.steps // 5) if self.optimizer == "adam" else 0

    def record(self, view: Any) -> Dict[str, Any]:
        """What a checkpoint records of the run (:data:`RESUME_KEYS`), the model's sizes included."""
        return {
            "steps": self.steps,
            "tokens_per_step": self.tokens_per_step,
            "batch_size": self.batch_size,
            "loss": self.loss,
            "incl_mid": self.incl_mid,
            "optimizer": self.optimizer,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "d_model": view.d_model,
            "n_layers": view.n_layers,
            "d_vocab": view.d_vocab,
        }


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise LensInputError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _nonneg_float(value: Any, name: str, positive: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, Real)
        or not math.isfinite(float(value))
        or value < 0
        or (positive and value == 0)
    ):
        raise LensInputError(
            f"{name} must be a {'positive' if positive else 'non-negative'} finite number, got {value!r}"
        )
    return float(value)


def _check_fits_float32(lr: float, weight_decay: float, optimizer: str) -> None:
    """Refuse an ``lr`` or ``weight_decay`` the optimiser cannot apply to float32 translators (it would overflow)."""
    biggest = torch.finfo(torch.float32).max
    applied = lr * (1 - MOMENTUM) if optimizer == "sgd" else lr * 1e-3  # what make_optimizer hands PyTorch
    if applied > biggest:
        raise LensInputError(
            f"lr={lr!r} cannot train: the {optimizer} step multiplies the gradients by {applied:.3g}, beyond "
            f"float32's largest number ({biggest:.3g}), so the first step would overflow; tuned-lens's default "
            "is lr=1.0"
        )
    if weight_decay > biggest:
        raise LensInputError(
            f"weight_decay={weight_decay!r} cannot train: it is beyond float32's largest number ({biggest:.3g}); "
            "tuned-lens's default is 1e-3"
        )


def check_settings(
    *,
    steps: Any,
    tokens_per_step: Any,
    batch_size: Any,
    lr: Any,
    optimizer: Any,
    weight_decay: Any,
    loss: Any,
    incl_mid: Any,
    seed: Any,
    checkpoint_every: Any,
) -> Settings:
    """Every setting checked, with an error naming the bad one; returns them as :class:`Settings`."""
    steps = _positive_int(steps, "steps")
    tokens_per_step = _positive_int(tokens_per_step, "tokens_per_step")
    batch_size = _positive_int(batch_size, "batch_size")
    lr = _nonneg_float(lr, "lr", positive=True)
    weight_decay = _nonneg_float(weight_decay, "weight_decay")
    if optimizer not in ("sgd", "adam"):
        raise LensInputError(f'optimizer must be "sgd" or "adam", got {optimizer!r}')
    _check_fits_float32(lr, weight_decay, optimizer)
    if loss not in ("kl", "ce"):
        raise LensInputError(f'loss must be "kl" (to the final distribution) or "ce" (next token), got {loss!r}')
    if isinstance(seed, bool) or not isinstance(seed, Integral) or not -(2**63) <= seed < 2**64:
        raise LensInputError(f"seed must be an int in [-2**63, 2**64) (torch's generator seeds), got {seed!r}")
    every = (
        min(50, max(1, steps // 5)) if checkpoint_every is None else _positive_int(checkpoint_every, "checkpoint_every")
    )
    return Settings(
        steps, tokens_per_step, batch_size, lr, optimizer, weight_decay, loss, bool(incl_mid), int(seed), every
    )


def make_optimizer(params: List[torch.nn.Parameter], settings: Settings) -> torch.optim.Optimizer:
    """tuned-lens's optimiser: SGD with Nesterov momentum at an effective ``lr``, or amsgrad Adam at ``lr * 1e-3``."""
    lr, decay = settings.lr, settings.weight_decay
    if settings.optimizer == "sgd":
        # torch's SGD momentum sums gradients without the (1 - beta) factor, so its effective
        # step is lr / (1 - beta): tuned-lens passes lr * (1 - beta) to keep the effective lr.
        return torch.optim.SGD(params, lr=lr * (1 - MOMENTUM), momentum=MOMENTUM, nesterov=True, weight_decay=decay)
    return torch.optim.Adam(params, lr=lr * 1e-3, betas=(MOMENTUM, 0.999), amsgrad=True, weight_decay=decay)


def make_schedule(opt: torch.optim.Optimizer, settings: Settings) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over :attr:`Settings.warmup` steps, then linear decay to 0 at the last step."""
    steps, warmup = settings.steps, settings.warmup

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
