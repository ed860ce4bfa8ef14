"""Training a tuned lens (Belrose et al. 2023): one affine translator per layer, fitted so that
each layer's reading matches the model's final distribution.

:func:`train_tuned_lens` streams a dataset through the frozen model with hooks that keep
only the residual stream (as :func:`tl_logitlens.evaluate.evaluate_lens` does), passes
every entry below ``final_post`` through its translator and the model's final norm, and
scores it with :func:`tl_logitlens.train_kernel.lens_loss`, the tiled differentiable
KL/CE that never holds ``[rows, d_vocab]`` logits. The objective, per step: for every
translated entry, ``KL(final || entry)`` (or the next-token cross-entropy), summed over
entries and averaged over the step's tokens.

Training can be stopped at any point and continued: every ``checkpoint_every`` steps the
lens, the optimiser, the schedule, the data position and the random state are written
atomically to ``checkpoint_dir``, and a restarted run with ``resume=True`` skips the data
already consumed and ends with the same lens as an uninterrupted one.

Inside a ``torch.distributed`` process group (``torchrun``) the ranks share each step: every
rank cuts the same micro-batches, runs its round-robin share of them, and one all-reduce a
step sums the translators' gradients, so the lens is one process's (see ``distributed=``).
"""

from __future__ import annotations

import math
import warnings
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch

from .data import batches, split_long
from .distributed import _distributed_sampler, guarded, resolve
from .errors import LensInputError, ModelStateError, NonFiniteActivationError, UnsupportedModelError
from .inputs import resolve_model
from .model_access import capture, compute_device, input_device
from .stacks import required_hooks
from .stream import progress_bar
from .tokens import Tokens, context_length
from .train_kernel import final_stats, lens_loss

__all__ = ["train_tuned_lens"]

CHECKPOINT = "checkpoint.pt"
_FORMAT = "tl_logitlens.train_tuned_lens/1"
#: SGD momentum (tuned-lens's ``Optimizer.momentum``; also Adam's beta1).
MOMENTUM = 0.9
# Settings a checkpoint must share with the run that resumes it.
_SETTINGS = ("steps", "tokens_per_step", "batch_size", "loss", "incl_mid", "optimizer", "lr", "weight_decay",
             "d_model", "n_layers", "d_vocab")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise LensInputError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _nonneg_float(value: Any, name: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)) or value < 0 or (positive and value == 0):
        raise LensInputError(f"{name} must be a {'positive' if positive else 'non-negative'} finite number, got {value!r}")
    return float(value)


class _Batch:
    """Right-padded ids ``[b, seq]`` with ``lengths [b]``, scoring positions ``first[r] <= p < lengths[r] - 1``.

    A batch cut at a step's budget keeps whole rows: its rest re-reads the cut row from its
    start (the cut tokens keep their context) and scores only what the head did not.
    """

    def __init__(self, ids: torch.Tensor, lengths: torch.Tensor, first: Optional[torch.Tensor] = None) -> None:
        self.ids, self.lengths = ids, lengths
        self.first = torch.zeros_like(lengths) if first is None else first

    def counts(self) -> torch.Tensor:
        return (self.lengths - 1 - self.first).clamp_min(0)

    def scored(self) -> int:
        return int(self.counts().sum())

    def mask(self) -> torch.Tensor:
        """``[b, seq - 1]``: the scored positions (they have a next token and belong to this batch)."""
        pos = torch.arange(self.ids.shape[1] - 1).unsqueeze(0)
        return (pos >= self.first.unsqueeze(1)) & (pos < (self.lengths - 1).unsqueeze(1))

    def split(self, budget: int) -> Tuple["_Batch", Optional["_Batch"]]:
        """``(the first budget scored tokens, the rest or None)``; every scored pair lands in exactly one."""
        counts = self.counts()
        cum = torch.cumsum(counts, 0)
        r = int((cum < budget).sum())  # the row where the budget runs out
        before = int(cum[r - 1]) if r > 0 else 0
        k = budget - before  # scored tokens of row r that go to the head (1 .. counts[r])
        head_len = self.lengths[: r + 1].clone()
        head_len[r] = int(self.first[r]) + k + 1
        head = _Batch(self.ids[: r + 1, : int(head_len.max())], head_len, self.first[: r + 1].clone())
        rest_first = self.first[r:].clone()
        rest_first[0] += k
        rest = _Batch(self.ids[r:], self.lengths[r:].clone(), rest_first)
        if rest.scored() == 0:
            return head, None
        return head, rest


class _Stream:
    """Micro-batches of at most a given number of scored tokens, with a position that can be
    saved and restored: ``(batches drawn, scored tokens of the last one already used)``."""

    def __init__(self, view: Any, data: Any, batch_size: int, n_ctx: Optional[int]) -> None:
        stream, _ = batches(view, data, batch_size)
        self.counts = {"split": 0, "windows": 0}
        self.source: Iterator[Tokens] = split_long(stream, n_ctx, batch_size, self.counts)
        self.drawn = 0  # batches taken from the source
        self.used = 0  # scored tokens already used of the batch being read
        self.pending: Optional[_Batch] = None

    def _draw(self) -> Optional[_Batch]:
        try:
            tokens = next(self.source)
        except StopIteration:
            return None
        self.drawn += 1
        self.used = 0
        return _Batch(tokens.ids, tokens.lengths)

    def skip_to(self, drawn: int, used: int) -> None:
        """Restore a position saved by a run of the same data: re-read and drop what it consumed."""
        while self.drawn < drawn:
            self.pending = self._draw()
            if self.pending is None:
                raise LensInputError(
                    f"cannot resume: the checkpoint had read {drawn} batches of the data but the data now "
                    f"holds only {self.drawn}; resume with the same data (in the same order) as the run "
                    "that wrote the checkpoint"
                )
        if used == 0:
            self.pending = None  # the last batch drawn was used up
        elif self.pending is not None:
            _, self.pending = self.pending.split(used)
            self.used = used

    def take(self, budget: int) -> Optional[_Batch]:
        """The next micro-batch of at most ``budget`` scored tokens, or ``None`` when the data is spent."""
        while self.pending is None or self.pending.scored() == 0:
            self.pending = self._draw()
            if self.pending is None:
                return None
        if self.pending.scored() <= budget:
            out, self.pending = self.pending, None
            self.used = 0
            return out
        out, self.pending = self.pending.split(budget)
        self.used += budget
        return out


def _make_optimizer(params: List[torch.nn.Parameter], optimizer: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if optimizer == "sgd":
        # torch's SGD momentum sums gradients without the (1 - beta) factor, so its effective
        # step is lr / (1 - beta): tuned-lens passes lr * (1 - beta) to keep the effective lr.
        return torch.optim.SGD(params, lr=lr * (1 - MOMENTUM), momentum=MOMENTUM, nesterov=True, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr * 1e-3, betas=(MOMENTUM, 0.999), amsgrad=True, weight_decay=weight_decay)


def _schedule(steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor


def _settings(view: Any, **kwargs: Any) -> Dict[str, Any]:
    out = dict(kwargs)
    out.update(d_model=view.d_model, n_layers=view.n_layers, d_vocab=view.d_vocab)
    return out


def _read_checkpoint(path: Path) -> Dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: name it, not torch's internals
        raise LensInputError(f"{path}: not a readable training checkpoint ({type(err).__name__}: {err}); "
                             "delete it to start afresh, or pass resume=False") from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise LensInputError(f"{path}: not a train_tuned_lens checkpoint; delete it or pass resume=False")
    return state


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
    (recomputed, as the logit lens reads), and :func:`~tl_logitlens.train_kernel.lens_loss`
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
      does) for KL too, stop with a warning instead of silently when the data runs out,
      and do not re-centre ``A`` and ``b`` after each batch (tuned-lens's
      ``normalize_``: on a LayerNorm model it changes nothing the loss sees, on an RMSNorm
      model it would change the objective).

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` in eval mode (any dtype).
        data: as for :func:`~tl_logitlens.evaluate.evaluate_lens`: token ids ``[n, seq]``,
            strings, or an iterable of batches (a ``DataLoader``); read in order. Sequences
            longer than the context are split into windows. To resume, pass the same data.
        steps, tokens_per_step, batch_size: the schedule (see above).
        lr, optimizer, weight_decay: the optimiser (see above).
        loss: ``"kl"`` or ``"ce"``.
        incl_mid: also train translators for the ``L_mid`` entries.
        seed: seeds torch's generator for the run (training itself draws nothing random
            today; the data's order is the data's own).
        checkpoint_dir: where checkpoints (``checkpoint.pt``) and the final lens
            (:meth:`TunedLens.save <tl_logitlens.lenses.TunedLens.save>`) are written.
        checkpoint_every: steps between checkpoints (default ``min(50, max(1, steps // 5))``);
            a checkpoint is also written after the last step.
        resume: continue from ``checkpoint_dir``'s checkpoint when there is one (made with
            the same settings, else refused); ``False`` starts afresh and overwrites it.
        progress: a tqdm bar with tokens per second and the loss.
        lens: a :class:`TunedLens` to start from (default: a new identity lens).
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
        NonFiniteActivationError: a non-finite residual stream or loss, naming the entry
            and the step; the last checkpoint written stays as it was.

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
    from .lenses import TunedLens

    view = resolve_model(model)
    steps = _positive_int(steps, "steps")
    tokens_per_step = _positive_int(tokens_per_step, "tokens_per_step")
    batch_size = _positive_int(batch_size, "batch_size")
    lr = _nonneg_float(lr, "lr", positive=True)
    weight_decay = _nonneg_float(weight_decay, "weight_decay")
    if optimizer not in ("sgd", "adam"):
        raise LensInputError(f'optimizer must be "sgd" or "adam", got {optimizer!r}')
    if loss not in ("kl", "ce"):
        raise LensInputError(f'loss must be "kl" (to the final distribution) or "ce" (next token), got {loss!r}')
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise LensInputError(f"seed must be an int, got {seed!r}")
    every = min(50, max(1, steps // 5)) if checkpoint_every is None else _positive_int(checkpoint_every, "checkpoint_every")
    if view.output_transform is not None:
        raise UnsupportedModelError(
            "this model transforms its logits after the unembedding (a logit soft-cap); the training "
            "loss kernel reads plain logits, so train_tuned_lens cannot train a lens for it yet"
        )
    group = resolve(distributed)
    main = group is None or group.is_main
    if group is not None and _distributed_sampler(data) is not None:
        raise LensInputError(
            "train_tuned_lens under a process group deals each step's micro-batches to the ranks itself, so every "
            "rank must read the whole data in the same order; pass the DataLoader without a DistributedSampler "
            "(shuffle=False, or a generator with the same seed on every rank)"
        )
    names = required_hooks(view, "accumulated", bool(incl_mid))
    if lens is None:
        lens = TunedLens(model, incl_mid=bool(incl_mid))
    elif not isinstance(lens, TunedLens):
        raise LensInputError(f"lens must be a TunedLens to continue training, got {type(lens).__name__}")
    elif (lens.d_model, lens.n_layers, lens.incl_mid) != (view.d_model, view.n_layers, bool(incl_mid)):
        raise LensInputError(
            f"lens was built for d_model {lens.d_model}, {lens.n_layers} layers, incl_mid={lens.incl_mid}; "
            f"this run has d_model {view.d_model}, {view.n_layers} layers, incl_mid={bool(incl_mid)}"
        )
    labels = lens.labels
    assert len(labels) == len(names) - 1
    settings = _settings(view, steps=steps, tokens_per_step=tokens_per_step, batch_size=batch_size, loss=loss,
                         incl_mid=bool(incl_mid), optimizer=optimizer, lr=lr, weight_decay=weight_decay)
    folder = None if checkpoint_dir is None else Path(checkpoint_dir)
    if folder is not None and lens.stream_change is not None:
        raise ModelStateError(
            "cannot write the trained lens to checkpoint_dir: TunedLens.save writes the tuned-lens format, "
            f"defined on the Hugging Face residual stream, and this model's stream differs because "
            f"{lens.stream_change}. Load the model without that processing, or pass checkpoint_dir=None."
        )

    # Under a group, a failure inside guarded(group) reaches every rank at the next check.
    def check(**agree: Any) -> None:
        if group is not None:
            group.check(**agree)

    saved = None
    n_ctx = context_length(view)
    with guarded(group):
        if folder is not None and main:  # rank 0 alone touches the files (the folder may be on its machine only)
            if folder.exists() and not folder.is_dir():
                raise LensInputError(f"checkpoint_dir {str(folder)!r} is a file, not a folder")
            if resume and (folder / CHECKPOINT).is_file():
                saved = _read_checkpoint(folder / CHECKPOINT)
        stream = _Stream(view, data, batch_size, n_ctx)  # validates the data before any forward pass
    check()
    if group is not None and folder is not None:
        saved = group.broadcast_object(saved)
    if saved is not None:
        differ = [f"{k}: checkpoint {saved['settings'].get(k)!r}, now {settings[k]!r}"
                  for k in _SETTINGS if saved["settings"].get(k) != settings[k]]
        if differ:
            raise LensInputError(
                f"{folder / CHECKPOINT} was made with other settings ({'; '.join(differ)}); resume with "
                "the same settings, or pass resume=False (or another checkpoint_dir) to start afresh"
            )

    device = compute_device(view)
    W, b = view.W_U, view.b_U
    b = None if b is None or not bool(b.any()) else b.float()
    fnorm = view.final_norm.to(torch.float32, device)
    params = [p for p in lens.parameters()]
    opt = _make_optimizer(params, optimizer, lr, weight_decay)
    warmup = min(1000, steps // 5) if optimizer == "adam" else 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps, warmup))
    step, tokens_seen = 0, 0
    # The run's own generator state (restored on resume), in a fork: the caller's is untouched.
    rng = torch.Generator().manual_seed(int(seed)).get_state()
    if saved is not None:
        lens.load_state_dict(saved["lens"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        step, tokens_seen, rng = int(saved["step"]), int(saved["tokens_seen"]), saved["rng"]
        with guarded(group):
            stream.skip_to(int(saved["drawn"]), int(saved["used"]))
        check()
    elif group is not None:
        group.broadcast_(params)  # one starting lens on every rank (a lens= passed in may differ)
    for p in params:  # a rank dealt no micro-batch in a step still sends its (zero) gradients
        if p.grad is None:
            p.grad = torch.zeros_like(p)

    def on_main(write: Any) -> None:
        """Rank 0 writes; every rank waits for it (the check is the barrier) and learns if it failed."""
        with guarded(group):
            if main:
                write()
        check()

    def write_checkpoint() -> None:
        from .files import atomic_write

        state = {
            "world": 1 if group is None else group.world,  # for the record: a resume may use any world size
            "format": _FORMAT, "settings": settings, "step": step, "tokens_seen": tokens_seen,
            "drawn": stream.drawn, "used": stream.used if stream.pending is not None else 0,
            "lens": {k: v.detach().cpu() for k, v in lens.state_dict().items()},
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
        }
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / CHECKPOINT, lambda tmp: torch.save(state, tmp))

    bar = progress_bar(steps * tokens_per_step, progress and main, "train_tuned_lens", initial=tokens_seen)
    exhausted = False
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():  # the CLI turns autograd off globally
            torch.set_rng_state(rng)
            while step < steps and not exhausted:
                opt.zero_grad(set_to_none=False)
                got, total, k, fprint = 0, 0.0, 0, 0
                with guarded(group):
                    while got < tokens_per_step:
                        tokens = stream.take(tokens_per_step - got)
                        if tokens is None:
                            exhausted = True
                            break
                        n = tokens.scored()
                        if group is None or (k + step) % group.world == group.rank:  # this rank's micro-batch
                            total += _micro_step(view, lens, names, labels, tokens, W, b, fnorm, device, loss,
                                                 tokens_per_step, step + 1, tokens_seen + got)
                        if group is not None:
                            fprint = hash((fprint, _fingerprint(tokens)))
                        k += 1
                        got += n
                        bar.update(n)
                # Before the all-reduce: a failed rank ends every rank here.
                check(agree=(got, fprint), what=f"the tokens of step {step + 1}")
                if got == 0:
                    break
                if group is not None:  # the step's gradient: the sum of every rank's micro-batches
                    summed = torch.tensor([total], dtype=torch.float32, device=params[0].device)
                    group.sum_([p.grad for p in params] + [summed])
                    total = float(summed[0])
                if got < tokens_per_step:  # the data ran out mid-step: average over the tokens it had
                    for p in params:
                        p.grad.mul_(tokens_per_step / got)
                    total *= tokens_per_step / got
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                step += 1
                tokens_seen += got
                bar.set_postfix_str(f"step {step}/{steps} loss {total:.4g}")
                if folder is not None and step % every == 0 and step < steps:
                    on_main(write_checkpoint)
            if folder is not None:
                on_main(write_checkpoint)  # the end: a rerun with resume=True returns this lens at once
    finally:
        bar.close()
    if folder is not None:
        on_main(lambda: lens.save(folder))
    if not main:  # rank 0 alone warns
        return lens
    if step < steps:
        warnings.warn(
            f"train_tuned_lens: the data ran out after {step} of {steps} steps ({tokens_seen:,} tokens of the "
            f"{steps * tokens_per_step:,} planned{'; the last step was partial' if tokens_seen % tokens_per_step else ''}). "
            "The lens is returned as trained so far; pass more data, or fewer steps or tokens_per_step.",
            UserWarning,
            stacklevel=2,
        )
    if stream.counts["split"]:
        warnings.warn(
            f"train_tuned_lens: {stream.counts['split']} sequence(s) longer than the model's context of {n_ctx} "
            f"tokens were split into windows overlapping by one token.",
            UserWarning,
            stacklevel=2,
        )
    return lens


def _fingerprint(tokens: "_Batch") -> Tuple[int, ...]:
    """A cheap summary of a micro-batch (its shape, scored range and a position-weighted id sum),
    compared across ranks each step: ranks reading different data would otherwise train silently wrong."""
    ids = tokens.ids.long()
    weights = torch.arange(1, ids.numel() + 1, dtype=torch.long).view_as(ids) % 1000003
    return (*ids.shape, int((ids * weights).sum()), *tokens.lengths.tolist(), *tokens.first.tolist())


def _micro_step(view: Any, lens: Any, names: List[str], labels: List[str], tokens: "_Batch", W: torch.Tensor,
                b: Optional[torch.Tensor], fnorm: Any, device: torch.device, loss: str, tokens_per_step: int,
                step: int, seen: int) -> float:
    """Forward, loss and backward of one micro-batch; gradients accumulate in the lens. Returns
    its contribution to the step's loss (sum over entries and tokens / tokens_per_step)."""
    ids = tokens.ids
    scored = tokens.mask()  # [b, seq-1]
    store = capture(view.model, ids.to(input_device(view)), names)
    every_label = labels + ["final_post"]

    def rows(acts: torch.Tensor, label: str) -> torch.Tensor:
        out = acts[:, :-1][scored.to(acts.device)].to(device=device, dtype=torch.float32)
        if not bool(torch.isfinite(out).all()):
            raise NonFiniteActivationError(
                f"train_tuned_lens: the residual stream at {label} holds NaN or inf values at step {step} "
                f"(after {seen:,} tokens of training); the model's forward pass overflowed or the data is "
                "corrupted. The last checkpoint was left as it was."
            )
        return out

    vectors = [rows(store.pop(name), label) for name, label in zip(names, every_label)]
    final = vectors.pop()
    x = torch.stack([fnorm.apply(lens.transform(v, label), "recompute") for v, label in zip(vectors, labels)])
    if loss == "kl":
        per_row = lens_loss(x, W, b, final=final_stats(fnorm.apply(final, "recompute"), W, b))
    else:
        next_ids = ids[:, 1:][scored].to(device)
        per_row = lens_loss(x, W, b, next_tokens=next_ids, loss="ce")
    per_layer = per_row.sum(-1)  # [entries]
    bad = ~torch.isfinite(per_layer.detach())
    if bool(bad.any()):
        label = labels[int(bad.nonzero()[0])]
        raise NonFiniteActivationError(
            f"train_tuned_lens: the loss at {label} is not finite at step {step} (after {seen:,} tokens of "
            "training); the lens's translator there holds NaN or inf values or has diverged (try a smaller "
            "lr). The last checkpoint was left as it was."
        )
    total = per_layer.sum() / tokens_per_step
    total.backward()
    return float(total.detach())
