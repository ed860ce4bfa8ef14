"""A family zoo: a tiny random model of every decoder-only family TransformerLens 4.3 boots.

Each family is built from its ``transformers`` config class offline (2 layers, widths of a few dozen,
the 61-word vocabulary of ``builders``), its norm weights and biases perturbed away from 1 and 0
(``builders.perturb_``), saved with the word-level tokenizer and booted with
``TransformerBridge.boot_transformers``. Folders are built once per test session (in the session's
temporary root); a model is booted once per session and dtype.

Each :class:`Family` says what makes it special (``quirk``) and what the package refuses on it, with
the words the refusal must name (``refuses``): a refusal that names a false cause is a failure.
Families that TransformerLens 4.3 lists but cannot run offline are recorded in :data:`NOT_BOOTED`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import builders
import torch

D_VOCAB = builders.D_VOCAB

# The shape most families share, in Llama's config names.
_LLAMA = dict(
    num_hidden_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    vocab_size=D_VOCAB,
    max_position_embeddings=32,
    bos_token_id=1,
    eos_token_id=1,
    pad_token_id=2,
    tie_word_embeddings=False,
)
_GPT2 = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=D_VOCAB, n_positions=32, bos_token_id=1, eos_token_id=1)
_DEEPSEEK = dict(
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
)
_MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=4)


def _llama(**extra: Any) -> Dict[str, Any]:
    return {**_LLAMA, **extra}


@dataclass
class Family:
    """One family: its config class, the arguments that make it tiny, what makes it special, what is refused.

    ``refuses`` maps an attribution kind (``"component"``, ``"head"``, ``"neuron"``) to words its
    refusal must contain; ``hand_experts``: the expert layers have an independent reference
    (``reference.expert_pieces``).
    """

    name: str
    config: str
    kwargs: Dict[str, Any]
    quirk: str = ""
    refuses: Dict[str, str] = field(default_factory=dict)
    hand_experts: bool = False


FAMILIES: List[Family] = [
    Family("gpt2", "GPT2Config", _GPT2, "LayerNorm, learned positions"),
    Family("llama", "LlamaConfig", _llama(), "RMSNorm, rotary, grouped-query attention"),
    Family("mistral", "MistralConfig", _llama(head_dim=8, sliding_window=16), "sliding window"),
    Family("qwen2", "Qwen2Config", _llama(), "attention biases"),
    Family("qwen3", "Qwen3Config", _llama(head_dim=8), "q/k norms"),
    Family("gemma", "GemmaConfig", _llama(head_dim=8), "scaled embedding, (1 + w) norms"),
    Family(
        "gemma2",
        "Gemma2Config",
        _llama(head_dim=8, query_pre_attn_scalar=8, sliding_window=16, final_logit_softcapping=3.0),
        "post-norms, a logit soft cap",
    ),
    Family("gemma3", "Gemma3TextConfig", _llama(head_dim=8, query_pre_attn_scalar=8, sliding_window=16), "post-norms"),
    Family(
        "gemma4",
        "Gemma4TextConfig",
        _llama(
            head_dim=8,
            global_head_dim=8,
            sliding_window=16,
            hidden_size_per_layer_input=0,
            vocab_size_per_layer_input=D_VOCAB,
        ),
        "post-norms, v-norms",
    ),
    Family(
        "gemma4_per_layer_inputs",
        "Gemma4TextConfig",
        _llama(
            head_dim=8,
            global_head_dim=8,
            sliding_window=16,
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=D_VOCAB,
        ),
        "per-layer inputs added to the stream",
        refuses={kind: "per_layer_input_gate" for kind in ("component", "head", "neuron")},
    ),
    Family("vaultgemma", "VaultGemmaConfig", _llama(head_dim=8, query_pre_attn_scalar=8), "(1 + w) norms, soft cap"),
    Family("phi", "PhiConfig", _llama(), "parallel blocks, partial rotary"),
    Family("phi3", "Phi3Config", _llama(original_max_position_embeddings=32), "fused qkv and gate-up"),
    Family("olmo", "OlmoConfig", _llama(), "LayerNorm without parameters"),
    Family("olmo2", "Olmo2Config", _llama(), "post-norms only"),
    Family("olmo3", "Olmo3Config", _llama(sliding_window=16), "post-norms only, sliding window"),
    Family(
        "granite",
        "GraniteConfig",
        _llama(embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=4.0, attention_multiplier=0.2),
        "embedding, residual and logit multipliers",
    ),
    Family("cohere", "CohereConfig", _llama(logit_scale=0.25), "a logit scale, parallel blocks"),
    Family("cohere2", "Cohere2Config", _llama(logit_scale=0.25, sliding_window=16), "a logit scale, parallel blocks"),
    Family("stablelm", "StableLmConfig", _llama(use_qkv_bias=True), "LayerNorm, partial rotary"),
    Family("starcoder2", "Starcoder2Config", _llama(), "LayerNorm, biases"),
    Family("nemotron", "NemotronConfig", _llama(head_dim=8), "LayerNorm with (1 + w)"),
    Family("smollm3", "SmolLM3Config", _llama(), "layers without rotary"),
    Family("glm", "GlmConfig", _llama(head_dim=8), "partial rotary"),
    Family("glm4", "Glm4Config", _llama(head_dim=8), "post-norms"),
    Family("exaone4", "Exaone4Config", _llama(sliding_window=16), "post-norms only"),
    Family("seed_oss", "SeedOssConfig", _llama(head_dim=8), "attention biases"),
    Family("hunyuan_v1_dense", "HunYuanDenseV1Config", _llama(head_dim=8), "q/k norms"),
    Family("ernie4_5", "Ernie4_5Config", _llama(head_dim=8)),
    Family("apertus", "ApertusConfig", _llama(), "xIELU activation"),
    Family("arcee", "ArceeConfig", _llama(head_dim=8), "ungated MLP"),
    Family("ministral3", "Ministral3Config", _llama(head_dim=8)),
    Family(
        "opt",
        "OPTConfig",
        dict(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            ffn_dim=48,
            word_embed_proj_dim=32,
            vocab_size=D_VOCAB,
            max_position_embeddings=32,
            bos_token_id=1,
            eos_token_id=1,
            pad_token_id=2,
        ),
        "learned positions with an offset",
    ),
    Family("gptj", "GPTJConfig", {**_GPT2, "rotary_dim": 4}, "parallel blocks"),
    Family(
        "gpt_neo",
        "GPTNeoConfig",
        dict(
            num_layers=2,
            hidden_size=32,
            num_heads=4,
            intermediate_size=48,
            vocab_size=D_VOCAB,
            max_position_embeddings=32,
            attention_types=[[["global", "local"], 1]],
            window_size=4,
            bos_token_id=1,
            eos_token_id=1,
        ),
        "local attention",
    ),
    Family("bloom", "BloomConfig", dict(n_layer=2, hidden_size=32, n_head=4, vocab_size=D_VOCAB), "ALiBi"),
    Family(
        "falcon",
        "FalconConfig",
        dict(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            vocab_size=D_VOCAB,
            parallel_attn=True,
            new_decoder_architecture=False,
            multi_query=True,
        ),
        "parallel blocks, multi-query",
    ),
    Family("gpt_bigcode", "GPTBigCodeConfig", {**_GPT2, "multi_query": True}, "multi-query attention"),
    Family(
        "gpt_neox",
        "GPTNeoXConfig",
        dict(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=48,
            vocab_size=D_VOCAB,
            max_position_embeddings=32,
        ),
        "parallel blocks",
    ),
    Family(
        "mpt",
        "MptConfig",
        dict(n_layers=2, d_model=32, n_heads=4, expansion_ratio=2, max_seq_len=32, vocab_size=D_VOCAB),
        "ALiBi, no biases",
    ),
    Family(
        "xglm",
        "XGLMConfig",
        dict(
            num_layers=2,
            d_model=32,
            attention_heads=4,
            ffn_dim=48,
            vocab_size=D_VOCAB,
            max_position_embeddings=32,
            pad_token_id=2,
        ),
        "sinusoidal positions without a hook",
    ),
    Family(
        "mixtral",
        "MixtralConfig",
        _llama(head_dim=8, num_local_experts=4, num_experts_per_tok=2),
        "experts",
        hand_experts=True,
    ),
    Family(
        "qwen2_moe",
        "Qwen2MoeConfig",
        _llama(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24),
        "experts and a gated shared expert",
        hand_experts=True,
    ),
    Family("olmoe", "OlmoeConfig", _llama(num_experts=4, num_experts_per_tok=2), "experts"),
    Family(
        "qwen3_moe",
        "Qwen3MoeConfig",
        _llama(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
        "experts",
    ),
    Family(
        "granitemoe",
        "GraniteMoeConfig",
        _llama(
            embedding_multiplier=3.0,
            residual_multiplier=0.5,
            logits_scaling=4.0,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
        "experts, multipliers",
    ),
    Family(
        "gpt_oss",
        "GptOssConfig",
        _llama(head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=16),
        "experts with biases, attention sinks",
    ),
    Family("deepseek_v2", "DeepseekV2Config", _llama(**_DEEPSEEK, **_MLA), "latent attention, shared experts"),
    Family("deepseek_v3", "DeepseekV3Config", _llama(**_DEEPSEEK, **_MLA), "latent attention, shared experts"),
    Family("glm4_moe", "Glm4MoeConfig", _llama(head_dim=8, **_DEEPSEEK), "shared experts"),
    Family(
        "ernie4_5_moe",
        "Ernie4_5_MoeConfig",
        _llama(
            head_dim=8,
            moe_num_experts=4,
            moe_k=2,
            moe_intermediate_size=16,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
        ),
        "shared experts",
    ),
    Family(
        "minimax_m2",
        "MiniMaxM2Config",
        _llama(head_dim=8, num_local_experts=4, num_experts_per_tok=2, rotary_dim=4),
        "experts",
    ),
    Family(
        "llama4",
        "Llama4TextConfig",
        _llama(
            head_dim=8,
            intermediate_size_mlp=48,
            num_local_experts=4,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,
            attention_chunk_size=16,
        ),
        "experts fed router-scaled inputs",
        refuses={"neuron": "not called with the router's expert indices and weights"},
    ),
    Family(
        "jetmoe",
        "JetMoeConfig",
        dict(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            kv_channels=8,
            num_key_value_heads=2,
            intermediate_size=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            vocab_size=D_VOCAB,
            max_position_embeddings=32,
        ),
        "mixture of attention heads and of MLPs",
        refuses={"head": "gives no per-head output weights W_O", "neuron": "its experts are not one `experts` module"},
    ),
]

#: Families TransformerLens 4.3 lists that cannot be exercised here, and why.
NOT_BOOTED: Dict[str, str] = {
    "codegen": "TransformerLens 4.3's CodeGen bridge fails in its own forward pass (CodeGenAttention has no "
    "embed_positions)",
    "phimoe": "transformers' PhimoeForCausalLM is not registered with TransformerLens 4.3's adapter factory",
    "ministral": "transformers' MinistralForCausalLM is not registered with TransformerLens 4.3's adapter factory",
}

_FOLDERS: Dict[Tuple[str, int], str] = {}
_MODELS: Dict[Tuple[str, torch.dtype, str], Any] = {}


def folder(family: Family, seed: int = 0) -> str:
    """The saved HF folder of ``family`` (built on first use)."""
    key = (family.name, seed)
    if key not in _FOLDERS:
        import transformers as tf

        torch.manual_seed(seed)
        config = getattr(tf, family.config)(**family.kwargs)
        model = tf.AutoModelForCausalLM.from_config(config)
        builders.perturb_(model, seed)
        path = builders.temp_dir(f"zoo-{family.name}-")
        model.save_pretrained(path)
        builders.word_tokenizer(D_VOCAB).save_pretrained(path)
        _FOLDERS[key] = path
    return _FOLDERS[key]


def model(family: Family, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """``family`` booted with ``TransformerBridge.boot_transformers`` in ``dtype`` on ``device``, in eval mode
    (once per session, dtype and device)."""
    key = (family.name, dtype, device)
    if key not in _MODELS:
        path = folder(family)
        _MODELS[key] = builders.TransformerBridge.boot_transformers(path, dtype=dtype, device=device).eval()
    return _MODELS[key]


def by_name(name: str) -> Optional[Family]:
    return next((f for f in FAMILIES if f.name == name), None)
