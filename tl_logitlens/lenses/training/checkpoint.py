"""A training run's checkpoint: everything a killed run needs to end with the lens an
uninterrupted one would, written atomically.

``checkpoint.pt`` holds the lens, the optimiser, the schedule, the step, the tokens seen, the
data position and the random state, with the run's settings; a run that resumes must share
:data:`~tl_logitlens.lenses.training.settings.RESUME_KEYS` with it (:func:`check_resumable`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

import torch

from ...errors import LensInputError
from ...files import OwnedFolder
from ...model_access import unembed_matches
from .settings import RESUME_KEYS

#: The checkpoint's file name inside ``checkpoint_dir``.
CHECKPOINT = "checkpoint.pt"
_FORMAT = "tl_logitlens.train_tuned_lens/1"


def refused(problem: str, mend: str, differences: Sequence[Tuple[str, Any, Any]] = ()) -> LensInputError:
    """A refusal to resume: ``problem; mend`` in Python's words, with ``problem`` and the setting
    ``differences`` ``(name, checkpoint's, now)`` kept on the error (``resume_problem``,
    ``resume_differences``) so that the command line can say it in its own (flags, not keywords)."""
    err = LensInputError(f"{problem}; {mend}")
    err.resume_problem = problem  # type: ignore[attr-defined]
    err.resume_differences = list(differences)  # type: ignore[attr-defined]
    return err


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """The checkpoint at ``path``; a truncated or foreign file is refused naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: name it, not torch's internals
        raise refused(
            f"{path}: not a readable training checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:200]})",
            "delete it to start afresh, or pass resume=False",
        ) from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise refused(f"{path}: not a train_tuned_lens checkpoint", "delete it or pass resume=False")
    return state


def check_resumable(saved: Dict[str, Any], settings: Dict[str, Any], path: Path, model: Any) -> None:
    """Refuse a checkpoint made with other settings, naming each difference, or on another model."""
    differ = [
        (k, saved["settings"].get(k), settings[k]) for k in RESUME_KEYS if saved["settings"].get(k) != settings[k]
    ]
    if differ:
        words = "; ".join(f"{k}: checkpoint {old!r}, now {new!r}" for k, old, new in differ)
        raise refused(
            f"{path} was made with other settings ({words})",
            "resume with the same settings, or pass resume=False (or another checkpoint_dir) to start afresh",
            differ,
        )
    sample = saved.get("unembed_sample")  # absent in checkpoints from before it was recorded
    if sample is not None and not unembed_matches(model, sample):
        raise refused(
            f"{path} was made on another model: its unembedding differs from this model's (same sizes, other weights)",
            "resume with the model that made it, or pass resume=False (or another checkpoint_dir)",
        )


def write_checkpoint(folder: OwnedFolder, state: Dict[str, Any]) -> None:
    """Write ``state`` (without its format tag, added here) to ``folder/checkpoint.pt`` atomically."""
    folder.write(CHECKPOINT, lambda tmp: torch.save({"format": _FORMAT, **state}, tmp))
