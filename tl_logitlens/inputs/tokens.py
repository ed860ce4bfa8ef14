"""Turning what a user types into token ids and position indices, with errors up front.

Inputs (a string, a list of strings, or ids ``[batch, pos]``) become a right-padded
``[batch, seq]`` id tensor with each prompt's own length, so "the last token" means
each prompt's last real token. Answers and targets (a token string, an id, a list, a
tensor) become id tensors checked against the vocabulary. Positions become an index
``[batch, n_positions]``. Everything here runs before any forward pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, List, Optional, Sequence, Union

import torch

from ..errors import LensInputError
from ..model_access import ModelView
from ..tokentext import token_text

PositionSpec = Union[None, int, Sequence[int], slice, torch.Tensor]


@dataclass
class Tokens:
    """Right-padded token ids ``[batch, seq]`` and each prompt's real length ``[batch]``; for a
    vision-language model, the images its image tokens stand for (``pixel_values``, else ``None``)."""

    ids: torch.Tensor
    lengths: torch.Tensor
    pixel_values: Optional[torch.Tensor] = None

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


def context_length(view: ModelView) -> Optional[int]:
    """The model's context ``n_ctx`` (``None`` when the config does not say)."""
    return view.n_ctx


def _check_context(view: ModelView, length: int, what: str) -> None:
    n_ctx = context_length(view)
    if n_ctx is not None and length > n_ctx:
        raise LensInputError(
            f"{what} is {length} tokens long, longer than the model's context of {n_ctx} tokens; "
            f"the model cannot read it whole (it would be cut to {n_ctx} tokens and positions "
            "would shift). Shorten it, or split it into pieces of at most "
            f"{n_ctx} tokens."
        )


def _unk(view: ModelView) -> tuple[Optional[int], Optional[str]]:
    """The tokenizer's unknown token ``(id, spelling)``, or ``(None, None)``."""
    tok = view.tokenizer
    unk_id = getattr(tok, "unk_token_id", None)
    if unk_id is None:
        return None, None
    return int(unk_id), getattr(tok, "unk_token", None)


def _warn_unknown(view: ModelView, text: str, row: torch.Tensor, prompt: int) -> None:
    """Warn, naming positions, when a prompt's text became the unknown token."""
    unk_id, unk_text = _unk(view)
    if unk_id is None:
        return
    where = (row == unk_id).nonzero().flatten().tolist()
    if not where:
        return
    # A BOS the model prepends may share the unknown token's id (GPT-2: <|endoftext|>): skip it.
    offset = len(row) - len(_text_ids(view, text))
    where = [p for p in where if p >= offset]
    # The unknown token typed literally is the user's choice, not a substitution.
    literal = text.count(unk_text) if unk_text else 0
    if len(where) > literal:
        warnings.warn(
            f"prompt {prompt}: the tokenizer does not know part of the text and wrote its unknown "
            f"token {unk_text!r} (id {unk_id}) at positions {where}; the model reads that token "
            "there, not your word. Use words of the vocabulary, or pass token ids.",
            UserWarning,
            stacklevel=4,
        )


def _check_id_range(view: ModelView, ids: torch.Tensor, what: str) -> None:
    d_vocab_in = int(view.W_E.shape[0])
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= d_vocab_in:
        raise LensInputError(f"{what} must lie in [0, {d_vocab_in}); got values from {lo} to {hi}")


def tokenize(view: ModelView, input: Any, check_context: bool = True) -> Tokens:
    """A string, list of strings, or ids ``[pos]``/``[batch, pos]`` as :class:`Tokens`.

    Strings are tokenised one by one with the model's own ``to_tokens`` (which adds BOS
    as the model is configured to; never truncating) and right-padded, so causal
    attention keeps the real tokens exact and each prompt's length is known. Text that
    becomes the tokenizer's unknown token is warned about, with its positions. Input
    longer than the model's context is refused with both lengths (``check_context``;
    :func:`tl_logitlens.evaluate.evaluate_lens` splits long documents itself).
    """
    if isinstance(input, str):
        input = [input]
    if type(input).__module__ == "numpy":
        input = torch.as_tensor(input)
    if isinstance(input, (list, tuple)):
        _check_items(input)
    if isinstance(input, (list, tuple)) and input and all(isinstance(s, str) for s in input):
        _require_tokenizer(view, "the input")
        rows = [view.model.to_tokens(s, truncate=False)[0].cpu() for s in input]
        for i, (text, row) in enumerate(zip(input, rows)):
            if check_context:
                _check_context(view, len(row), f"prompt {i}" if len(rows) > 1 else "the prompt")
            _warn_unknown(view, text, row, i)
        lengths = torch.tensor([len(r) for r in rows])
        pad = view.tokenizer.pad_token_id
        ids = torch.full((len(rows), int(lengths.max())), int(pad if pad is not None else 0))
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        return Tokens(ids, lengths)
    if (
        isinstance(input, (list, tuple))
        and input
        and all(isinstance(s, Integral) and not isinstance(s, bool) for s in input)
    ):
        input = torch.tensor([int(s) for s in input])
    if isinstance(input, torch.Tensor):
        if input.dtype.is_floating_point or input.dtype.is_complex or input.dtype == torch.bool:
            raise LensInputError(f"token ids must be an integer tensor, got dtype {input.dtype}")
        ids = input.unsqueeze(0) if input.ndim == 1 else input
        if ids.ndim != 2 or ids.numel() == 0:
            raise LensInputError(
                f"token ids must be shaped [batch, pos] (or [pos]) and non-empty, got {tuple(input.shape)}"
            )
        _check_id_range(view, ids, "token ids")
        if check_context:
            _check_context(view, ids.shape[1], "the token input")
        ids = ids.long().cpu()
        return Tokens(ids, torch.full((ids.shape[0],), ids.shape[1]))
    raise LensInputError(
        "input must be a string, a list of strings, or token ids [batch, pos] (a tensor or a list "
        f"of ints); got {type(input).__name__}"
    )


def _check_items(items: Sequence[Any]) -> None:
    """A list input holds prompts (strings) or token ids (ints), all of one kind: name the first item that is not."""
    if not items:
        raise LensInputError(
            f"the input is an empty {type(items).__name__}; pass a prompt (a string), a list of prompts, or token ids"
        )
    first = items[0]
    if isinstance(first, str):
        kind, ok = "prompts (strings)", lambda x: isinstance(x, str)
    elif isinstance(first, Integral) and not isinstance(first, bool):
        kind, ok = "token ids (ints)", lambda x: isinstance(x, Integral) and not isinstance(x, bool)
    else:
        return  # neither: the caller's message names the type
    for i, item in enumerate(items):
        if not ok(item):
            raise LensInputError(
                f"input item {i} is {item!r} ({type(item).__name__}), but item 0 is {first!r}: a list input holds "
                f"only {kind}; pass every item as {'a string' if isinstance(first, str) else 'an int'}"
            )


def _piece_id(view: ModelView, text: str) -> Optional[int]:
    """The id of the vocabulary piece spelled exactly ``text``, or ``None``."""
    convert = getattr(view.tokenizer, "convert_tokens_to_ids", None)
    if convert is None:
        return None
    try:
        found = convert(text)
    except Exception:  # a tokenizer that cannot look pieces up
        return None
    if not isinstance(found, Integral) or not 0 <= int(found) < view.d_vocab:
        return None
    unk_id, unk_text = _unk(view)
    if int(found) == unk_id and text != unk_text:
        return None  # convert_tokens_to_ids answers "unknown" for pieces it lacks
    return int(found)


def _text_ids(view: ModelView, text: str) -> List[int]:
    return view.model.to_tokens(text, prepend_bos=False, truncate=False)[0].tolist()


def _text_token_id(view: ModelView, text: str, what: str) -> int:
    """One token named by text: its exact piece, the text it is read from, or ``⟨id⟩``."""
    _require_tokenizer(view, f"{what} {text!r}")
    if text == "":
        raise LensInputError(f"{what} is the empty string; name a token (its text, its piece, or its id)")
    unk_id, unk_text = _unk(view)
    ids = _text_ids(view, text)
    piece = _piece_id(view, text)
    if piece is not None:
        if len(ids) == 1 and ids[0] != piece and ids[0] != unk_id:
            warnings.warn(
                f"{what} {text!r} is read as the vocabulary piece {text!r} (id {piece}); as text it "
                f"tokenises to a different token, {token_text(view.tokenizer, ids[0])!r} (id {ids[0]}): "
                "pass that spelling or its id for that one.",
                UserWarning,
                stacklevel=4,
            )
        return piece
    if len(ids) == 1 and (ids[0] != unk_id):
        return int(ids[0])
    # A leading space, as tokenizers spell it inside their vocabulary.
    stripped = text.lstrip(" ")
    if stripped != text and stripped:
        for marker in ("\u2581", "\u0120"):
            found = _piece_id(view, marker * (len(text) - len(stripped)) + stripped)
            if found is not None:
                return found
    if len(text) > 2 and text[0] == "\u27e8" and text[-1] == "\u27e9" and text[1:-1].isdigit():
        return _id_token(view, int(text[1:-1]), what)  # the spelling token_text gives empty tokens
    if unk_id is not None and unk_id in ids:
        raise LensInputError(
            f"{what} {text!r} is not in the vocabulary: the tokenizer reads it as its unknown token "
            f"{unk_text!r} (id {unk_id}), so it would name that token instead. Pass a token of the "
            "vocabulary (as `top_tokens()` spells it) or its id."
        )
    pieces = [token_text(view.tokenizer, i) for i in ids]
    raise LensInputError(
        f"{what} {text!r} is not a single token: it tokenises to {len(ids)} tokens {pieces} "
        f"(ids {ids}). Pass one of those exactly as written here (the vocabulary's spelling, "
        "word-start marker included) or its id."
    )


def _id_token(view: ModelView, token: int, what: str) -> int:
    if not 0 <= token < view.d_vocab:
        raise LensInputError(f"{what} id {token} is outside the vocabulary [0, {view.d_vocab})")
    return token


def single_token_id(view: ModelView, token: Any, what: str) -> int:
    """One token spec as its id: an int id, or text naming exactly one token.

    Text is resolved in this order, and anything else is refused with the pieces it
    would split into:

    1. the exact piece as the vocabulary spells it (``"▁a"``, ``","``, ``"Ġthe"``,
       ``"<EOC>"``): so any token from ``top_tokens()`` or a CSV names itself (a warning
       says so when the same text, tokenised, is another single token);
    2. text the tokenizer reads as exactly one known token (``" the"``, ``"Lily"``);
    3. text whose leading spaces, written as the vocabulary's word-start marker
       (``▁`` or ``Ġ``), is a piece (``" a"`` -> ``"▁a"``);
    4. ``"⟨N⟩"``, the spelling :func:`~tl_logitlens.tokentext.token_text` gives a token
       with no visible text.

    Text the tokenizer maps to its unknown token is refused (it is not in the
    vocabulary). Digits in text stay text (``"7"`` is the token spelled 7); pass an
    ``int`` for an id. Bools and floats are refused.

    Example::

        >>> import tl_logitlens as tll
        >>> from tl_logitlens.model_access import view
        >>> v = view(tll.demo_model())
        >>> single_token_id(v, "cat", "answer") == int(v.model.to_tokens("cat", prepend_bos=False)[0, 0])
        True
    """
    if type(token).__module__ == "numpy" and getattr(token, "ndim", None) == 0:
        token = token.item()
    if isinstance(token, torch.Tensor) and token.ndim == 0:
        if token.dtype.is_floating_point or token.dtype.is_complex or token.dtype == torch.bool:
            raise LensInputError(f"{what} {token!r} must be an integer id, got a {token.dtype} tensor")
        token = int(token)
    if isinstance(token, bool):
        raise LensInputError(f"{what} {token!r} must be a token string or an integer id, not bool")
    if isinstance(token, Integral):
        return _id_token(view, int(token), what)
    if isinstance(token, str):
        return _text_token_id(view, token, what)
    if isinstance(token, Real):
        raise LensInputError(
            f"{what} {token!r} is a {type(token).__name__}; token ids are integers (pass "
            f"{int(token)} if you meant that id, or the token's text)."
        )
    raise LensInputError(f"{what} must be a token string or an integer id, got {type(token).__name__}")


def token_items(tokens: Any, what: str) -> Optional[list]:
    """A list for list-like specs (list, tuple, 1-D tensor or array); ``None`` for a single token."""
    if isinstance(tokens, Mapping):
        raise LensInputError(
            f"{what} is a {type(tokens).__name__}; a mapping's keys and values are ambiguous here. "
            "Pass a token, or a list of tokens."
        )
    if isinstance(tokens, (set, frozenset)):
        raise LensInputError(f"{what} is a set, which has no order; pass a list")
    if type(tokens).__module__ == "numpy":
        tokens = torch.as_tensor(tokens)
    if isinstance(tokens, torch.Tensor):
        if tokens.ndim == 0:
            return None
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise LensInputError(f"{what} must hold integer token ids, got dtype {tokens.dtype}")
        if tokens.ndim != 1:
            raise LensInputError(
                f"{what} must be one token or a list of them, got a tensor of shape {tuple(tokens.shape)}"
            )
        return tokens.tolist()
    if isinstance(tokens, (list, tuple)):
        return list(tokens)
    return None


def token_list(view: ModelView, tokens: Any, what: str) -> List[int]:
    """A token or a list of tokens as a list of ids."""
    items = token_items(tokens, what)
    if items is None:
        items = [tokens]
    ids = [single_token_id(view, t, what) for t in items]
    if not ids:
        raise LensInputError(f"{what} must name at least one token")
    return ids


def per_prompt_ids(view: ModelView, tokens: Any, batch: int, what: str) -> torch.Tensor:
    """A token shared by all prompts, a list with one per prompt, or a ``[batch]`` tensor: ``[batch]`` ids."""
    if type(tokens).__module__ == "numpy" and getattr(tokens, "ndim", 0) >= 1:
        tokens = torch.as_tensor(tokens)
    if isinstance(tokens, torch.Tensor) and tokens.ndim >= 1 and tokens.shape != (batch,):
        raise LensInputError(
            f"{what} has shape {tuple(tokens.shape)} but there are {batch} prompts; "
            f"pass one id per prompt, shaped [{batch}]."
        )
    items = token_items(tokens, what)
    if items is None:
        return torch.full((batch,), single_token_id(view, tokens, what))
    if len(items) != batch:
        raise LensInputError(
            f"{what} lists {len(items)} tokens but there are {batch} prompts; give one per "
            "prompt (a list or a [batch] tensor), or a single token shared by all."
        )
    return torch.tensor([single_token_id(view, t, what) for t in items])


def _is_int(p: Any) -> bool:
    return isinstance(p, Integral) and not isinstance(p, bool)


def position_index(positions: PositionSpec, lengths: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, bool]:
    """Resolve positions into ``(index [batch, n], drop_axis)``.

    ``None`` is every position; an int is one position (its axis is dropped, as with
    TransformerLens's ``Slice``), negative ints count from each prompt's own last real
    token; a list, 1-D tensor or slice selects the same positions in every prompt; a
    ``[batch, n]`` tensor (or list of lists) selects ``n`` positions per prompt. Bools,
    floats and other shapes are refused. ``None`` and slices may reach padding positions
    of a padded batch (the analyses mark those cells); explicit positions must be real
    tokens of every prompt.
    """
    batch = lengths.shape[0]
    if positions is None:
        return torch.arange(seq_len).expand(batch, seq_len), False
    if isinstance(positions, slice):
        for part in (positions.start, positions.stop, positions.step):
            if part is not None and not _is_int(part):
                raise LensInputError(f"positions {positions} must have int (or None) start, stop and step")
        if positions.step == 0:
            raise LensInputError("positions slice step cannot be zero")
        chosen = list(range(seq_len))[positions]
        if not chosen:
            raise LensInputError(f"positions {positions} selects nothing from {seq_len} positions")
        return torch.tensor(chosen).expand(batch, len(chosen)), False
    if type(positions).__module__ == "numpy":
        positions = torch.as_tensor(positions)
    if isinstance(positions, (list, tuple)) and positions and all(isinstance(p, (list, tuple)) for p in positions):
        if not all(_is_int(p) for row in positions for p in row) or len({len(r) for r in positions}) != 1:
            raise LensInputError(
                "positions given per prompt must be a [batch, n] list of lists of ints, all rows of one length"
            )
        positions = torch.tensor(positions)
    if isinstance(positions, torch.Tensor):
        if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
            raise LensInputError(f"positions must hold integers, got a tensor of dtype {positions.dtype}")
        if positions.ndim > 2:
            raise LensInputError(f"positions must be [n] or [batch, n], got a tensor of shape {tuple(positions.shape)}")
        if positions.ndim == 2 and positions.shape[0] != batch:
            raise LensInputError(
                f"positions has shape {tuple(positions.shape)}: a 2-D positions tensor holds positions "
                f"per prompt, [batch, n], and there are {batch} prompts; pass [n] for the same positions "
                "in every prompt."
            )
        drop = positions.ndim == 0
        wanted = positions.long().reshape(1, -1).expand(batch, -1) if positions.ndim < 2 else positions.long()
    elif _is_int(positions):
        drop, wanted = True, torch.tensor([[int(positions)]]).expand(batch, 1)
    elif isinstance(positions, (list, tuple)) and all(_is_int(p) for p in positions):
        drop, wanted = False, torch.tensor([[int(p) for p in positions]], dtype=torch.long).expand(batch, -1)
    else:
        raise LensInputError(
            "positions must be None, an int, a list of ints, a slice, or a [batch, n] tensor of "
            f"ints; got {positions!r}"
        )
    if wanted.shape[1] == 0:
        raise LensInputError("positions is empty; pass None for every position")
    wanted = wanted.cpu()
    absolute = torch.where(wanted < 0, lengths.unsqueeze(1) + wanted, wanted)
    bad = (absolute < 0) | (absolute >= lengths.unsqueeze(1))
    if bool(bad.any()):
        row, col = (int(v) for v in bad.nonzero()[0])
        p = int(wanted[row, col])
        raise LensInputError(
            f"position {p} is out of range for prompt {row}, which has {int(lengths[row])} "
            f"tokens (valid: {-int(lengths[row])} .. {int(lengths[row]) - 1})."
        )
    return absolute, drop


def gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [batch, seq, ...]`` at ``index [batch, n]`` -> ``[batch, n, ...]`` (``x`` itself where
    ``index`` is every position in order: no copy of a whole cache entry)."""
    if index.shape[1] == x.shape[1] and bool((index == torch.arange(x.shape[1], device=index.device)).all()):
        return x
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    return x[rows, index.to(x.device)]


def next_token_ids(tokens: Tokens, index: torch.Tensor) -> torch.Tensor:
    """The true next input token at each selected position, ``-1`` where there is none."""
    nxt = index + 1
    valid = nxt < tokens.lengths.unsqueeze(1)
    ids = gather_positions(tokens.ids, nxt.clamp(max=tokens.ids.shape[1] - 1))
    return torch.where(valid, ids, torch.full_like(ids, -1))
