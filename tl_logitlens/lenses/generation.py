"""Generation from a layer: every new token chosen from a reading of the stream at one stack entry.

The model runs on the prompt; the stream at the chosen entry (``"5_pre"``, ``"final_post"``)
is captured at each prompt's last token, the pass stopped there; a reading turns it into a
vocabulary distribution; the chosen token is appended and the model runs again. The reading is
a lens's (:meth:`~tl_logitlens.lenses.Lens.generate`: the lens's transform, then the final norm
and unembedding, the way tuned-lens's ``TunedLens.generate`` decodes) or a Patchscope's (the
patched run's own final stream: :func:`tl_logitlens.patchscopes.patchscope_generate`). Either way
the vocabulary distribution comes from the package's one kernel: greedy decoding takes its
top-1 token; sampling draws from its probabilities with a seeded generator.

From ``final_post`` through the logit lens this is the model's own greedy decoding. Every row
stops at the tokenizer's end-of-text token (which is not part of the text); rows of a batch of
prompts of different lengths are right-padded, and each appends its new token at its own end, so
causal attention keeps every row exact without an attention mask. Each step reruns the whole
sequence (no key-value cache): ``max_new_tokens`` forward passes, each stopped at the entry read.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, Callable, List

import torch

from ..errors import LensInputError
from ..inputs import Tokens, context_length
from ..kernel import Unembedding, read_rows
from ..model_access import ModelView
from ..stacks import entry_hooks
from ..tokentext import token_text

#: ``step(ids [rows, seq], last [rows]) -> vectors [rows, d_model]``: the stream a reading
#: turns into the next token's distribution, at position ``last[r]`` of each row.
Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_generation(max_new_tokens: Any, do_sample: Any, seed: Any) -> None:
    """Refuse bad generation options before any forward pass."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral) or max_new_tokens < 1:
        raise LensInputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(do_sample, bool):
        raise LensInputError(f"do_sample must be True (sample) or False (greedy), got {do_sample!r}")
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise LensInputError(f"seed must be an int (sampling draws from a generator seeded with it), got {seed!r}")


def check_room(view: ModelView, tokens: Tokens, max_new_tokens: int) -> None:
    """Refuse a generation that would run past the model's context."""
    n_ctx = context_length(view)
    longest = int(tokens.lengths.max()) + int(max_new_tokens)
    if n_ctx is not None and longest > n_ctx:
        raise LensInputError(
            f"the prompt ({int(tokens.lengths.max())} tokens) plus max_new_tokens={max_new_tokens} makes "
            f"{longest} tokens, more than the model's context of {n_ctx}; ask for fewer new tokens or shorten "
            "the prompt"
        )


def choose_tokens(
    unembed: Unembedding, vectors: torch.Tensor, do_sample: bool, generator: torch.Generator
) -> torch.Tensor:
    """The next token ``[rows]`` of each row's reading ``vectors [rows, d_model]``: the kernel's top-1
    (greedy) or a draw from its probabilities (``do_sample``)."""
    read = read_rows(unembed, vectors.unsqueeze(0), norm="recompute", top_k=1, return_logits=do_sample)
    if not do_sample:
        return read.top_ids[0, :, 0]
    probs = torch.softmax(read.logits[0].float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def decode_loop(
    view: ModelView,
    tokens: Tokens,
    step: Step,
    *,
    max_new_tokens: int,
    do_sample: bool,
    seed: int,
) -> List[List[int]]:
    """The new token ids of every row of ``tokens``, each chosen from ``step``'s reading.

    Rows stop at the end-of-text token (left out); the loop stops when every row has.
    """
    rows = tokens.ids.shape[0]
    ids = torch.cat([tokens.ids, tokens.ids.new_zeros(rows, max_new_tokens)], dim=1)
    lengths = tokens.lengths.clone()
    eos = getattr(view.tokenizer, "eos_token_id", None)
    unembed = view.unembedding("W_U")
    generator = torch.Generator().manual_seed(int(seed))
    new: List[List[int]] = [[] for _ in range(rows)]
    done = torch.zeros(rows, dtype=torch.bool)
    for _ in range(max_new_tokens):
        width = int(lengths.max())
        vectors = step(ids[:, :width], lengths - 1)
        chosen = choose_tokens(unembed, vectors, do_sample, generator).cpu()
        for r in (~done).nonzero().flatten().tolist():
            token = int(chosen[r])
            if eos is not None and token == int(eos):
                done[r] = True
                continue
            new[r].append(token)
            ids[r, lengths[r]] = token
            lengths[r] += 1
        if bool(done.all()):
            break
    return new


def decode_text(view: ModelView, ids: List[int]) -> str:
    """Token ids as text: the tokenizer's decoding, or ``#id`` pieces without a tokenizer."""
    if view.tokenizer is None:
        return "".join(token_text(None, i) for i in ids)
    return view.tokenizer.decode(ids)


def one_entry(view: ModelView, layer: Any) -> tuple:
    """``(label, hook)`` of the one stack entry ``layer`` names (an int or a label)."""
    if layer is None or isinstance(layer, (list, tuple)) or (isinstance(layer, torch.Tensor) and layer.ndim > 0):
        raise LensInputError(
            f"layer must be one stack entry, an int or a label such as '3_pre' or 'final_post'; got {layer!r}"
        )
    return entry_hooks(view, layer)[0]


__all__ = [
    "Step",
    "check_generation",
    "check_room",
    "choose_tokens",
    "decode_loop",
    "decode_text",
    "one_entry",
]
