"""Offline model construction for the tests: every configuration the package must read exactly.

Random initialisation leaves norm weights at 1 and biases at 0, which hides folding
mistakes, so every model here has its norm weights, norm biases and output biases
perturbed before use. Nothing is downloaded: HF models are random and saved to a temp
directory with a small word-level tokenizer, then booted through TransformerBridge.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List

import torch

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError:
    HookedTransformer = None

try:
    from transformer_lens.model_bridge import TransformerBridge
except ImportError:
    TransformerBridge = None

D_VOCAB = 61
N_CTX = 24

# Every folder the tests write (tokenizers, saved HF models) lives here and goes at exit.
_ROOT = tempfile.mkdtemp(prefix="tll-tests-")
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


def temp_dir(prefix: str) -> str:
    """A fresh folder under the session's temporary root."""
    return tempfile.mkdtemp(prefix=prefix, dir=_ROOT)


def perturb_(module: torch.nn.Module, seed: int) -> None:
    """Move norm weights away from 1 and every bias away from 0, reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.split(".")[-1]
            is_norm = any(part in name for part in ("ln", "norm"))
            is_bias = leaf in ("b", "bias") or leaf.startswith("b_")
            if is_norm and not is_bias:
                p.mul_(1 + 0.4 * torch.randn(p.shape, generator=gen)).add_(0.1)
            elif is_bias:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def word_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer: ``<unk>`` 0, ``<bos>`` 1, ``<pad>`` 2, then words ``w3 .. w{n-1}``.

    Special tokens get their own spelling: a special token is matched inside words, so a
    bos spelled ``w1`` would split ``w10`` into ``w1`` + ``0``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<bos>": 1, "<pad>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<bos>", pad_token="<pad>"
    )
    # TransformerLens reloads tokenizers from their name_or_path, so give it one on disk.
    path = temp_dir("tok-")
    fast.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


# -- HookedTransformer (2.x, 3.x) ---------------------------------------------------------
def hooked(
    normalization="LN",
    fold=False,
    attn_only=False,
    gated=False,
    rotary=False,
    n_kv=None,
    tied=False,
    seed=0,
    tokenizer=False,
    dtype=torch.float32,
    device="cpu",
    n_devices=1,
) -> Any:
    cfg = HookedTransformerConfig(
        dtype=dtype,
        device=device,
        n_devices=n_devices,
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=None if attn_only else 48,
        d_vocab=D_VOCAB,
        n_ctx=N_CTX,
        act_fn="silu" if gated else "gelu",
        normalization_type=normalization,
        attn_only=attn_only,
        gated_mlp=gated,
        positional_embedding_type="rotary" if rotary else "standard",
        rotary_dim=8 if rotary else None,
        n_key_value_heads=n_kv,
        seed=seed,
        default_prepend_bos=True,
    )
    model = HookedTransformer(cfg, tokenizer=word_tokenizer(D_VOCAB) if tokenizer else None)
    perturb_(model, seed)
    if tied:
        with torch.no_grad():
            model.unembed.W_U.copy_(model.embed.W_E.T)
    if fold:
        model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
        if hasattr(model, "setup"):
            model.setup()
    return model.eval()


# -- TransformerBridge (3.x, 4.x) ---------------------------------------------------------
def native_bridge(normalization="LN", compat=False, seed=0) -> Any:
    from transformer_lens.config import TransformerBridgeConfig

    cfg = TransformerBridgeConfig(
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_head=8,
        d_mlp=48,
        d_vocab=D_VOCAB,
        n_ctx=N_CTX,
        act_fn="gelu",
        normalization_type=normalization,
        seed=seed,
    )
    bridge = TransformerBridge.boot_native(cfg, tokenizer=word_tokenizer(D_VOCAB))
    perturb_(bridge, seed)
    if compat:
        bridge.enable_compatibility_mode()
    return bridge.eval()


def hf_dir(kind: str, seed: int = 0, tied: bool = False) -> str:
    """A random ``transformers`` model of ``kind`` (gpt2, llama, neox) saved to a temp dir."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "gpt2":
        model = tf.GPT2LMHeadModel(
            tf.GPT2Config(
                n_layer=2,
                n_embd=32,
                n_head=4,
                vocab_size=D_VOCAB,
                n_positions=N_CTX,
                bos_token_id=1,
                eos_token_id=1,
                tie_word_embeddings=tied,
            )
        )
    elif kind == "llama":
        model = tf.LlamaForCausalLM(
            tf.LlamaConfig(
                num_hidden_layers=2,
                hidden_size=32,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=48,
                vocab_size=D_VOCAB,
                max_position_embeddings=N_CTX,
                tie_word_embeddings=tied,
                bos_token_id=1,
                eos_token_id=1,
                pad_token_id=2,
            )
        )
    elif kind == "neox":
        model = tf.GPTNeoXForCausalLM(
            tf.GPTNeoXConfig(
                num_hidden_layers=2,
                hidden_size=32,
                num_attention_heads=4,
                intermediate_size=48,
                vocab_size=D_VOCAB,
                max_position_embeddings=N_CTX,
                bos_token_id=1,
                eos_token_id=1,
                tie_word_embeddings=tied,
            )
        )
    else:
        raise ValueError(kind)
    perturb_(model, seed)
    path = temp_dir(f"{kind}-")
    model.save_pretrained(path)
    word_tokenizer(D_VOCAB).save_pretrained(path)
    return path


#: A two-layer Llama split over two GPUs: embeddings and layer 0 on the first, the rest on the second.
LLAMA_SPLIT = {
    "model.embed_tokens": 0,
    "model.rotary_emb": 0,
    "model.layers.0": 0,
    "model.layers.1": 1,
    "model.norm": 1,
    "lm_head": 1,
}


def hf_bridge(kind: str, compat=False, tied=False, seed=0, dtype=torch.float32, device="cpu", device_map=None) -> Any:
    where = {"device": device} if device_map is None else {"device_map": device_map}
    bridge = TransformerBridge.boot_transformers(hf_dir(kind, seed, tied), dtype=dtype, **where)
    if compat:
        bridge.enable_compatibility_mode()
    return bridge.eval()


def word_model(seed: int = 0) -> Any:
    """A model with the word tokenizer (``<unk>`` 0, ``<bos>`` 1, ``<pad>`` 2, ``w3 .. w60``; one
    token per word; context 24): a GPT-2 bridge on 3.x/4.x, a ``HookedTransformer`` on 2.x."""
    if TransformerBridge is not None:
        return hf_bridge("gpt2", seed=seed)
    return hooked("LN", tokenizer=True, seed=seed)


@dataclass
class Case:
    name: str
    build: Callable[[], Any]
    folded: bool = False
    hooked: bool = False


def cases() -> List[Case]:
    """Every configuration the installed transformer-lens can build."""
    out: List[Case] = []
    if HookedTransformer is not None:
        out += [
            Case("ht-ln", lambda: hooked("LN"), hooked=True),
            Case("ht-ln-folded", lambda: hooked("LN", fold=True), folded=True, hooked=True),
            Case("ht-rms", lambda: hooked("RMS"), hooked=True),
            Case("ht-rms-folded", lambda: hooked("RMS", fold=True), folded=True, hooked=True),
            Case("ht-nonorm", lambda: hooked(None), hooked=True),
            Case("ht-attn-only", lambda: hooked("LN", attn_only=True), hooked=True),
            Case("ht-gated-rotary-gqa", lambda: hooked("RMS", gated=True, rotary=True, n_kv=2), hooked=True),
            Case("ht-tied", lambda: hooked("LN", tied=True), hooked=True),
        ]
    if TransformerBridge is not None:
        out += [
            Case("native-ln", lambda: native_bridge("LN")),
            Case("native-ln-compat", lambda: native_bridge("LN", compat=True), folded=True),
            Case("native-rms", lambda: native_bridge("RMS")),
            Case("gpt2", lambda: hf_bridge("gpt2")),
            Case("gpt2-compat", lambda: hf_bridge("gpt2", compat=True), folded=True),
            Case("llama-gqa", lambda: hf_bridge("llama")),
            Case("llama-tied", lambda: hf_bridge("llama", tied=True)),
            Case("llama-compat", lambda: hf_bridge("llama", compat=True), folded=True),
            Case("neox", lambda: hf_bridge("neox")),
        ]
    return out


_SHORT = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64", torch.float32: "f32"}


def precision_cases(dtypes=(torch.bfloat16, torch.float16), device="cpu") -> List[Case]:
    """The precision grid: a GPT-2 bridge (LayerNorm), a Llama bridge (RMSNorm, grouped-query
    attention) and a folded HookedTransformer (2.x/3.x) in each of ``dtypes`` on ``device``."""
    out: List[Case] = []
    for dtype in dtypes:
        tag = _SHORT[dtype] + ("" if device == "cpu" else f"-{device}")
        if HookedTransformer is not None:
            out.append(
                Case(
                    f"ht-ln-folded-{tag}",
                    lambda d=dtype: hooked("LN", fold=True, dtype=d, device=device),
                    folded=True,
                    hooked=True,
                )
            )
            out.append(
                Case(
                    f"ht-rms-gqa-{tag}",
                    lambda d=dtype: hooked("RMS", gated=True, rotary=True, n_kv=2, dtype=d, device=device),
                    hooked=True,
                )
            )
        if TransformerBridge is not None:
            out.append(Case(f"gpt2-{tag}", lambda d=dtype: hf_bridge("gpt2", dtype=d, device=device)))
            out.append(Case(f"llama-gqa-{tag}", lambda d=dtype: hf_bridge("llama", dtype=d, device=device)))
    return out


_BUILT: Dict[str, Any] = {}


def build(case: Case) -> Any:
    """Build a case once per test session."""
    if case.name not in _BUILT:
        _BUILT[case.name] = case.build()
    return _BUILT[case.name]


def tokens(batch: int = 2, seq: int = 9, seed: int = 1) -> torch.Tensor:
    """Random token ids ``[batch, seq]`` starting with the bos id 1."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, D_VOCAB, (batch, seq), generator=gen)
    ids[:, 0] = 1
    return ids


# -- proving that errors come before the forward pass ----------------------------------------
class CountForwards:
    """Counts the forward passes started inside the block.

    The hook sits on the embedding (the first block of an encoder-decoder bridge), not on the
    model: ``TransformerBridge.run_with_cache``/``run_with_hooks`` never call the top
    module's own ``forward``, so a hook there counts nothing and a test built on it could not
    fail; and a pass that stops early (``evaluate_lens`` stops after the residual stream) has
    still started at the embedding.
    """

    def __init__(self, model):
        self.calls = 0
        first = getattr(model, "embed", None)
        if first is None:
            first = next(getattr(model, name)[0] for name in ("blocks", "encoder_blocks") if hasattr(model, name))
        self.handle = first.register_forward_pre_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def raises_before_forward(model, exc, match, fn):
    """``fn()`` raises ``exc`` matching ``match`` before any forward pass of ``model`` starts."""
    import pytest

    with CountForwards(model) as counter, pytest.raises(exc, match=match):
        fn()
    assert counter.calls == 0, "the error came after a forward pass"


# -- text a model writes itself ---------------------------------------------------------------
def sampled_tokens(model, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """``[n, length]`` token ids sampled (temperature 1) from ``model`` itself, each row starting at bos.

    Deterministic for a seed. A bridge samples through its Hugging Face model's ``generate`` without
    the key-value cache: the bridge's wrapped attention does not honour ``generate``'s cache, and
    text generated with it is garbage (on stories260k its own loss is 6.05 nats against an entropy
    of 1.80; test_real_models checks that loss and entropy agree). Anything else runs one full
    forward pass per token (keep ``length`` small). Text a model writes is text it predicts well:
    real-model tests use it as training and held-out data without shipping a corpus.
    """
    tokenizer = getattr(model, "tokenizer", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = torch.full((n, 1), 1 if bos is None else int(bos), dtype=torch.long)
    hf = getattr(model, "original_model", None)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hf is not None and hasattr(hf, "generate"):
            pad = getattr(tokenizer, "pad_token_id", None)
            out = hf.generate(
                ids,
                do_sample=True,
                top_k=0,
                max_length=length,
                min_length=length,
                pad_token_id=0 if pad is None else pad,
                use_cache=False,  # the bridge's attention ignores the cache: with it, the text is noise
            )
            return out.cpu()
        for _ in range(length - 1):
            probs = torch.softmax(model(ids)[:, -1].float(), -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1)], 1)
    return ids


def randomise_lens(lens: Any, seed: int = 0, scale: float = 0.3) -> Any:
    """Give a TunedLens seeded random translators (``A ~ scale / sqrt(d_model)``, ``b ~ scale``), in place."""
    g = torch.Generator().manual_seed(seed)
    d = lens.d_model
    with torch.no_grad():
        for layer in lens.translators.values():
            layer.weight.copy_(scale * torch.randn(d, d, generator=g) / d**0.5)
            layer.bias.copy_(scale * torch.randn(d, generator=g))
    return lens


# -- a vision-language model (LLaVA) -----------------------------------------------------------
#: The tiny LLaVA's image token, its images' side in pixels, and the tokens one image fills
#: ((8 / 4) ** 2 patches; the "default" strategy drops the vision tower's class token).
LLAVA_IMAGE_ID = 3
LLAVA_IMAGE_SIZE = 8
LLAVA_TOKENS_PER_IMAGE = 4

# Booting a multimodal model whose processor fails to load makes transformer-lens 4.3 run
# `pip install torchvision`, which would replace torch: every boot here runs with no index, no
# pip configuration (its find-links and extra indexes) and no links, so that pip finds nothing.
OFFLINE_PIP = {"PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "UV_OFFLINE": "1"}


def _special_tokenizer(specials: Dict[str, int]) -> Any:
    """The word tokenizer of the vision-language models: ``<unk>`` 0, ``<bos>`` 1, ``<pad>`` 2, the
    ``specials`` at their ids (each one token, never split), the other ids words ``w{i}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    taken = {0: "<unk>", 1: "<bos>", 2: "<pad>", **{i: text for text, i in specials.items()}}
    vocab = {taken.get(i, f"w{i}"): i for i in range(D_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<bos>", pad_token="<pad>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
    return tokenizer


def boot_offline(path: str, dtype=torch.float32) -> Any:
    """``TransformerBridge.boot_transformers(path)`` with pip unable to install anything (:data:`OFFLINE_PIP`)."""
    from unittest import mock

    with mock.patch.dict(os.environ, OFFLINE_PIP):
        return TransformerBridge.boot_transformers(path, device="cpu", dtype=dtype).eval()


def llava_dir(seed: int = 0) -> str:
    """A random tiny ``LlavaForConditionalGeneration`` (CLIP tower 2 layers, Llama text 2 layers, d_model 32)
    saved with a word tokenizer that has ``<image>`` (id 3) and a ``LlavaProcessor`` that needs no torchvision.

    Vocabulary: ``<unk>`` 0, ``<bos>`` 1, ``<pad>`` 2, ``<image>`` 3, ``w4 .. w60``.
    """
    import transformers as tf

    tokenizer = _special_tokenizer({"<image>": LLAVA_IMAGE_ID})
    torch.manual_seed(seed)
    config = tf.LlavaConfig(
        text_config=tf.LlamaConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            vocab_size=D_VOCAB,
            max_position_embeddings=N_CTX,
            bos_token_id=1,
            eos_token_id=1,
            pad_token_id=2,
        ),
        vision_config=tf.CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=LLAVA_IMAGE_SIZE,
            patch_size=4,
        ),
        image_token_index=LLAVA_IMAGE_ID,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = tf.LlavaForConditionalGeneration(config)
    perturb_(model, seed)
    path = temp_dir("llava-")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    try:  # transformers 5 names the PIL-backed processor apart; older ones have only this one
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor
    side = {"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE}
    processor = tf.LlavaProcessor(
        image_processor=ImageProcessor(size={"shortest_edge": LLAVA_IMAGE_SIZE}, crop_size=side),
        tokenizer=tokenizer,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    processor.save_pretrained(path)
    return path


def llava_bridge(seed: int = 0, dtype=torch.float32) -> Any:
    """The tiny LLaVA of :func:`llava_dir` booted through ``TransformerBridge`` (pip kept offline)."""
    return boot_offline(llava_dir(seed), dtype)


#: The tiny Gemma 3's image token (Gemma's spelling), and its image's start and end tokens.
GEMMA3_IMAGE_ID, GEMMA3_BOI_ID, GEMMA3_EOI_ID = 3, 4, 5


def gemma3_vl_bridge(seed: int = 0) -> Any:
    """A random tiny ``Gemma3ForConditionalGeneration`` (SigLIP tower 2 layers, 4 tokens per image; text
    model 2 layers, d_model 32, post-norms), saved without a processor and booted with pip offline.

    Vocabulary: ``<unk>`` 0, ``<bos>`` 1, ``<pad>`` 2, ``<image_soft_token>`` 3, ``<start_of_image>`` 4,
    ``<end_of_image>`` 5, ``w6 .. w60``.
    """
    import transformers as tf

    tokenizer = _special_tokenizer(
        {"<image_soft_token>": GEMMA3_IMAGE_ID, "<start_of_image>": GEMMA3_BOI_ID, "<end_of_image>": GEMMA3_EOI_ID}
    )
    torch.manual_seed(seed)
    text = tf.Gemma3TextConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        head_dim=8,
        vocab_size=D_VOCAB,
        max_position_embeddings=N_CTX,
        sliding_window=8,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=2,
    )
    vision = tf.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8, patch_size=2
    )
    config = tf.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=LLAVA_TOKENS_PER_IMAGE,
        image_token_index=GEMMA3_IMAGE_ID,
        boi_token_index=GEMMA3_BOI_ID,
        eoi_token_index=GEMMA3_EOI_ID,
    )
    model = tf.Gemma3ForConditionalGeneration(config)
    perturb_(model, seed)
    with torch.no_grad():  # the projector's weight starts at zero: every image would be the zero vector
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        projection.copy_(torch.randn(projection.shape, generator=torch.Generator().manual_seed(seed)))
    path = temp_dir("gemma3-vl-")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return boot_offline(path)


def llava_prompt(batch: int = 2, seed: int = 1) -> torch.Tensor:
    """``[batch, 10]`` ids: ``<bos> w w <image> x4 w w`` (the image in the middle), then random words."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, D_VOCAB, (batch, 10), generator=gen)
    ids[:, 0] = 1
    ids[:, 3 : 3 + LLAVA_TOKENS_PER_IMAGE] = LLAVA_IMAGE_ID
    return ids


def llava_images(n: int = 2, seed: int = 2) -> torch.Tensor:
    """``[n, 3, 8, 8]`` random pixel values (what the processor would make of ``n`` images)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE, generator=gen)
