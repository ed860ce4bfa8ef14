"""A tiny word-level transformer that has learned induction, shipped as package data.

The model sees prompts ``<bos> w_1 .. w_n w_1 .. w_n`` of random words and, on
the second repeat, predicts each next word almost perfectly. It learned induction
with an offset: layer-0 heads copy the word two back (``PREV_TOKEN_HEAD``, (0, 1))
and three back ((0, 0)) into each position, and the induction head in layer 1
(``INDUCTION_HEAD``) attends from the current word to the position three after
its earlier copy, whose stream holds both the matching word (three back) and the
answer, the word after the earlier copy (two back), which it copies to the
logits (``tests/test_source.py`` checks this path with attribution by source
position). On the first repeat nothing can be predicted, so it stays near chance. It has MLP
layers, untied embeddings and raw (unfolded) LayerNorm weights, which makes it
a small but realistic target for logit lens / direct logit attribution.

Weights (``demo_model.safetensors``, HookedTransformer state-dict naming) and
``demo_config.json`` (architecture, vocabulary, training metadata) are produced
by ``python -m tl_logitlens.demo.train``. Nothing here touches the network.

Shapes: vocabulary ``d_vocab`` = 83 (3 special tokens + 80 words), ``n_ctx`` = 64,
so prompts may hold up to 31 repeated words (``1 + 2n <= 64``).

Example:
    >>> from tl_logitlens.demo import demo_model, induction_prompt, INDUCTION_HEAD
    >>> model = demo_model()
    >>> tokens = induction_prompt(model, n=12, seed=0)  # [1, 25]
    >>> logits = model(tokens)                          # [1, 25, 83]
    >>> model.to_string(logits[0, -2].argmax()) == model.to_string(tokens[0, -1])
    True
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CONFIG_PATH",
    "INDUCTION_HEAD",
    "PREV_TOKEN_HEAD",
    "WEIGHTS_PATH",
    "build_tokenizer",
    "demo_config",
    "demo_model",
    "demo_state_dict",
    "demo_tokenizer",
    "induction_prompt",
    "repeated_tokens",
    "word_token_ids",
]

_DIR = Path(__file__).resolve().parent
WEIGHTS_PATH = _DIR / "demo_model.safetensors"
CONFIG_PATH = _DIR / "demo_config.json"

# (layer, head) found by the training script: zero-ablating this layer-1 head
# hurts induction most; of the layer-0 heads this one scores highest on the training
# script's look-back measure (it attends two tokens back; see the module docstring).
# tests/test_demo_model.py re-measures both against the shipped weights.
INDUCTION_HEAD: tuple[int, int] = (1, 2)
PREV_TOKEN_HEAD: tuple[int, int] = (0, 1)


def demo_config() -> dict[str, Any]:
    """Read ``demo_config.json``: architecture, vocabulary and training metadata.

    Returns a dict with keys ``"model"`` (HookedTransformerConfig-style fields:
    ``n_layers``, ``d_model``, ``n_heads``, ``d_head``, ``d_mlp``, ``n_ctx``,
    ``d_vocab``, ``act_fn``, ``normalization_type``, ``positional_embedding_type``),
    ``"vocab"`` (list of ``d_vocab`` token strings, index = token id),
    ``"special_tokens"`` and ``"training"`` (seed, steps, final loss, accuracy...).

    Example:
        >>> from tl_logitlens.demo import demo_config
        >>> cfg = demo_config()
        >>> len(cfg["vocab"]) == cfg["model"]["d_vocab"]
        True
    """
    with open(CONFIG_PATH, encoding="utf-8") as f:
        return json.load(f)


def demo_state_dict() -> dict[str, torch.Tensor]:
    """Load the trained weights in HookedTransformer state-dict naming.

    Keys/shapes (float32): ``embed.W_E`` [d_vocab, d_model], ``pos_embed.W_pos``
    [n_ctx, d_model], ``blocks.{l}.attn.W_Q/W_K/W_V`` [n_heads, d_model, d_head],
    ``blocks.{l}.attn.W_O`` [n_heads, d_head, d_model], ``b_Q/b_K/b_V``
    [n_heads, d_head], ``b_O`` [d_model], ``blocks.{l}.mlp.W_in`` [d_model, d_mlp],
    ``W_out`` [d_mlp, d_model], ``blocks.{l}.ln1/ln2.w/b``, ``ln_final.w/b``
    [d_model], ``unembed.W_U`` [d_model, d_vocab], ``unembed.b_U`` [d_vocab].

    Example:
        >>> from tl_logitlens.demo import demo_state_dict
        >>> demo_state_dict()["blocks.1.attn.W_Q"].shape
        torch.Size([4, 64, 16])
    """
    from safetensors.torch import load_file

    return load_file(str(WEIGHTS_PATH), device="cpu")


def build_tokenizer(vocab: list[str], special_tokens: dict[str, str] | None = None):
    """Build a whitespace word-level tokenizer from a vocabulary list, offline.

    Token id ``i`` is ``vocab[i]``. Encoding splits on whitespace, maps unknown
    words to ``<unk>`` and prepends ``<bos>`` (the tokenizer declares
    ``add_bos_token=True``, so TransformerLens uses it as-is rather than trying
    to re-download a BOS-adding variant). Decoding joins words with spaces.

    Args:
        vocab: token strings, index = id; must contain the special tokens.
        special_tokens: ``{"bos", "pad", "unk", "eos"}`` -> token string; defaults
            to ``<bos>``, ``<pad>``, ``<unk>`` with eos = bos (GPT-2 style, so no
            extra token is ever added to the vocabulary).

    Returns:
        ``transformers.PreTrainedTokenizerFast``.

    Example:
        >>> from tl_logitlens.demo import build_tokenizer
        >>> tok = build_tokenizer(["<pad>", "<bos>", "<unk>", "cat", "dog"])
        >>> tok("cat dog fish")["input_ids"]
        [1, 3, 4, 2]
        >>> tok.decode([3, 4])
        'cat dog'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = {"bos": "<bos>", "pad": "<pad>", "unk": "<unk>"}
    special.update(special_tokens or {})
    special.setdefault("eos", special["bos"])
    ids = {w: i for i, w in enumerate(vocab)}
    if len(ids) != len(vocab):
        raise ValueError("vocabulary contains duplicate tokens")
    missing = [t for t in special.values() if t not in ids]
    if missing:
        raise ValueError(f"special tokens {missing} are not in the vocabulary")

    core = Tokenizer(models.WordLevel(vocab=ids, unk_token=special["unk"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = special["bos"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, ids[bos])]
    )
    # WordPiece decoder = join with spaces; no word starts with "##".
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=special["eos"],
        pad_token=special["pad"],
        unk_token=special["unk"],
        add_bos_token=True,
        name_or_path="tl_logitlens-demo",
        model_input_names=["input_ids", "attention_mask"],
    )


def demo_tokenizer():
    """The demo model's tokenizer, built from the vocabulary in ``demo_config.json``.

    Example:
        >>> from tl_logitlens.demo import demo_tokenizer
        >>> demo_tokenizer().decode([demo_tokenizer().convert_tokens_to_ids("cat")])
        'cat'
    """
    cfg = demo_config()
    return build_tokenizer(cfg["vocab"], cfg.get("special_tokens"))


def demo_model():
    """Load the trained induction model, offline, on CPU, in eval mode.

    Returns a ``transformer_lens.HookedTransformer`` on transformer-lens 2.x/3.x
    and a native ``TransformerBridge`` on 4.x (where HookedTransformer is gone);
    both compute the same logits from the same weights. Weights are unfolded
    (raw LayerNorm scales). ``model(tokens)`` maps [batch, pos] token ids to
    [batch, pos, d_vocab] logits; ``model.to_tokens(text)`` prepends ``<bos>``.

    Example:
        >>> from tl_logitlens.demo import demo_model
        >>> model = demo_model()
        >>> tokens = model.to_tokens("red cat sun red cat")  # [1, 6]
        >>> model.to_string(model(tokens)[0, -1].argmax())
        'sun'
    """
    cfg = demo_config()
    arch = dict(cfg["model"])
    tokenizer = build_tokenizer(cfg["vocab"], cfg.get("special_tokens"))
    state_dict = demo_state_dict()

    from ..model_access import HookedTransformer, HookedTransformerConfig, TransformerBridge, TransformerBridgeConfig

    if HookedTransformer is not None:  # 2.x/3.x; 4.x has only TransformerBridge
        # init_weights=False: the random init would be overwritten anyway.
        # The weights were trained on the native bridge, whose RoPE rotates adjacent pairs
        # (2i, 2i+1); HookedTransformer's default rotates the two halves of each head.
        ht_cfg = HookedTransformerConfig(
            **arch, rotary_adjacent_pairs=True, default_prepend_bos=True, init_weights=False, device="cpu"
        )
        with warnings.catch_warnings():
            # 3.x warns that HookedTransformer is deprecated; that is expected here.
            warnings.simplefilter("ignore", DeprecationWarning)
            model = HookedTransformer(ht_cfg, tokenizer=tokenizer)
        result = model.load_state_dict(state_dict, strict=False)
        # HookedTransformer also has non-learned buffers (causal mask, IGNORE, rotary tables).
        buffers = (".mask", ".IGNORE", ".rotary_sin", ".rotary_cos")
        bad_missing = [k for k in result.missing_keys if not k.endswith(buffers)]
        if bad_missing or result.unexpected_keys:
            raise RuntimeError(
                f"demo weights do not match HookedTransformer: missing={bad_missing}, "
                f"unexpected={result.unexpected_keys}"
            )
    else:
        from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

        bridge_cfg = TransformerBridgeConfig(
            **arch, architecture="TransformerLensNative", init_weights=False, device="cpu"
        )
        model = TransformerBridge.boot_native(bridge_cfg, tokenizer=tokenizer)
        # Same path TL uses for legacy HookedTransformer checkpoints
        # (sources/tl_legacy.py): per-head property format -> nn.Linear layout.
        result = model.load_state_dict(convert_tl_checkpoint(state_dict, model.cfg), strict=True)
        if result.missing_keys or result.unexpected_keys:
            raise RuntimeError(
                f"demo weights do not match the native bridge: missing={result.missing_keys}, "
                f"unexpected={result.unexpected_keys}"
            )
    model.eval()
    return model


def word_token_ids(model_or_tokenizer) -> torch.Tensor:
    """Ids of the ordinary (non-special) word tokens, sorted ascending.

    Accepts a model with a ``.tokenizer`` or a tokenizer. Returns [n_words] int64.

    Example:
        >>> from tl_logitlens.demo import demo_tokenizer, word_token_ids
        >>> word_token_ids(demo_tokenizer()).shape
        torch.Size([80])
    """
    tok = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    special = set(tok.all_special_ids)
    return torch.tensor(sorted(i for i in tok.get_vocab().values() if i not in special))


def repeated_tokens(
    batch: int,
    n: int,
    word_ids: torch.Tensor,
    bos_id: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample ``batch`` prompts ``<bos> w_1..w_n w_1..w_n``, the training distribution.

    Words within one prompt are distinct (drawn without replacement), so every
    position of the second half has exactly one correct continuation.

    Args:
        batch: number of prompts.
        n: words per repeat; at most ``len(word_ids)``.
        word_ids: [n_words] candidate token ids (see ``word_token_ids``).
        bos_id: id written at position 0.
        generator: optional ``torch.Generator`` for reproducibility.

    Returns:
        [batch, 1 + 2n] int64 token ids.

    Example:
        >>> import torch
        >>> from tl_logitlens.demo import repeated_tokens
        >>> t = repeated_tokens(2, 3, torch.arange(3, 10), bos_id=1,
        ...                     generator=torch.Generator().manual_seed(0))
        >>> t.shape, bool((t[:, 1:4] == t[:, 4:]).all())
        (torch.Size([2, 7]), True)
    """
    if not 1 <= n <= len(word_ids):
        raise ValueError(f"n must be in [1, {len(word_ids)}], got {n}")
    # argsort of uniform noise = one random permutation per row, batched.
    noise = torch.rand(batch, len(word_ids), generator=generator)
    seq = word_ids[noise.argsort(dim=-1)[:, :n]]
    bos = torch.full((batch, 1), bos_id, dtype=torch.long)
    return torch.cat([bos, seq, seq], dim=1).long()


def induction_prompt(model, n: int = 12, seed: int = 0) -> torch.Tensor:
    """The canonical induction prompt: ``<bos>`` + n random distinct words, repeated.

    Deterministic in ``seed``. Positions ``n+1 .. 2n`` (the second repeat) are
    where induction works: the logits at position ``p`` there predict token
    ``p+1``.

    Args:
        model: the demo model (anything with ``.tokenizer`` and ``.cfg.n_ctx``).
        n: words per repeat, 1..31 so that ``1 + 2n <= n_ctx``.
        seed: seed for the word draw.

    Returns:
        [1, 1 + 2n] int64 token ids.

    Example:
        >>> from tl_logitlens.demo import demo_model, induction_prompt
        >>> model = demo_model()
        >>> tokens = induction_prompt(model, n=5, seed=1)
        >>> tokens.shape
        torch.Size([1, 11])
        >>> model.to_string(tokens[0, 1:6]) == model.to_string(tokens[0, 6:])
        True
    """
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if n_ctx is not None and 1 + 2 * n > n_ctx:
        raise ValueError(f"1 + 2n = {1 + 2 * n} exceeds the model's n_ctx = {n_ctx}")
    tok = model.tokenizer
    return repeated_tokens(
        1,
        n,
        word_token_ids(tok),
        bos_id=tok.bos_token_id,
        generator=torch.Generator().manual_seed(seed),
    )
