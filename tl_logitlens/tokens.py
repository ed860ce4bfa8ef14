"""Turning what a user types into token ids and position indices, with errors up front.

Inputs (a string, a list of strings, or ids ``[batch, pos]``) become a right-padded
``[batch, seq]`` id tensor with each prompt's own length, so "the last token" means
each prompt's last real token. Answers and targets (a token string, an id, a list, a
tensor) become id tensors checked against the vocabulary. Positions become an index
``[batch, n_positions]``. Everything here runs before any forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Any, List, Optional, Sequence, Union

import torch

from .errors import LensInputError
from .model_access import ModelView

TokenSpec = Union[str, int, Sequence[Union[str, int]], torch.Tensor]
PositionSpec = Union[None, int, Sequence[int], slice, torch.Tensor]


@dataclass
class Tokens:
    """Right-padded token ids ``[batch, seq]`` and each prompt's real length ``[batch]``."""

    ids: torch.Tensor
    lengths: torch.Tensor

    @property
    def padded(self) -> bool:
        """Whether any prompt is shorter than the batch's longest."""
        return bool((self.lengths < self.ids.shape[1]).any())


def _require_tokenizer(view: ModelView, what: str) -> None:
    if view.tokenizer is None:
        raise LensInputError(
            f"{what} is text, but this model has no tokenizer; pass token ids instead "
            "(an int, or a tensor of ids), or give the model a tokenizer."
        )


def tokenize(view: ModelView, input: Any) -> Tokens:
    """A string, list of strings, or ids ``[pos]``/``[batch, pos]`` as :class:`Tokens`.

    Strings are tokenised one by one with the model's own ``to_tokens`` (which adds BOS
    as the model is configured to) and right-padded, so causal attention keeps the real
    tokens exact and each prompt's length is known.
    """
    if isinstance(input, str):
        input = [input]
    if isinstance(input, (list, tuple)) and input and all(isinstance(s, str) for s in input):
        _require_tokenizer(view, "the input")
        rows = [view.model.to_tokens(s)[0].cpu() for s in input]
        lengths = torch.tensor([len(r) for r in rows])
        pad = view.tokenizer.pad_token_id
        ids = torch.full((len(rows), int(lengths.max())), int(pad if pad is not None else 0))
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        return Tokens(ids, lengths)
    if isinstance(input, torch.Tensor):
        if input.dtype.is_floating_point or input.dtype == torch.bool:
            raise LensInputError(f"token ids must be an integer tensor, got dtype {input.dtype}")
        ids = input.unsqueeze(0) if input.ndim == 1 else input
        if ids.ndim != 2 or ids.numel() == 0:
            raise LensInputError(
                f"token ids must be shaped [batch, pos] (or [pos]) and non-empty, got {tuple(input.shape)}"
            )
        d_vocab_in = int(view.W_E.shape[0])
        if int(ids.min()) < 0 or int(ids.max()) >= d_vocab_in:
            raise LensInputError(
                f"token ids must lie in [0, {d_vocab_in}); got values from {int(ids.min())} to {int(ids.max())}"
            )
        ids = ids.long().cpu()
        return Tokens(ids, torch.full((ids.shape[0],), ids.shape[1]))
    raise LensInputError(
        f"input must be a string, a list of strings, or token ids [batch, pos]; got {type(input).__name__}"
    )


def single_token_id(view: ModelView, token: Any, what: str) -> int:
    """One token (a string that tokenises to exactly one token, or an id) as an id."""
    if isinstance(token, torch.Tensor) and token.ndim == 0 and not token.dtype.is_floating_point:
        token = int(token)
    if isinstance(token, bool):
        raise LensInputError(f"{what} {token!r} must be a token string or an integer id, not bool")
    if isinstance(token, Integral):
        token = int(token)
        if not 0 <= token < view.d_vocab:
            raise LensInputError(f"{what} id {token} is outside the vocabulary [0, {view.d_vocab})")
        return token
    if isinstance(token, str):
        _require_tokenizer(view, f"{what} {token!r}")
        ids = view.model.to_tokens(token, prepend_bos=False)[0].tolist()
        if len(ids) != 1:
            pieces = [view.decode(i) for i in ids]
            raise LensInputError(
                f"{what} {token!r} is not a single token: it tokenises to {len(ids)} tokens "
                f"{pieces} (ids {ids}); pass one of those pieces or its id."
            )
        return int(ids[0])
    raise LensInputError(f"{what} must be a token string or an integer id, got {type(token).__name__}")


def token_list(view: ModelView, tokens: Any, what: str) -> List[int]:
    """A token or a list of tokens as a list of ids."""
    if isinstance(tokens, (str, Integral)) or (isinstance(tokens, torch.Tensor) and tokens.ndim == 0):
        tokens = [tokens]
    ids = [single_token_id(view, t, what) for t in tokens]
    if not ids:
        raise LensInputError(f"{what} must name at least one token")
    return ids


def per_prompt_ids(view: ModelView, tokens: Any, batch: int, what: str) -> torch.Tensor:
    """A token shared by all prompts, a list with one per prompt, or a ``[batch]`` tensor: ``[batch]`` ids."""
    if isinstance(tokens, torch.Tensor) and tokens.ndim >= 1:
        if tokens.dtype.is_floating_point:
            raise LensInputError(f"{what} must hold integer token ids, got dtype {tokens.dtype}")
        if tokens.shape != (batch,):
            raise LensInputError(
                f"{what} has shape {tuple(tokens.shape)} but there are {batch} prompts; "
                f"pass one id per prompt, shaped [{batch}]."
            )
        return torch.tensor([single_token_id(view, int(t), what) for t in tokens.tolist()])
    if isinstance(tokens, (list, tuple)):
        if len(tokens) != batch:
            raise LensInputError(
                f"{what} lists {len(tokens)} tokens but there are {batch} prompts; give one per "
                "prompt, or a single token shared by all."
            )
        return torch.tensor([single_token_id(view, t, what) for t in tokens])
    return torch.full((batch,), single_token_id(view, tokens, what))


def position_index(positions: PositionSpec, lengths: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, bool]:
    """Resolve positions into ``(index [batch, n], drop_axis)``.

    ``None`` is every position; an int is one position (its axis is dropped, as with
    TransformerLens's ``Slice``), negative ints count from each prompt's own last real
    token; a list, 1-D tensor or slice selects several.
    """
    batch = lengths.shape[0]
    if positions is None:
        return torch.arange(seq_len).expand(batch, seq_len), False
    if isinstance(positions, slice):
        chosen = list(range(seq_len))[positions]
        if not chosen:
            raise LensInputError(f"positions {positions} selects nothing from {seq_len} positions")
        return torch.tensor(chosen).expand(batch, len(chosen)), False
    drop = isinstance(positions, Integral) or (isinstance(positions, torch.Tensor) and positions.ndim == 0)
    if drop:
        wanted = [int(positions)]
    elif isinstance(positions, torch.Tensor):
        wanted = [int(p) for p in positions.reshape(-1).tolist()]
    elif isinstance(positions, (list, tuple)) and all(isinstance(p, Integral) for p in positions):
        wanted = [int(p) for p in positions]
    else:
        raise LensInputError(
            f"positions must be None, an int, a list of ints or a slice; got {positions!r}"
        )
    if not wanted:
        raise LensInputError("positions is empty; pass None for every position")
    index = torch.empty(batch, len(wanted), dtype=torch.long)
    for j, p in enumerate(wanted):
        absolute = lengths + p if p < 0 else torch.full_like(lengths, p)
        bad = (absolute < 0) | (absolute >= lengths)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise LensInputError(
                f"position {p} is out of range for prompt {row}, which has {int(lengths[row])} "
                f"tokens (valid: {-int(lengths[row])} .. {int(lengths[row]) - 1})."
            )
        index[:, j] = absolute
    return index, drop


def gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [batch, seq, ...]`` at ``index [batch, n]`` -> ``[batch, n, ...]``."""
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    return x[rows, index.to(x.device)]


def next_token_ids(tokens: Tokens, index: torch.Tensor) -> torch.Tensor:
    """The true next input token at each selected position, ``-1`` where there is none."""
    nxt = index + 1
    valid = nxt < tokens.lengths.unsqueeze(1)
    ids = gather_positions(tokens.ids, nxt.clamp(max=tokens.ids.shape[1] - 1))
    return torch.where(valid, ids, torch.full_like(ids, -1))


def optional_tokens(view: ModelView, input: Optional[Any]) -> Optional[Tokens]:
    """:func:`tokenize` for an optional input."""
    return None if input is None else tokenize(view, input)
