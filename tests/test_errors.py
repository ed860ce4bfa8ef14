"""Bad input gets a clear error that names the problem, before any forward pass."""

import re

import builders
import pytest
import torch

import tl_logitlens as tll
from tl_logitlens.model_access import HookedTransformer, TransformerBridge

needs_bridge = pytest.mark.skipif(TransformerBridge is None, reason="TransformerBridge is 3.x/4.x only")
needs_hooked = pytest.mark.skipif(HookedTransformer is None, reason="HookedTransformer is 2.x/3.x only")


@pytest.fixture(scope="module")
def model():
    """A model with a word tokenizer (w0..w60), one token per word."""
    return builders.word_model()


@pytest.fixture(scope="module")
def bare():
    """A model with no tokenizer."""
    if HookedTransformer is not None:
        return builders.hooked("LN")
    from transformer_lens.config import TransformerBridgeConfig

    cfg = TransformerBridgeConfig(
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_head=8,
        d_mlp=48,
        d_vocab=builders.D_VOCAB,
        n_ctx=24,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
    )
    return TransformerBridge.boot_native(cfg).eval()


CountForwards = builders.CountForwards
raises_before_forward = builders.raises_before_forward


def test_answer_that_is_not_one_token_shows_its_tokenisation(model):
    raises_before_forward(
        model,
        tll.LensInputError,
        r"not a single token: it tokenises to 2 tokens \['w5', 'w6'\]",
        lambda: tll.direct_logit_attribution(model, "w3 w4", answers="w5 w6"),
    )
    raises_before_forward(
        model,
        tll.LensInputError,
        "target 'w7 w8' is not a single token",
        lambda: tll.logit_lens(model, "w3 w4", targets=["w3", "w7 w8"]),
    )


def test_answers_and_wrong_of_different_lengths(model):
    prompts = ["w3 w4", "w5 w6"]
    raises_before_forward(
        model,
        tll.LensInputError,
        "wrong lists 3 tokens but there are 2 prompts",
        lambda: tll.direct_logit_attribution(model, prompts, answers=["w3", "w4"], wrong=["w3", "w4", "w5"]),
    )
    raises_before_forward(
        model,
        tll.LensInputError,
        r"answer has shape \(3,\) but there are 2 prompts",
        lambda: tll.direct_logit_attribution(model, prompts, answers=torch.tensor([3, 4, 5])),
    )


def test_targets_out_of_vocabulary(model):
    raises_before_forward(
        model,
        tll.LensInputError,
        r"target id 999 is outside the vocabulary \[0, 61\)",
        lambda: tll.logit_lens(model, "w3 w4", targets=999),
    )
    raises_before_forward(
        model,
        tll.LensInputError,
        r"targets ids must lie in \[0, 61\)",
        lambda: tll.logit_lens(model, "w3 w4", targets=torch.tensor([70])),
    )
    raises_before_forward(
        model,
        tll.LensInputError,
        r"answer id -1 is outside the vocabulary",
        lambda: tll.direct_logit_attribution(model, "w3 w4", answers=-1),
    )


def test_positions_out_of_range(model):
    raises_before_forward(
        model,
        tll.LensInputError,
        "position 5 is out of range for prompt 0, which has 3 tokens",
        lambda: tll.logit_lens(model, "w3 w4", positions=5),
    )
    raises_before_forward(
        model,
        tll.LensInputError,
        "position -4 is out of range for prompt 1, which has 2 tokens",
        lambda: tll.direct_logit_attribution(model, ["w3 w4 w5", "w3"], answers="w3", positions=-4),
    )
    raises_before_forward(
        model,
        tll.LensInputError,
        "layer 7 is out of range",
        lambda: tll.logit_lens(model, "w3 w4", layers=[7]),
    )


def test_text_input_to_a_model_without_tokenizer(bare):
    raises_before_forward(
        bare,
        tll.LensInputError,
        "no tokenizer; pass token ids instead",
        lambda: tll.logit_lens(bare, "hello there"),
    )
    raises_before_forward(
        bare,
        tll.LensInputError,
        "no tokenizer",
        lambda: tll.direct_logit_attribution(bare, builders.tokens(), answers="hello"),
    )
    # ids work, and tokens decode as #id
    result = tll.logit_lens(bare, builders.tokens(), positions=-1, top_k=1)
    assert result.top_tokens()[0][0][0].startswith("#")


def test_cache_missing_hooks_names_them_and_the_fix(model):
    tokens = builders.tokens()
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: "resid" in name)
    with pytest.raises(tll.MissingHooksError, match=r"blocks\.0\.attn\.hook_z.*run_with_cache"):
        tll.direct_logit_attribution(cache=cache, answers=5, by="head")
    with pytest.raises(tll.MissingHooksError, match="hook_embed"):
        tll.residual_stack(cache, by="component")
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_resid_pre"))
    with pytest.raises(tll.MissingHooksError, match=r"blocks\.1\.hook_resid_post"):
        tll.logit_lens(cache=cache)


def test_model_in_training_mode(model):
    model.train()
    try:
        raises_before_forward(
            model, tll.ModelStateError, r"training mode.*model\.eval\(\)", lambda: tll.logit_lens(model, "w3 w4")
        )
        raises_before_forward(
            model,
            tll.ModelStateError,
            "training mode",
            lambda: tll.direct_logit_attribution(model, "w3 w4", answers="w5"),
        )
    finally:
        model.eval()


def test_non_finite_activations_are_refused():
    model = builders.hooked("LN", seed=5) if HookedTransformer is not None else builders.native_bridge("LN", seed=5)
    with torch.no_grad():
        model.blocks[1].attn.W_O[0, 0, 0] = float("nan")
    with pytest.raises(
        tll.NonFiniteActivationError, match=r"blocks\.1\.hook_resid_pre|blocks\.1\.hook_resid_post|NaN or inf"
    ):
        tll.logit_lens(model, builders.tokens())
    with pytest.raises(tll.NonFiniteActivationError, match="NaN or inf"):
        tll.direct_logit_attribution(model, builders.tokens(), answers=3, by="head")
    with pytest.raises(tll.NonFiniteActivationError, match="vectors holds 1 NaN"):
        tll.readout(model, torch.tensor([[float("nan")] + [0.0] * 31]))


def test_the_block_counter_sees_a_forward_pass(model):
    """The counter itself must see forward passes, or every test above could not fail."""
    with CountForwards(model) as counter:
        tll.logit_lens(model, "w3 w4")
        tll.direct_logit_attribution(model, "w3 w4", answers="w5")
    assert counter.calls == 2


def test_bad_modes_and_arguments(model):
    for kwargs, match in [
        ({"norm": "cashed"}, "norm must be one of"),
        ({"unembed": "W_X"}, "unembed must be one of"),
        ({"top_k": 0}, r"top_k must be an int in \[1, 61\]"),
        ({"chunk_size": 0}, "chunk_size must be a positive int"),
        ({"targets": "next", "cache": None, "input": None}, "pass an input to run"),
    ]:
        kwargs.setdefault("input", "w3 w4")
        raises_before_forward(model, tll.LensInputError, match, lambda: tll.logit_lens(model, **kwargs))
    raises_before_forward(
        model,
        tll.LensInputError,
        "by must be one of",
        lambda: tll.direct_logit_attribution(model, "w3", answers="w3", by="layers"),
    )
    with pytest.raises(tll.LensInputError, match="expected a transformer_lens HookedTransformer or TransformerBridge"):
        tll.logit_lens(torch.nn.Linear(2, 2), torch.tensor([[1, 2]]))
    with pytest.raises(tll.LensInputError, match=r"norm='cached' takes the scale from reference="):
        tll.readout(model, torch.zeros(2, 32), norm="cached")


def _boot(hf_model):
    from transformer_lens.model_bridge import TransformerBridge as Bridge

    path = builders.temp_dir("unsupported-")
    hf_model.save_pretrained(path)
    builders.word_tokenizer(builders.D_VOCAB).save_pretrained(path)
    return Bridge.boot_transformers(path, device="cpu").eval()


@needs_bridge
def test_encoder_decoder_is_refused():
    import transformers as tf

    t5 = _boot(
        tf.T5ForConditionalGeneration(
            tf.T5Config(
                vocab_size=builders.D_VOCAB,
                d_model=32,
                d_kv=8,
                d_ff=48,
                num_layers=1,
                num_heads=4,
                decoder_start_token_id=0,
            )
        )
    )
    raises_before_forward(
        t5, tll.UnsupportedModelError, "encoder-decoder", lambda: tll.logit_lens(t5, builders.tokens())
    )


@needs_bridge
def test_state_space_blocks_are_refused():
    import transformers as tf

    mamba = _boot(
        tf.MambaForCausalLM(
            tf.MambaConfig(vocab_size=builders.D_VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4)
        )
    )
    raises_before_forward(
        mamba,
        tll.UnsupportedModelError,
        "not an attention block",
        lambda: tll.direct_logit_attribution(mamba, builders.tokens(), answers=3),
    )


@needs_bridge
def test_soft_capped_logits_attribute_the_pre_cap_logit_and_the_lens_applies_the_cap():
    import transformers as tf

    gemma = _boot(
        tf.Gemma2ForCausalLM(
            tf.Gemma2Config(
                vocab_size=builders.D_VOCAB,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                final_logit_softcapping=5.0,
                max_position_embeddings=24,
            )
        )
    )
    tokens = builders.tokens()
    att = tll.direct_logit_attribution(gemma, tokens, answers=3, wrong=4, by="head")
    assert att.residual_error() <= 1e-4  # the pieces add up to the pre-cap logit difference, exactly
    assert att.logit_transform == "logit -> 5 * tanh(logit / 5) (a soft cap)"
    assert "of='logit difference before the soft cap'" in repr(att)
    with torch.no_grad():
        logits = gemma(tokens)[:, -1].double()
    torch.testing.assert_close(att.capped_value.double(), logits[:, 3] - logits[:, 4], atol=1e-5, rtol=1e-5)
    pre_cap = 5 * torch.atanh(logits / 5)
    torch.testing.assert_close(att.model_value.double(), pre_cap[:, 3] - pre_cap[:, 4], atol=1e-4, rtol=1e-4)
    result = tll.logit_lens(gemma, tokens, top_k=3)  # checks the final entry against the model itself
    with torch.no_grad():
        probs = torch.softmax(gemma(tokens).double(), -1)
    torch.testing.assert_close(result.top_probs[-1].double(), probs.topk(3, dim=-1).values, atol=1e-5, rtol=1e-4)


@needs_hooked
def test_soft_capped_hooked_transformer():
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=48,
        d_vocab=builders.D_VOCAB,
        n_ctx=24,
        act_fn="gelu",
        normalization_type="LN",
        output_logits_soft_cap=3.0,
        seed=0,
    )
    capped = HookedTransformer(cfg).eval()
    att = tll.direct_logit_attribution(capped, builders.tokens(), answers=3)
    assert att.residual_error() <= 1e-4 and att.logit_transform == "logit -> 3 * tanh(logit / 3) (a soft cap)"
    with torch.no_grad():
        logits = capped(builders.tokens())[:, -1, 3].double()
    torch.testing.assert_close(att.capped_value.double(), logits, atol=1e-5, rtol=1e-5)
    tll.logit_lens(capped, builders.tokens())  # the final-entry check passes with the cap applied


# -- issue 20: inputs whose errors confused ----------------------------------------------------------
def test_an_empty_list_input_says_it_is_empty(model):
    raises_before_forward(model, tll.LensInputError, "the input is an empty list", lambda: tll.logit_lens(model, []))
    raises_before_forward(model, tll.LensInputError, "the input is an empty tuple", lambda: tll.logit_lens(model, ()))


def test_a_mixed_list_names_the_bad_item_and_its_position(model):
    raises_before_forward(
        model,
        tll.LensInputError,
        r"input item 1 is 5 \(int\), but item 0 is 'w3': a list input holds only prompts \(strings\)",
        lambda: tll.logit_lens(model, ["w3", 5]),
    )
    raises_before_forward(
        model,
        tll.LensInputError,
        r"input item 2 is 'w4' \(str\), but item 0 is 3: a list input holds only token ids \(ints\)",
        lambda: tll.logit_lens(model, [3, 4, "w4"]),
    )


def test_an_attention_mask_of_the_wrong_shape_names_both_shapes(model):
    ids = torch.tensor([[1, 3, 4, 5], [1, 6, 7, 2]])
    for mask in (torch.ones(2, 3, dtype=torch.long), torch.ones(4, 2, dtype=torch.long)):  # the second: same size
        raises_before_forward(
            model,
            tll.LensInputError,
            re.escape(f"attention_mask has shape {tuple(mask.shape)} but its input_ids have shape (2, 4)"),
            lambda mask=mask: tll.evaluate_lens(model, [{"input_ids": ids, "attention_mask": mask}], progress=False),
        )
