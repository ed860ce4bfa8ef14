"""The real pretrained models of the `real` tier (SmolLM2-135M, Gemma-3-270m) and the text the tier reads.

The folders come from ``../shared/models/fetch.py``: ``make test-real`` runs it and hands its
output (``name<TAB>folder`` per model) over in ``TL_LOGITLENS_PRETRAINED``; without that, the
folders fetch.py leaves in its cache (``$TL_LOGITLENS_MODEL_CACHE``, default
``~/.cache/tl-logitlens-models``) are used once finished (``.complete``). Absent models skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NAMES = ("smollm2-135m", "gemma-3-270m")

#: Short prompts of different lengths (a right-padded batch), each with a one-token answer both
#: models know: what the lens, attribution and token-group tests read.
PROMPTS = [
    "The capital of France is",
    "The Eiffel Tower is in the city of",
    "The opposite of hot is",
]

#: Plain English for the tuned lens's training steps, evaluation and comparison.
PARAGRAPH = (
    "The river ran quietly past the old mill, where the miller's children had played every summer. "
    "In the morning the water was cold and clear, and by noon the fields on either side were warm "
    "with the smell of cut grass. The village had one school, two shops and a small church, and "
    "everyone knew the names of everyone else's dogs. When the railway came, the mill closed, but "
    "the river kept running, as rivers do, and the children still came to swim in it."
)


def folder(name: str) -> Path:
    """The Hugging Face folder of the real model ``name`` (one of :data:`NAMES`), or skip the test."""
    listed = dict(
        line.split("\t", 1) for line in os.environ.get("TL_LOGITLENS_PRETRAINED", "").splitlines() if "\t" in line
    )
    cache = os.environ.get("TL_LOGITLENS_MODEL_CACHE") or str(Path.home() / ".cache" / "tl-logitlens-models")
    path = Path(listed.get(name, Path(cache) / name))
    if not (path / ".complete").is_file():
        pytest.skip(f"the real model {name} is not fetched: `make test-real` fetches it with ../shared/models/fetch.py")
    return path
