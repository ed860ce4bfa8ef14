"""A family zoo: a tiny random model of every decoder-only family TransformerLens 4.3 boots.

Each family is built from its ``transformers`` config class offline (2 layers, widths of a
few dozen, a 61-word vocabulary), its norm weights and biases perturbed away from 1 and 0
(``builders.perturb_``), saved with the word-level tokenizer and booted with
``TransformerBridge.boot_transformers``. Models are built once per test session and their
folders kept in the session's temporary root.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import builders
import torch

D_VOCAB = builders.D_VOCAB

# The shape most families share: Llama's config names.
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


@dataclass
class Family:
    """One family: its config class, the arguments that make it tiny, and what makes it special."""

    name: str
    config: str
    kwargs: Dict[str, Any]
    quirk: str = ""
    experts: bool = False
    tags: List[str] = field(default_factory=list)


def _llama(**extra: Any) -> Dict[str, Any]:
    return {**_LLAMA, **extra}


FAMILIES: List[Family] = [
    Family("gpt2", "GPT2Config", _GPT2),
    Family("llama", "LlamaConfig", _llama()),
    Family("mistral", "MistralConfig", _llama(head_dim=8, sliding_window=16)),
    Family("qwen2", "Qwen2Config", _llama()),
    Family("qwen3", "Qwen3Config", _llama(head_dim=8)),
    Family("gemma", "GemmaConfig", _llama(head_dim=8), "scaled embedding, (1 + w) norms"),
    Family(
        "gemma2",
        "Gemma2Config",
        _llama(head_dim=8, query_pre_attn_scalar=8, sliding_window=16, final_logit_softcapping=3.0),
        "post-norms, logit soft cap",
    ),
    Family("gemma3", "Gemma3TextConfig", _llama(head_dim=8, query_pre_attn_scalar=8, sliding_window=16), "post-norms"),
    Family("phi3", "Phi3Config", _llama(original_max_position_embeddings=32)),
    Family("olmo2", "Olmo2Config", _llama(), "post-norms only"),
    Family(
        "granite",
        "GraniteConfig",
        _llama(embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=4.0, attention_multiplier=0.2),
        "embedding, residual and logit multipliers",
    ),
    Family("cohere", "CohereConfig", _llama(logit_scale=0.25), "logit scale, parallel blocks"),
    Family("stablelm", "StableLmConfig", _llama(use_qkv_bias=True)),
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
    ),
    Family("gptj", "GPTJConfig", {**_GPT2, "rotary_dim": 4}, "parallel blocks"),
    Family("bloom", "BloomConfig", dict(n_layer=2, hidden_size=32, n_head=4, vocab_size=D_VOCAB, bos_token_id=1)),
    Family(
        "falcon",
        "FalconConfig",
        dict(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            vocab_size=D_VOCAB,
            bos_token_id=1,
            eos_token_id=1,
            parallel_attn=True,
            new_decoder_architecture=False,
            multi_query=True,
        ),
        "parallel blocks",
    ),
    Family("gpt_bigcode", "GPTBigCodeConfig", {**_GPT2, "multi_query": True}),
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
            bos_token_id=1,
            eos_token_id=1,
        ),
        "parallel blocks",
    ),
    Family("mixtral", "MixtralConfig", _llama(head_dim=8, num_local_experts=4, num_experts_per_tok=2), experts=True),
    Family(
        "qwen2_moe",
        "Qwen2MoeConfig",
        _llama(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24),
        "shared expert",
        experts=True,
    ),
    Family("phi", "PhiConfig", _llama(), "parallel blocks, partial rotary"),
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
    ),
    Family("codegen", "CodeGenConfig", {**_GPT2, "rotary_dim": 4, "n_ctx": 32}),
    Family("olmo", "OlmoConfig", _llama()),
    Family("olmo3", "Olmo3Config", _llama(sliding_window=16)),
    Family("olmoe", "OlmoeConfig", _llama(num_experts=4, num_experts_per_tok=2), experts=True),
    Family(
        "qwen3_moe",
        "Qwen3MoeConfig",
        _llama(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
        experts=True,
    ),
    Family("starcoder2", "Starcoder2Config", _llama()),
    Family("nemotron", "NemotronConfig", _llama(head_dim=8)),
    Family("cohere2", "Cohere2Config", _llama(logit_scale=0.25, sliding_window=16)),
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
        experts=True,
    ),
    Family("phimoe", "PhimoeConfig", _llama(num_local_experts=4, num_experts_per_tok=2), experts=True),
    Family("smollm3", "SmolLM3Config", _llama()),
    Family("glm", "GlmConfig", _llama(head_dim=8)),
    Family("glm4", "Glm4Config", _llama(head_dim=8)),
    Family("exaone4", "Exaone4Config", _llama(sliding_window=16)),
    Family("seed_oss", "SeedOssConfig", _llama(head_dim=8)),
    Family("hunyuan_v1_dense", "HunYuanDenseV1Config", _llama(head_dim=8)),
    Family("ernie4_5", "Ernie4_5Config", _llama(head_dim=8)),
    Family("vaultgemma", "VaultGemmaConfig", _llama(head_dim=8, query_pre_attn_scalar=8, sliding_window=16)),
    Family("apertus", "ApertusConfig", _llama()),
    Family("arcee", "ArceeConfig", _llama(head_dim=8)),
    Family(
        "mpt",
        "MptConfig",
        dict(
            n_layers=2,
            d_model=32,
            n_heads=4,
            expansion_ratio=2,
            max_seq_len=32,
            vocab_size=D_VOCAB,
            bos_token_id=1,
            eos_token_id=1,
        ),
    ),
    Family(
        "gpt_oss",
        "GptOssConfig",
        _llama(head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=16),
        experts=True,
    ),
    Family("ministral3", "Ministral3Config", _llama(head_dim=8)),
    Family("ministral", "MinistralConfig", _llama(head_dim=8, sliding_window=16)),
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
            bos_token_id=1,
            eos_token_id=1,
            pad_token_id=2,
        ),
    ),
    Family(
        "deepseek_v3",
        "DeepseekV3Config",
        _llama(
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            n_shared_experts=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=4,
            v_head_dim=8,
            qk_nope_head_dim=4,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
        ),
        experts=True,
    ),
    Family(
        "deepseek_v2",
        "DeepseekV2Config",
        _llama(
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            n_shared_experts=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=4,
            v_head_dim=8,
            qk_nope_head_dim=4,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
        ),
        experts=True,
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
        experts=True,
    ),
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
    ),
    Family(
        "gemma4_per_layer",
        "Gemma4TextConfig",
        _llama(
            head_dim=8,
            global_head_dim=8,
            sliding_window=16,
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=D_VOCAB,
        ),
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
            bos_token_id=1,
            eos_token_id=1,
        ),
        experts=True,
    ),
    Family(
        "glm4_moe",
        "Glm4MoeConfig",
        _llama(
            head_dim=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
        ),
        experts=True,
    ),
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
        experts=True,
    ),
    Family(
        "minimax_m2",
        "MiniMaxM2Config",
        _llama(head_dim=8, num_local_experts=4, num_experts_per_tok=2, rotary_dim=4),
        experts=True,
    ),
]

_BUILT: Dict[str, str] = {}


def folder(family: Family, seed: int = 0) -> str:
    """The saved HF folder of ``family`` (built on first use)."""
    key = f"{family.name}-{seed}"
    if key not in _BUILT:
        import transformers as tf

        torch.manual_seed(seed)
        config = getattr(tf, family.config)(**family.kwargs)
        model = tf.AutoModelForCausalLM.from_config(config)
        builders.perturb_(model, seed)
        path = builders.temp_dir(f"zoo-{family.name}-")
        model.save_pretrained(path)
        builders.word_tokenizer(D_VOCAB).save_pretrained(path)
        _BUILT[key] = path
    return _BUILT[key]


def boot(family: Family, dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """``family`` booted with ``TransformerBridge.boot_transformers`` in ``dtype``, in eval mode."""
    return builders.TransformerBridge.boot_transformers(folder(family, seed), dtype=dtype, device="cpu").eval()


def by_name(name: str) -> Optional[Family]:
    return next((f for f in FAMILIES if f.name == name), None)
