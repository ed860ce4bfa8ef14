"""Training a tuned lens (Belrose et al. 2023): one affine translator per layer, fitted so that
each layer's reading matches the model's final distribution.

:func:`train_tuned_lens` streams a dataset through the frozen model with hooks that keep
only the residual stream (as :func:`tl_logitlens.evaluate.evaluate_lens` does), passes
every entry below ``final_post`` through its translator and the model's final norm, and
scores it with :func:`tl_logitlens.kernel.lens_loss`, the tiled differentiable KL/CE that
never holds ``[rows, d_vocab]`` logits (:mod:`.step`). The objective, per step: for every
translated entry, ``KL(final || entry)`` (or the next-token cross-entropy), summed over
entries and averaged over the step's tokens.

Training can be stopped at any point and continued: every ``checkpoint_every`` steps the
lens, the optimiser, the schedule, the data position and the random state are written
atomically to ``checkpoint_dir`` (:mod:`.checkpoint`), and a restarted run with
``resume=True`` skips the data already consumed (:mod:`.batches`) and ends with the same lens
as an uninterrupted one.

Inside a ``torch.distributed`` process group (``torchrun``) the ranks share each step
(:mod:`.ranks`): every rank cuts the same micro-batches, runs its round-robin share of them,
and one all-reduce a step sums the translators' gradients, so the lens is one process's.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from ...distributed import distributed_sampler, resolve
from ...errors import LensInputError, ModelStateError, NonFiniteActivationError, UnsupportedModelError
from ...files import OwnedFolder
from ...inputs import context_length, resolve_model, warn_file_names
from ...model_access import compute_device, unembed_sample
from ...progress import progress_bar
from ...stacks import required_hooks
from ..base import check_lens
from ..tuned import TunedLens
from .batches import NOTHING_TO_TRAIN_ON, MicroBatches
from .checkpoint import CHECKPOINT, check_resumable, read_checkpoint, refused, write_checkpoint
from .ranks import Ranks
from .settings import Settings, check_settings, make_optimizer, make_schedule
from .step import LossStep

__all__ = ["train_tuned_lens", "CHECKPOINT"]


def train_tuned_lens(
    model: Any,
    data: Any,
    *,
    steps: int = 250,
    tokens_per_step: int = 2**18,
    batch_size: int = 8,
    lr: float = 1.0,
    optimizer: str = "sgd",
    weight_decay: float = 1e-3,
    loss: str = "kl",
    incl_mid: bool = False,
    seed: int = 0,
    checkpoint_dir: Optional[Union[str, Path]] = None,
    checkpoint_every: Optional[int] = None,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    lens: Any = None,
    distributed: Optional[bool] = None,
) -> Any:
    """Train a :class:`~tl_logitlens.lenses.TunedLens` on ``data``; the model stays frozen.

    Each step reads exactly ``tokens_per_step`` scored tokens (a position with a true next
    token; padding never counts), gathered in micro-batches of ``batch_size`` sequences,
    the last one cut to the step's budget (the rest of it opens the next step). Per
    micro-batch the model runs with hooks on the residual stream only, stopping before
    ``ln_final``; every entry below ``final_post`` (``L_pre``, and ``L_mid`` with
    ``incl_mid``) goes through its translator ``h + A h + b`` and the model's final norm
    (recomputed, as the logit lens reads), and :func:`~tl_logitlens.kernel.lens_loss`
    scores it against the final layer's distribution without materialising logits. The
    loss of a step is ``sum over entries of mean over tokens`` of ``KL(final || entry)``
    (``loss="kl"``, the paper's objective) or of the next-token cross-entropy
    (``loss="ce"``). Translators and loss are float32 whatever the model's dtype.

    Defaults follow EleutherAI tuned-lens's training script (``tuned_lens/scripts``:
    ``train_loop.py`` and ``ingredients.py``, the code behind its 0.2.0 release):

    - ``steps=250`` of ``tokens_per_step=2**18`` tokens (its ``num_steps``, ``tokens_per_step``).
    - ``optimizer="sgd"``: SGD with Nesterov momentum 0.9 and an *effective* learning rate
      ``lr=1.0``: like tuned-lens we pass ``lr * (1 - 0.9)`` to PyTorch, whose momentum
      otherwise scales the step by ``1 / (1 - 0.9)``. ``optimizer="adam"``: tuned-lens's Adam
      (``amsgrad``, betas ``(0.9, 0.999)``, learning rate ``lr * 1e-3``) with a linear
      warm-up over ``min(1000, steps // 5)`` steps.
    - ``weight_decay=1e-3`` (its default), PyTorch's L2 decay on ``A`` and ``b``: since the
      translator is parametrised as ``h + A h + b``, this pulls it toward the identity.
    - The learning rate decays linearly to 0 over ``steps`` (its
      ``get_linear_schedule_with_warmup``); gradients are clipped to norm 1 per step.
    - Unlike tuned-lens we score only positions with a next token (as ``evaluate_lens``
      does) for KL too, stop with a warning instead of silently when the data runs out
      (also when only the last step is short), and do not re-centre ``A`` and ``b`` after
      each batch (tuned-lens's ``normalize_``: on a LayerNorm model it changes nothing the
      loss sees, on an RMSNorm model it would change the objective).

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` in eval mode (any dtype).
        data: as for :func:`~tl_logitlens.evaluate.evaluate_lens`: token ids ``[n, seq]``,
            strings, or an iterable of batches (a ``DataLoader``); read in order. Sequences
            longer than the context are split into windows. To resume, pass the same data.
            A string is the text itself: one that names an existing file warns, naming it.
        steps, tokens_per_step, batch_size: the schedule (see above).
        lr, optimizer, weight_decay: the optimiser (see above).
        loss: ``"kl"`` or ``"ce"``.
        incl_mid: also train translators for the ``L_mid`` entries.
        seed: seeds torch's generator for the run (training itself draws nothing random
            today; the data's order is the data's own).
        checkpoint_dir: where checkpoints (``checkpoint.pt``) and the final lens
            (:meth:`TunedLens.save <tl_logitlens.lenses.TunedLens.save>`) are written. It is
            checked before training starts: a file, a folder that cannot be written, or a
            folder holding files tl_logitlens did not write there is refused (see
            :mod:`tl_logitlens.files`). It is created at the first checkpoint.
        checkpoint_every: steps between checkpoints (default ``min(50, max(1, steps // 5))``);
            a checkpoint is also written after the last step.
        resume: continue from ``checkpoint_dir``'s checkpoint when there is one (made with
            the same settings and model, else refused); ``False`` starts afresh and overwrites it.
        overwrite: write into a ``checkpoint_dir`` that holds other files (files of the same
            names are replaced, no other file is touched).
        progress: a tqdm bar with tokens per second and the loss.
        lens: a :class:`TunedLens` to start from (default: a new identity lens), checked as
            every ``lens=`` is (:func:`~tl_logitlens.lenses.check_lens`: built for this model).
        distributed: inside an initialised ``torch.distributed`` process group (``None``:
            detect it; ``False``: ignore it; ``True``: require it), the ranks share each step.
            Every rank reads the whole data in the same order and so cuts the same
            micro-batches as one process; micro-batch ``k`` of step ``s`` (counted from 0) is
            run by rank ``(k + s) % world_size`` only, so the ranks' tokens of a step are
            exactly one process's (``tokens_per_step`` whatever the world size). The loss is
            normalised by the step's global token count and the translators' gradients are
            summed over the ranks by one all-reduce per step, so every rank takes the same
            optimiser step as one process (equal up to float rounding). Rank 0 alone shows
            progress, warns and writes (checkpoints, atomically, then all ranks wait for
            it; the lens), and a checkpoint resumes exactly under any world size. A
            ``DataLoader`` with a ``DistributedSampler`` is refused (pass it without one).

    Returns:
        The trained :class:`~tl_logitlens.lenses.TunedLens`.

    Raises:
        LensInputError: a setting that cannot train (checked before any forward pass, ``lr``
            whose step would overflow float32 included), a ``checkpoint_dir`` that cannot be
            used, or data with no token to train on (every sequence shorter than two tokens:
            nothing is trained or written).
        NonFiniteActivationError: a non-finite residual stream or loss, or an optimiser step
            that left a translator non-finite (``lr`` too large), naming the step and the
            entry. The translators are checked after every step, before any checkpoint, so
            the last checkpoint written holds the last finite lens, and a lens passed as
            ``lens=`` is restored to its parameters before that step. A non-finite lens is
            never written nor returned.

    Warns:
        UserWarning: the data ran out before ``steps`` steps, or during the last step (its
            gradient is then averaged over the tokens it had); the warning gives the tokens seen.

    Example::

        >>> import torch, tl_logitlens as tll
        >>> model = tll.demo_model()
        >>> tokens = torch.cat([tll.demo.induction_prompt(model, seed=s) for s in range(8)])
        >>> lens = tll.train_tuned_lens(model, tokens, steps=4, tokens_per_step=48, progress=False)
        >>> lens.labels
        ['0_pre', '1_pre']
        >>> bool(lens.translators["0_pre"].weight.abs().sum() > 0)
        True
    """
    view = resolve_model(model)
    settings = check_settings(
        steps=steps,
        tokens_per_step=tokens_per_step,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        weight_decay=weight_decay,
        loss=loss,
        incl_mid=incl_mid,
        seed=seed,
        checkpoint_every=checkpoint_every,
    )
    if not view.logit_transform.is_identity:
        raise UnsupportedModelError(
            f"this model transforms its logits after the unembedding ({view.logit_transform.describe()}); the "
            "training loss kernel reads plain logits, so train_tuned_lens cannot train a lens for it yet"
        )
    ranks = Ranks(resolve(distributed))
    if ranks.group is not None and distributed_sampler(data) is not None:
        raise LensInputError(
            "train_tuned_lens under a process group deals each step's micro-batches to the ranks itself, so every "
            "rank must read the whole data in the same order; pass the DataLoader without a DistributedSampler "
            "(shuffle=False, or a generator with the same seed on every rank)"
        )
    warn_file_names(data, "train_tuned_lens")
    names = required_hooks(view, "accumulated", settings.incl_mid)
    given = lens is not None
    lens = _starting_lens(model, view, lens, settings.incl_mid)
    if checkpoint_dir is not None and lens.stream_change is not None:
        raise ModelStateError(
            "cannot write the trained lens to checkpoint_dir: TunedLens.save writes the tuned-lens format, "
            f"defined on the Hugging Face residual stream, and this model's stream differs because "
            f"{lens.stream_change}. Load the model without that processing, or pass checkpoint_dir=None."
        )
    n_ctx = context_length(view)
    stream, saved, owned = _open(ranks, view, data, settings, checkpoint_dir, resume, overwrite, n_ctx)
    folder = None if checkpoint_dir is None else Path(checkpoint_dir).expanduser()
    run = _Run(view, lens, names, settings, ranks, stream, folder, owned, given)
    if saved is not None:
        check_resumable(saved, run.record, folder / CHECKPOINT, model)
        run.restore(saved)
    else:
        ranks.broadcast_params(run.params)
    run.train(progress)
    if folder is not None:
        ranks.on_main(lambda: lens.save(folder, overwrite=overwrite))
    if ranks.main:  # rank 0 alone warns
        _warn_short(run, stream, n_ctx)
    return lens


def _starting_lens(model: Any, view: Any, lens: Any, incl_mid: bool) -> TunedLens:
    """A new identity lens, or the ``lens=`` to continue, checked against this run."""
    if lens is None:
        return TunedLens(model, incl_mid=incl_mid)
    check_lens(lens, view)  # the check every entry point runs: a class, a callable, a lens for another model
    if not isinstance(lens, TunedLens):
        raise LensInputError(f"lens must be a TunedLens to continue training, got {type(lens).__name__}")
    if lens.incl_mid != incl_mid:
        raise LensInputError(
            f"lens has incl_mid={lens.incl_mid} but this run has incl_mid={incl_mid}; pass incl_mid={lens.incl_mid}"
        )
    return lens


def _open(
    ranks: Ranks,
    view: Any,
    data: Any,
    settings: Settings,
    checkpoint_dir: Any,
    resume: bool,
    overwrite: bool,
    n_ctx: Optional[int],
) -> Tuple[MicroBatches, Optional[Dict[str, Any]], Optional[OwnedFolder]]:
    """The data's micro-batches (validated before any forward pass), the checkpoint to resume, if any, and
    the checkpoint folder, claimed (rank 0 only: the others never write)."""
    saved, owned = None, None
    with ranks.guard():
        if checkpoint_dir is not None and ranks.main:  # rank 0 alone touches the files (its machine may hold them)
            owned = OwnedFolder(checkpoint_dir, overwrite=overwrite, what="train_tuned_lens: checkpoint_dir")
            if resume and (owned.path / CHECKPOINT).is_file():
                saved = read_checkpoint(owned.path / CHECKPOINT)
        stream = MicroBatches(view, data, settings.batch_size, n_ctx)
    ranks.check()
    if checkpoint_dir is not None:
        saved = ranks.share(saved)
    return stream, saved, owned


class _Run:
    """One training run's state: the loss step, the optimiser and schedule, the step and tokens seen."""

    def __init__(
        self,
        view: Any,
        lens: TunedLens,
        names: Any,
        settings: Settings,
        ranks: Ranks,
        stream: MicroBatches,
        folder: Optional[Path],
        owned: Optional[OwnedFolder],
        given: bool,
    ) -> None:
        device = compute_device(view)
        b = view.b_U
        b = None if b is None or not bool(b.any()) else b.float()
        self.loss_step = LossStep(
            view,
            lens,
            names,
            lens.labels,
            view.W_U,
            b,
            view.final_norm.to(torch.float32, device),
            device,
            settings.loss,
            settings.tokens_per_step,
        )
        self.lens, self.settings, self.ranks, self.stream, self.folder = lens, settings, ranks, stream, folder
        self.owned = owned  # rank 0's claim on the folder; it alone writes
        self.given = given  # the caller's own lens: restored if a step leaves it non-finite
        self.record = settings.record(view)
        self.unembed = unembed_sample(view.model)  # checked when a run resumes the checkpoint
        self.params = list(lens.parameters())
        self.opt = make_optimizer(self.params, settings)
        self.sched = make_schedule(self.opt, settings)
        self.step, self.tokens_seen, self.exhausted = 0, 0, False
        self.last_step_tokens: Optional[int] = None  # tokens of the last step this call ran
        self.checkpointed: Optional[int] = None  # the step of the last checkpoint on disk
        # The run's own generator state (restored on resume), in a fork: the caller's is untouched.
        self.rng = torch.Generator().manual_seed(settings.seed).get_state()

    def restore(self, saved: Dict[str, Any]) -> None:
        """Continue from a checkpoint: lens, optimiser, schedule, counters, random state and data position."""
        if not all(bool(torch.isfinite(v).all()) for v in saved["lens"].values()):
            raise refused(
                f"{self.folder / CHECKPOINT} holds a lens with NaN or inf values (an overflowed run of an older "
                "version wrote it)",
                "delete it, or pass resume=False, to start afresh",
            )
        self.lens.load_state_dict(saved["lens"])
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        self.step, self.tokens_seen, self.rng = int(saved["step"]), int(saved["tokens_seen"]), saved["rng"]
        self.checkpointed = self.step
        with self.ranks.guard():
            self.stream.skip_to(int(saved["drawn"]), int(saved["used"]))
        self.ranks.check()

    def train(self, progress: bool) -> None:
        """Steps until ``steps`` or the data runs out, checkpointing every ``every`` steps and at the end."""
        s = self.settings
        for p in self.params:  # a rank dealt no micro-batch in a step still sends its (zero) gradients
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bar = progress_bar(
            s.steps * s.tokens_per_step, progress and self.ranks.main, "train_tuned_lens", initial=self.tokens_seen
        )
        try:
            with torch.random.fork_rng(devices=[]), torch.enable_grad():  # the CLI turns autograd off globally
                torch.set_rng_state(self.rng)
                while self.step < s.steps and not self.exhausted and self._one_step(bar):
                    if self.folder is not None and self.step % s.every == 0 and self.step < s.steps:
                        self._save_checkpoint()
                if self.step == 0:  # as evaluate_lens: nothing to learn from is an error, and nothing is written
                    raise LensInputError(NOTHING_TO_TRAIN_ON)
                if self.folder is not None:
                    self._save_checkpoint()  # the end: a rerun with resume=True returns this lens at once
        finally:
            bar.close()

    def _one_step(self, bar: Any) -> bool:
        """One optimiser step over ``tokens_per_step`` tokens; False when the data gave none."""
        s = self.settings
        self.opt.zero_grad(set_to_none=False)
        got, total, fprint = self._gather(bar)
        # Before the all-reduce: a failed rank ends every rank here.
        self.ranks.check(agree=(got, fprint), what=f"the tokens of step {self.step + 1}")
        if got == 0:
            return False
        total = self.ranks.sum_step(self.params, total)
        if got < s.tokens_per_step:  # the data ran out mid-step: average over the tokens it had
            for p in self.params:
                p.grad.mul_(s.tokens_per_step / got)
            total *= s.tokens_per_step / got
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        before = [p.detach().clone() for p in self.params] if self.given else None
        self.opt.step()
        self._refuse_nonfinite(before)  # before any checkpoint: no non-finite lens is ever written or returned
        self.sched.step()
        self.step += 1
        self.tokens_seen += got
        self.last_step_tokens = got
        bar.set_postfix_str(f"step {self.step}/{s.steps} loss {total:.4g}")
        return True

    def _refuse_nonfinite(self, before: Optional[List[torch.Tensor]]) -> None:
        """Stop, naming the step and the entry, if the optimiser step left a translator non-finite."""
        if bool(torch.stack([torch.isfinite(p).all() for p in self.params]).all()):
            return
        label = next(
            k
            for k, layer in self.lens.translators.items()
            if not all(bool(torch.isfinite(p).all()) for p in layer.parameters())
        )
        if before is not None:
            with torch.no_grad():
                for p, saved in zip(self.params, before):
                    p.copy_(saved)
        s = self.settings
        if self.folder is None:
            kept = "No checkpoint was written (checkpoint_dir=None)."
        elif self.checkpointed is None:
            kept = f"No checkpoint was written yet (the first was due at step {s.every}); nothing was saved."
        else:
            kept = (
                f"The last checkpoint, of step {self.checkpointed}, holds the last finite lens and was left as it was."
            )
        raise NonFiniteActivationError(
            f"train_tuned_lens: the optimiser step {self.step + 1} of {s.steps} left the translator at {label} with "
            f"NaN or inf parameters (lr={s.lr!r} is too large for this model and data; try a smaller lr), so training "
            f"stopped. {kept}"
            + (
                " The lens passed as lens= was restored to its parameters before that step."
                if before is not None
                else ""
            )
        )

    def _gather(self, bar: Any) -> Tuple[int, float, int]:
        """This step's micro-batches: ``(tokens, this rank's loss, fingerprint of the step's tokens)``."""
        budget = self.settings.tokens_per_step
        got, total, k, fprint = 0, 0.0, 0, 0
        with self.ranks.guard():
            while got < budget:
                tokens = self.stream.take(budget - got)
                if tokens is None:
                    self.exhausted = True
                    break
                n = tokens.scored()
                if self.ranks.runs(k, self.step):  # this rank's micro-batch
                    total += self.loss_step.run(tokens, self.step + 1, self.tokens_seen + got)
                fprint = self.ranks.fold_fingerprint(fprint, tokens)
                k += 1
                got += n
                bar.update(n)
        return got, total, fprint

    def _save_checkpoint(self) -> None:
        """Rank 0 writes the checkpoint; every rank learns it is on disk (and of which step)."""
        self.ranks.on_main(self._checkpoint)
        self.checkpointed = self.step

    def _checkpoint(self) -> None:
        stream = self.stream
        write_checkpoint(
            self.owned,
            {
                "world": self.ranks.world,  # for the record: a resume may use any world size
                "settings": self.record,
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "drawn": stream.drawn,
                "used": stream.used if stream.pending is not None else 0,
                "lens": {k: v.detach().cpu() for k, v in self.lens.state_dict().items()},
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "rng": torch.get_rng_state(),
                "unembed_sample": self.unembed,
            },
        )


def _warn_short(run: _Run, stream: MicroBatches, n_ctx: Optional[int]) -> None:
    s = run.settings
    last = run.last_step_tokens
    partial = last is not None and last < s.tokens_per_step
    if run.step < s.steps or partial:
        detail = (
            f" The last step had {last:,} of the {s.tokens_per_step:,} tokens a step reads (its gradient is the "
            "mean over those)."
            if partial
            else ""
        )
        warnings.warn(
            f"train_tuned_lens: the data ran out "
            f"{f'after {run.step} of' if run.step < s.steps else f'during the last step, {run.step} of'} "
            f"{s.steps} steps ({run.tokens_seen:,} tokens of the {s.steps * s.tokens_per_step:,} "
            f"planned{'; the last step was partial' if partial else ''}).{detail} The lens is returned as trained "
            "so far; pass more data, or fewer steps or tokens_per_step.",
            UserWarning,
            stacklevel=3,
        )
    if stream.counts["split"]:
        warnings.warn(
            f"train_tuned_lens: {stream.counts['split']} sequence(s) longer than the model's context of {n_ctx} "
            f"tokens were split into windows overlapping by one token.",
            UserWarning,
            stacklevel=3,
        )
