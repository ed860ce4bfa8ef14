"""Datasets as batches of token ids: what :func:`tl_logitlens.evaluate_lens` (and any analysis
that streams a corpus) reads.

A dataset arrives as token ids ``[n, seq]``, strings, an iterable of batches (a ``DataLoader``
of tensors, dicts with ``input_ids`` and an optional right-padded ``attention_mask``, or lists
of strings); every form becomes a stream of right-padded :class:`~tl_logitlens.inputs.tokens.Tokens`
through :func:`tl_logitlens.inputs.tokens.tokenize`, the same path a single prompt takes. Sequences
longer than the model's context are cut into windows that overlap by one token
(:func:`windows`), so every (token, next token) pair is scored exactly once, and
:func:`trim` stops a stream after an exact number of scored tokens.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from ..errors import LensInputError
from ..model_access import ModelView
from .tokens import Tokens, tokenize


def check_ids(view: ModelView, ids: torch.Tensor, what: str) -> torch.Tensor:
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise LensInputError(
            f"{what} must hold integer token ids, got dtype {ids.dtype}; pass token ids "
            "(e.g. tokens.long()) or strings."
        )
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    if ids.ndim != 2:
        raise LensInputError(f"{what} must be token ids shaped [batch, seq], got shape {tuple(ids.shape)}")
    return ids


def batch_from_item(view: ModelView, item: Any) -> Tokens:
    """One batch from an iterable: ids ``[b, seq]``, a dict with ``input_ids``, or a list of strings."""
    if isinstance(item, (list, tuple)) and item and all(isinstance(s, str) for s in item):
        return tokenize(view, list(item), check_context=False)
    if isinstance(item, (list, tuple)) and len(item) >= 1 and isinstance(item[0], torch.Tensor):
        item = item[0]  # a TensorDataset batch: (ids,) or (ids, labels)
    mask = None
    if isinstance(item, Mapping):  # a dict, or a tokenizer's BatchEncoding
        if "input_ids" not in item:
            raise LensInputError(f"a dict batch needs an 'input_ids' entry; got keys {sorted(item)}")
        mask = item.get("attention_mask")
        item = item["input_ids"]
    if type(item).__module__ == "numpy":
        item = torch.as_tensor(item)
    if not isinstance(item, torch.Tensor):
        raise LensInputError(
            "each batch must be a token tensor [batch, seq], a dict with 'input_ids', or a list "
            f"of strings; got {type(item).__name__}"
        )
    ids = check_ids(view, item, "a batch")
    tokens = tokenize(view, ids, check_context=False)
    if mask is not None:
        mask = torch.as_tensor(mask)
        if tuple(mask.shape) != tuple(ids.shape) and not (mask.ndim == 1 and item.ndim == 1 and ids.shape[0] == 1):
            raise LensInputError(
                f"the attention_mask has shape {tuple(mask.shape)} but its input_ids have shape {tuple(item.shape)}; "
                "give one mask value per token id (the same [batch, seq] shape)"
            )
        mask = mask.reshape(ids.shape).bool().cpu()
        lengths = mask.sum(1)
        right_padded = torch.arange(ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        if not torch.equal(mask, right_padded):
            raise LensInputError(
                "the attention_mask is not right-padded (real tokens first, then padding); "
                "evaluate_lens reads right-padded batches, so pad on the right."
            )
        tokens = Tokens(tokens.ids, lengths)
    return tokens


def warn_file_names(data: Any, who: str) -> None:
    """Warn when text data names existing files: the text is read, never the files (the command line reads files).

    ``data`` is a string, or a list or tuple of strings, every one of which names an existing file.
    """
    texts = [data] if isinstance(data, str) else data
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
        return
    if not all(_names_a_file(t) for t in texts):
        return
    shown = ", ".join(repr(t) for t in texts[:3]) + (f" and {len(texts) - 3} more" if len(texts) > 3 else "")
    warnings.warn(
        f"{who}: the text data {shown} {'names an existing file' if len(texts) == 1 else 'name existing files'}; "
        "strings are read as the text itself, not as the files' contents. To read a file, pass its text: "
        f"open({texts[0]!r}).read().splitlines() (one document per line), or use the command line's --data.",
        UserWarning,
        stacklevel=3,
    )


def _names_a_file(text: str) -> bool:
    if not text or len(text) > 4096 or "\n" in text:
        return False
    try:
        return os.path.isfile(os.path.expanduser(text))
    except (OSError, ValueError):
        return False


def batches(view: ModelView, data: Any, batch_size: int) -> Tuple[Iterator[Tokens], Optional[int]]:
    """The data as an iterator of :class:`Tokens` batches, and the number of scored tokens if known."""
    if isinstance(data, str):
        data = [data]
    if isinstance(data, Mapping):  # one batch ({"input_ids": ...}); iterating it would read its keys as text
        data = [data]
    if type(data).__module__ == "numpy":
        data = torch.as_tensor(data)
    if isinstance(data, torch.Tensor):
        ids = check_ids(view, data, "data")
        if ids.numel() == 0:
            raise LensInputError("data is empty: the token tensor holds no tokens")
        tokenize(view, ids, check_context=False)  # every id's range, before the first batch runs
        total = ids.shape[0] * max(0, ids.shape[1] - 1)
        return (
            tokenize(view, ids[i : i + batch_size], check_context=False) for i in range(0, ids.shape[0], batch_size)
        ), total
    if isinstance(data, (list, tuple)) and data and all(isinstance(s, str) for s in data):
        if view.tokenizer is None:
            tokenize(view, data[:1])  # raises the package's "no tokenizer" error
        return (
            tokenize(view, list(data[i : i + batch_size]), check_context=False) for i in range(0, len(data), batch_size)
        ), None
    try:
        iterator = iter(data)
    except TypeError:
        raise LensInputError(
            "data must be token ids [n, seq], a list of strings, or an iterable of batches "
            f"(tensors, dicts with 'input_ids', or lists of strings); got {type(data).__name__}"
        ) from None
    try:
        first = next(iterator)
    except StopIteration:
        raise LensInputError("data is empty: the iterable yielded nothing") from None

    def chained() -> Iterator[Any]:
        yield first
        yield from iterator

    if isinstance(first, str):  # an iterable of strings: batch them here
        if view.tokenizer is None:
            tokenize(view, [first])

        def strings() -> Iterator[Tokens]:
            chunk: List[str] = []
            for text in chained():
                if not isinstance(text, str):
                    raise LensInputError(f"an iterable of strings yielded a {type(text).__name__}")
                chunk.append(text)
                if len(chunk) == batch_size:
                    yield tokenize(view, chunk, check_context=False)
                    chunk = []
            if chunk:
                yield tokenize(view, chunk, check_context=False)

        return strings(), None
    return (batch_from_item(view, item) for item in chained()), None


def windows(tokens: Tokens, n_ctx: int, batch_size: int) -> Tuple[List[Tokens], int]:
    """Split sequences longer than ``n_ctx`` into windows; ``(batches of <= batch_size rows, n split)``.

    Windows start every ``n_ctx - 1`` tokens and overlap by one token, so every (token,
    next token) pair of the sequence is scored exactly once and the count of scored tokens
    is the sequence's own. A window after the first starts mid-text: its first tokens see
    less context than in one long pass (which the model could not make).
    """
    rows: List[torch.Tensor] = []
    split = 0
    for row, length in zip(tokens.ids, tokens.lengths.tolist()):
        if length <= n_ctx:
            rows.append(row[:length])
            continue
        split += 1
        stride = n_ctx - 1
        for start in range(0, length - 1, stride):
            rows.append(row[start : min(start + n_ctx, length)])
    batches = []
    for i in range(0, len(rows), batch_size):
        part = rows[i : i + batch_size]
        lengths = torch.tensor([len(r) for r in part])
        ids = torch.zeros((len(part), int(lengths.max())), dtype=torch.long)  # padding, never scored
        for j, r in enumerate(part):
            ids[j, : len(r)] = r
        batches.append(Tokens(ids, lengths))
    return batches, split


def trim(tokens: Tokens, budget: int) -> Tokens:
    """Keep the first ``budget`` scored tokens (sequence by sequence; the last one is cut short)."""
    scored = (tokens.lengths - 1).clamp_min(0)
    cum = torch.cumsum(scored, 0)
    keep = int((cum < budget).sum()) + 1
    keep = min(keep, tokens.ids.shape[0])
    lengths = tokens.lengths[:keep].clone()
    before = int(cum[keep - 2]) if keep >= 2 else 0
    lengths[-1] = min(int(lengths[-1]), budget - before + 1)
    return Tokens(tokens.ids[:keep, : int(lengths.max())], lengths)


def split_long(
    batches: Iterable[Tokens], n_ctx: Optional[int], batch_size: int, counts: Dict[str, int]
) -> Iterator[Tokens]:
    """Each batch as it comes, or, when it holds sequences longer than ``n_ctx``, as windows (:func:`windows`).

    Every yielded batch carries ``sequences``: how many of the data's sequences it begins.
    """
    for tokens in batches:
        if n_ctx is None or int(tokens.lengths.max()) <= n_ctx:
            tokens.sequences = tokens.ids.shape[0]
            yield tokens
            continue
        if tokens.ids.shape[1] > tokens.lengths.max():
            tokens = Tokens(tokens.ids[:, : int(tokens.lengths.max())], tokens.lengths)
        parts, split = windows(tokens, n_ctx, batch_size)
        counts["split"] += split
        counts["windows"] += sum(p.ids.shape[0] for p in parts) - (tokens.ids.shape[0] - split)
        for k, part in enumerate(parts):
            part.sequences = tokens.ids.shape[0] if k == 0 else 0
            yield part
