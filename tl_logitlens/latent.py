"""Latent language: which language a model's middle layers read in (Wendler et al., 2024, "Do Llamas Work
in English?", arXiv 2402.10588).

The analysis: translation prompts (5-shot, ``Français: "fleur" - English: "``), and at each layer
the probability the lens gives, at the last position, to each language's word for the answer,
averaged over many prompts with a 95% confidence interval, and the entropy. A word is rarely one
token (Gemma spells "maison" with ``ma`` + ``ison`` without a leading space), so a word counts by
its token *set* (:func:`word_tokens`): every prefix of the word that is a vocabulary token, with and
without the word-start marker, plus the first byte token for a script that falls back to bytes. A
group's probability is the summed probability of its set, read in the kernel's tiles
(:func:`tl_logitlens.logit_lens` with token groups). Prompts whose groups share a token are dropped
(a shared prefix would count for both languages) and counted.

Example::

    >>> import tl_logitlens as tll
    >>> model = tll.demo_model()
    >>> tll.word_tokens(model, "cat") == [model.to_single_token("cat")]
    True
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch

from .errors import LensInputError
from .files import SavedAsJson
from .inputs import resolve_model

#: How :func:`word_tokens` reads word starts: with the marker, without it, or both.
WORD_STARTS = ("both", "with", "without")
_FORMAT = "tl_logitlens.latent_language/1"
_SENTENCEPIECE, _BYTE_LEVEL = "\u2581", "\u0120"  # ▁ and Ġ (byte-level BPE's spelling of the space byte)


def _byte_pieces() -> Dict[int, str]:
    """Byte-level BPE's spelling of each byte (GPT-2's table: printable bytes as themselves, the rest shifted)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class _Spelling:
    """How a tokenizer's vocabulary spells text: SentencePiece (``▁``, ``<0xNN>`` bytes), byte-level BPE
    (``Ġ``, one piece per byte) or word-level (text as it is, no marker); found from the vocabulary itself."""

    def __init__(self, vocab: Mapping[str, int]) -> None:
        self.vocab = vocab
        count = {m: sum(1 for piece in vocab if piece.startswith(m)) for m in (_SENTENCEPIECE, _BYTE_LEVEL)}
        marker = max(count, key=count.get)  # type: ignore[arg-type]
        self.kind = "word-level"
        if count[marker] >= max(1, len(vocab) // 100):
            self.kind = "sentencepiece" if marker == _SENTENCEPIECE else "byte-level"
        self.bytes = _byte_pieces() if self.kind == "byte-level" else None
        self.marker = {"sentencepiece": _SENTENCEPIECE, "byte-level": _BYTE_LEVEL}.get(self.kind)

    def piece(self, text: str) -> str:
        if self.bytes is not None:
            return "".join(self.bytes[b] for b in text.encode("utf-8"))
        return text.replace(" ", self.marker) if self.marker else text

    def first_byte(self, word: str) -> str:
        b = word.encode("utf-8")[0]
        return self.bytes[b] if self.bytes is not None else f"<0x{b:02X}>"

    def ids(self, word: str, prefixes: bool, word_start: str) -> List[int]:
        """The token set of one word (see :func:`word_tokens`)."""
        heads = [""] if self.marker is None or word_start == "without" else [self.marker]
        if self.marker is not None and word_start == "both":
            heads.append("")
        if self.marker is None and word_start == "with":
            heads = []
        stems = [word[:i] for i in range(1, len(word) + 1)] if prefixes else [word]
        found = {self.vocab[h + self.piece(s)] for h in heads for s in stems if h + self.piece(s) in self.vocab}
        first = word[0]
        if self.kind != "word-level" and not any(h + self.piece(first) in self.vocab for h in heads):
            # A script that falls back to bytes: its first byte token (shared by many words of that script).
            found.update(
                self.vocab[h + self.first_byte(word)] for h in heads if h + self.first_byte(word) in self.vocab
            )
        return sorted(found)


def _vocabulary(model: Any) -> tuple:
    """``(tokenizer vocabulary, d_vocab or None)`` of a model or a tokenizer."""
    if hasattr(model, "get_vocab"):
        return model.get_vocab(), None
    view = resolve_model(model)
    if view.tokenizer is None or not hasattr(view.tokenizer, "get_vocab"):
        raise LensInputError("word_tokens needs the model's tokenizer (model.tokenizer); pass token ids instead")
    return view.tokenizer.get_vocab(), view.d_vocab


def _words(words: Any, what: str) -> List[str]:
    items = [words] if isinstance(words, str) else words
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(w, str) and w.strip() for w in items):
        raise LensInputError(f"{what} must be a word or a non-empty list of words (non-empty strings), got {words!r}")
    return [w.strip() for w in items]


def word_tokens(
    model: Any, words: Any, *, prefixes: bool = True, word_start: str = "both"
) -> Union[List[int], Dict[str, List[int]]]:
    """The token set of a word (or of synonyms, or of named groups of words), as sorted vocabulary ids.

    A word's set is every prefix of it that is a vocabulary token (``prefixes=False``: the whole
    word only), with the word-start marker (SentencePiece's ``▁``, byte-level BPE's ``Ġ``) and
    without it (``word_start``: ``"both"``, ``"with"`` or ``"without"``), plus, where the word's
    first character is no token (a script that falls back to bytes), its first UTF-8 byte's token
    (``<0xE8>``; byte-level BPE: the one-byte piece). A word-level vocabulary has no marker: a word
    is its own token. The tokenizer's kind is read from its vocabulary.

    Args:
        model: a model with a tokenizer, or a Hugging Face tokenizer.
        words: a word, a list of words (one set: their union), or ``{"name": word or words, ...}``
            (one set per name; two sets sharing tokens warn, naming the tokens).

    Returns:
        ``[ids]``, or ``{"name": [ids], ...}`` for a dict.

    Example::

        >>> import tl_logitlens as tll
        >>> model = tll.demo_model()
        >>> sets = tll.word_tokens(model, {"animal": ["cat", "dog"], "colour": "red"})
        >>> sorted(model.tokenizer.decode(i) for i in sets["animal"]), len(sets["colour"])
        (['cat', 'dog'], 1)
    """
    if word_start not in WORD_STARTS:
        raise LensInputError(f"word_start must be one of {WORD_STARTS}, got {word_start!r}")
    if not isinstance(prefixes, bool):
        raise LensInputError(f"prefixes must be True or False, got {prefixes!r}")
    named = isinstance(words, Mapping)
    groups = {str(k): _words(v, f"words of {k!r}") for k, v in words.items()} if named else {"": _words(words, "words")}
    if named and not groups:
        raise LensInputError('words is an empty dict; pass {"name": word or [words], ...}')
    vocab, d_vocab = _vocabulary(model)
    spelling = _Spelling(vocab)
    out: Dict[str, List[int]] = {}
    for name, items in groups.items():
        ids = set()
        for word in items:
            found = [i for i in spelling.ids(word, prefixes, word_start) if d_vocab is None or i < d_vocab]
            if not found:
                raise LensInputError(
                    f"no token of this {spelling.kind} vocabulary spells {word!r} (prefixes={prefixes}, "
                    f"word_start={word_start!r}); try prefixes=True, word_start='both', or pass token ids"
                )
            ids.update(found)
        out[name] = sorted(ids)
    if named:
        _warn_shared(out, vocab)
    return out if named else out[""]


def _shared(sets: Dict[str, List[int]]) -> Dict[tuple, List[int]]:
    names = list(sets)
    pairs = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            common = sorted(set(sets[a]) & set(sets[b]))
            if common:
                pairs[(a, b)] = common
    return pairs


def _warn_shared(sets: Dict[str, List[int]], vocab: Mapping[str, int]) -> None:
    pieces = {i: p for p, i in vocab.items()}
    for (a, b), common in _shared(sets).items():
        listed = ", ".join(f"{pieces.get(i, i)!r} ({i})" for i in common[:10]) + (" ..." if len(common) > 10 else "")
        warnings.warn(
            f"token groups {a!r} and {b!r} share {len(common)} token(s): {listed}; their probability counts for both",
            stacklevel=3,
        )


@functools.cache
def t_quantile_975(dof: int) -> float:
    """The 97.5% quantile of Student's t with ``dof`` degrees of freedom, to about 1e-9: the density
    integrated by Simpson's rule and the quantile found by bisection (no statistics library needed).

    Example::

        >>> round(t_quantile_975(39), 4), round(t_quantile_975(5), 4), round(t_quantile_975(2), 3)
        (2.0227, 2.5706, 4.303)
    """
    v = float(dof)
    log_norm = math.lgamma((v + 1) / 2) - math.lgamma(v / 2) - 0.5 * math.log(v * math.pi)

    def mass(x: float, steps: int = 2000) -> float:  # P(0 < T < x), Simpson's rule
        h = x / steps
        f = [math.exp(log_norm - (v + 1) / 2 * math.log1p((i * h) ** 2 / v)) for i in range(steps + 1)]
        return h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    low, high = 1.9, 13.0  # the quantile lies between the normal's 1.96 and t(1)'s 12.706
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if mass(mid) < 0.475 else (low, mid)
    return (low + high) / 2


@dataclass
class LatentLanguage(SavedAsJson):
    """Per stack entry and token group: the probability the lens gives each group at the last position.

    Attributes:
        labels: stack entry labels (``0_pre .. final_post``).
        group_names: the groups, in the order given.
        probs: ``[prompt, entry, group]`` each kept prompt's summed group probability.
        entropy: ``[prompt, entry]`` each kept prompt's entropy, nats.
        prompts: the kept prompts; ``dropped``: the indices (into the prompts given) of those dropped
            because two of their groups shared a token.
        lens_name: the lens read.

    ``mean``, ``ci_low``, ``ci_high`` (``[entry, group]``: the mean over prompts and its 95%
    confidence interval, Student's t) and ``mean_entropy`` (``[entry]``) summarise them.

    Example::

        >>> import tl_logitlens as tll
        >>> model = tll.demo_model()
        >>> out = tll.latent_language(model, ["red cat", "blue sky"], {"next": ["sun", "sea"], "self": ["cat", "sky"]})
        >>> tuple(out.mean.shape), out.group_names, list(out.to_dataframe().columns)[:4]
        ((3, 2), ['next', 'self'], ['entry', 'group', 'mean', 'ci_low'])
    """

    labels: List[str]
    group_names: List[str]
    probs: torch.Tensor
    entropy: torch.Tensor
    prompts: List[str]
    dropped: List[int]
    lens_name: str = "logit"

    @property
    def mean(self) -> torch.Tensor:
        return self.probs.mean(0)

    def _half_width(self) -> torch.Tensor:
        n = self.probs.shape[0]
        if n < 2:
            return torch.full_like(self.mean, float("nan"))
        return t_quantile_975(n - 1) * self.probs.std(0) / math.sqrt(n)

    @property
    def ci_low(self) -> torch.Tensor:
        return self.mean - self._half_width()

    @property
    def ci_high(self) -> torch.Tensor:
        return self.mean + self._half_width()

    @property
    def mean_entropy(self) -> torch.Tensor:
        return self.entropy.mean(0)

    def to_dataframe(self) -> Any:
        """One row per (entry, group): ``mean``, ``ci_low``, ``ci_high``, ``n_prompts``, ``mean_entropy``."""
        import pandas as pd

        mean, low, high, ent = self.mean, self.ci_low, self.ci_high, self.mean_entropy
        rows = [
            (label, g, float(mean[e, j]), float(low[e, j]), float(high[e, j]), len(self.prompts), float(ent[e]))
            for e, label in enumerate(self.labels)
            for j, g in enumerate(self.group_names)
        ]
        return pd.DataFrame(rows, columns=["entry", "group", "mean", "ci_low", "ci_high", "n_prompts", "mean_entropy"])

    def plot(self, **kwargs: Any) -> Any:
        """The paper's figure (:func:`tl_logitlens.plots.latent.plot_latent_language`)."""
        from .plots.latent import plot_latent_language

        return plot_latent_language(self, **kwargs)

    def to_html(self, path: Any, *, overwrite: bool = False) -> Any:
        """Write the interactive figure (hover: mean, interval, entropy) to ``path`` as a self-contained page."""
        from .plots.interactive import to_html
        from .plots.latent import latent_language_figure

        return to_html(latent_language_figure(self), path, title="tl_logitlens: latent language", overwrite=overwrite)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": _FORMAT,
            "labels": self.labels,
            "group_names": self.group_names,
            "probs": self.probs.tolist(),
            "entropy": self.entropy.tolist(),
            "prompts": self.prompts,
            "dropped": self.dropped,
            "lens_name": self.lens_name,
        }

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> LatentLanguage:
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise LensInputError(f"not a saved LatentLanguage (format {_FORMAT!r} expected)")
        try:
            return cls(
                labels=list(data["labels"]),
                group_names=list(data["group_names"]),
                probs=torch.tensor(data["probs"], dtype=torch.float32),
                entropy=torch.tensor(data["entropy"], dtype=torch.float32),
                prompts=list(data["prompts"]),
                dropped=[int(i) for i in data["dropped"]],
                lens_name=str(data["lens_name"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise LensInputError(f"a saved LatentLanguage is missing or has a bad field: {err}") from None


def _group_sets(model: Any, prompts: Sequence[str], groups: Any) -> Dict[str, List[List[int]]]:
    """Each group's token set per prompt, checked before any forward pass."""
    if not isinstance(groups, Mapping) or not groups:
        raise LensInputError(
            'groups must be {"name": [one word, words or token ids per prompt], ...}, e.g. '
            '{"en": ["flower", ...], "fr": ["fleur", ...]}'
        )
    sets: Dict[str, List[List[int]]] = {}
    for name, per_prompt in groups.items():
        if not isinstance(name, str) or not name or isinstance(per_prompt, str) or len(per_prompt) != len(prompts):
            raise LensInputError(
                f"group {name!r} must be named by a non-empty string and give one word (or words, or token ids) "
                f"per prompt: {len(prompts)} items, got {per_prompt!r:.80}"
            )
        sets[name] = [_item_ids(model, item, f"group {name!r}, prompt {i}") for i, item in enumerate(per_prompt)]
    return sets


def _item_ids(model: Any, item: Any, what: str) -> List[int]:
    if isinstance(item, int) and not isinstance(item, bool):
        return [item]
    if isinstance(item, (list, tuple)) and item and all(isinstance(i, int) and not isinstance(i, bool) for i in item):
        return sorted(set(item))
    try:
        return word_tokens(model, item)  # type: ignore[return-value]
    except LensInputError as err:
        raise LensInputError(f"{what}: {err}") from None


def _check_prompts(prompts: Any, batch_size: Any) -> List[str]:
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise LensInputError("prompts must be a non-empty list of strings (one translation prompt each)")
    if not all(isinstance(p, str) and p for p in prompts):
        raise LensInputError("every prompt must be a non-empty string")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LensInputError(f"batch_size must be a positive int, got {batch_size!r}")
    return list(prompts)


def latent_language(
    model: Any,
    prompts: Sequence[str],
    groups: Mapping[str, Sequence[Any]],
    *,
    lens: Optional[Callable[[torch.Tensor, str], torch.Tensor]] = None,
    batch_size: int = 8,
) -> LatentLanguage:
    """Per stack entry: how much probability each language's word gets at each prompt's last position.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` with a tokenizer.
        prompts: translation prompts, each ending where the answer starts (``... English: "``).
        groups: ``{"name": [per prompt: a word, a list of words, or token ids], ...}``; words become
            token sets by :func:`word_tokens`. A prompt whose groups share a token is dropped
            (``result.dropped``), with a warning that counts them.
        lens: a :class:`~tl_logitlens.lenses.Lens` (e.g. a tuned lens); ``None``: the logit lens.
        batch_size: prompts per forward pass.

    Returns:
        :class:`LatentLanguage`.

    Example::

        >>> import tl_logitlens as tll
        >>> groups = {"a": ["cat", "sun"], "b": ["cat", "sea"]}
        >>> out = tll.latent_language(tll.demo_model(), ["red cat", "red sun"], groups)
        >>> out.dropped, len(out.prompts)  # prompt 0: both groups are "cat"
        ([0], 1)
    """
    from .lens import logit_lens

    prompts = _check_prompts(prompts, batch_size)
    sets = _group_sets(model, prompts, groups)
    names = list(sets)
    kept = [i for i in range(len(prompts)) if not _shared({g: sets[g][i] for g in names})]
    dropped = [i for i in range(len(prompts)) if i not in kept]
    if not kept:
        raise LensInputError(f"every one of the {len(prompts)} prompts has groups that share a token; nothing to read")
    if dropped:
        warnings.warn(
            f"latent_language: {len(dropped)} of {len(prompts)} prompts dropped: their groups share "
            f"tokens (prompts {dropped[:10]}{' ...' if len(dropped) > 10 else ''})",
            stacklevel=2,
        )
    probs, entropy, labels, named = [], [], None, None
    for start in range(0, len(kept), batch_size):
        batch = kept[start : start + batch_size]
        targets = {f"{g}#{b}": sets[g][i] for b, i in enumerate(batch) for g in names}
        result = logit_lens(model, [prompts[i] for i in batch], positions=-1, lens=lens, top_k=1, targets=targets)
        gp = result.group_probs.view(len(result.labels), len(batch), len(batch), len(names))  # [entry, b, b', g]
        probs.append(torch.stack([gp[:, b, b] for b in range(len(batch))]))  # [b, entry, g]
        entropy.append(result.entropy.transpose(0, 1))
        labels, named = result.labels, result.lens_name
    return LatentLanguage(
        labels=labels,
        group_names=names,
        probs=torch.cat(probs),
        entropy=torch.cat(entropy),
        prompts=[prompts[i] for i in kept],
        dropped=dropped,
        lens_name=named,
    )
