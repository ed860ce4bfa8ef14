"""What families do to the stream and the logits, read exactly, and the guards around each reading.

The zoo (tests/test_zoo.py) checks every family against independent references; these tests pin the
mechanisms one by one: linear logit scales and soft caps, post-norms, expert layers, and the refusals
that name the real cause when a family does something the package cannot read.
"""

from __future__ import annotations

import re

import builders
import pytest
import torch
import zoo
from builders import raises_before_forward

import tl_logitlens as tll
from tl_logitlens.model_access import TL_MAJOR, TransformerBridge, view

needs_bridge = pytest.mark.skipif(
    TransformerBridge is None or TL_MAJOR < 4, reason="the zoo's families boot through TransformerLens 4.x's bridge"
)
TOKENS = builders.tokens(batch=2, seq=7, seed=2)
ANSWERS = torch.tensor([5, 9])
WRONG = torch.tensor([7, 30])


def _family(name):
    return zoo.model(zoo.by_name(name))


# -- logits: linear scales are folded, soft caps attributed before the cap, anything else refused -----------------


@needs_bridge
@pytest.mark.parametrize(
    "name, description",
    [
        ("granite", "logit -> 0.25 * logit (a linear scale)"),  # logits_scaling 4: the model divides
        ("cohere", "logit -> 0.25 * logit (a linear scale)"),  # logit_scale 0.25: the model multiplies
        ("gemma2", "logit -> 3 * tanh(logit / 3) (a soft cap)"),
        ("llama", "none"),
    ],
)
def test_logit_transforms_are_recognised_for_what_they_are(name, description):
    transform = view(_family(name)).logit_transform
    assert transform.describe() == description
    assert transform.opaque is None


@needs_bridge
def test_a_linear_logit_scale_is_folded_exactly_not_refused():
    model = _family("granite")
    att = tll.direct_logit_attribution(model, TOKENS, answers=ANSWERS, wrong=WRONG, by="neuron")
    with torch.no_grad():
        logits = model(TOKENS)[:, -1]
    rows = torch.arange(2)
    torch.testing.assert_close(att.model_value, logits[rows, ANSWERS] - logits[rows, WRONG], atol=1e-5, rtol=1e-5)
    assert att.residual_error() <= 1e-5 and att.logit_transform is None and att.capped_value is None


@needs_bridge
def test_a_transform_of_another_shape_is_refused_by_name(monkeypatch):
    model = _family("granite")
    adapter = type(model.adapter)
    monkeypatch.setattr(adapter, "apply_output_logits_transform", lambda self, logits: logits + 0.01 * logits**2)
    assert view(model).logit_transform.opaque is not None
    raises_before_forward(
        model,
        tll.UnsupportedModelError,
        r"GraniteArchitectureAdapter\.apply_output_logits_transform \(neither a linear scale nor a soft cap\)",
        lambda: tll.direct_logit_attribution(model, TOKENS, answers=ANSWERS),
    )


# -- post-norms --------------------------------------------------------------------------------------------------


@needs_bridge
def test_a_post_norm_that_is_not_the_norm_it_claims_is_refused_before_the_forward_pass(monkeypatch):
    model = _family("gemma3")
    inner = model.blocks[1].ln2_post.original_component
    forward = inner.forward
    monkeypatch.setattr(inner, "forward", lambda x: 2 * forward(x))
    raises_before_forward(
        model,
        tll.UnsupportedModelError,
        r"blocks\.1\.ln2_post \(Gemma3RMSNorm\) does not behave as a RMS norm",
        lambda: tll.direct_logit_attribution(model, TOKENS, answers=ANSWERS, by="neuron"),
    )
    tll.direct_logit_attribution(model, TOKENS, answers=ANSWERS, by="component")  # reads the writes as they are


@needs_bridge
@pytest.mark.parametrize("name", ["gemma3", "olmo2"])
def test_post_norm_pieces_are_read_at_the_forward_pass_scale(name):
    """A head's piece is its raw write scaled by the post-norm's own scale at that position: the pieces of one
    layer, summed, are the normalised write, and not the norm of their sum read piece by piece."""
    model = _family(name)
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
    heads = tll.residual_stack(cache, by="head", positions=-1)
    rows = [i for i, label in enumerate(heads.labels) if re.fullmatch(r"L0H\d+|0_attn(_norm)?_bias", label)]
    torch.testing.assert_close(heads.values[rows].sum(0), cache["blocks.0.hook_attn_out"][:, -1], atol=1e-5, rtol=0)
    raw = cache["blocks.0.ln1_post.hook_in"][:, -1]  # the attention output before its post-norm
    assert not torch.allclose(heads.values[rows].sum(0), raw, atol=1e-2)


# -- expert layers -----------------------------------------------------------------------------------------------


@needs_bridge
def test_expert_neurons_are_labelled_by_layer_expert_and_neuron():
    model = _family("qwen2_moe")
    att = tll.direct_logit_attribution(model, TOKENS, answers=ANSWERS, wrong=WRONG, by="neuron")
    assert "L1E3N15" in att.labels and "L1SN23" in att.labels and "L1E0N0" in att.labels
    assert not any(label.startswith("L1N") for label in att.labels)  # no dense neurons in an expert layer
    top = att.top(5)
    assert len(top) == 5 and all(re.fullmatch(r"L\d+(E\d+|S)N\d+", label) for label, _ in top)


@needs_bridge
def test_unpicked_experts_contribute_nothing():
    model = _family("mixtral")
    att = tll.direct_logit_attribution(model, TOKENS[:1], answers=5, by="neuron")
    per_expert = att.values[:, 0].new_zeros(2, 4)
    for i, label in enumerate(att.labels):
        match = re.fullmatch(r"L(\d)E(\d)N\d+", label)
        if match:
            per_expert[int(match[1]), int(match[2])] += att.values[i, 0].abs()
    assert bool(((per_expert > 0).sum(1) == 2).all())  # two experts per token (num_experts_per_tok)


@needs_bridge
def test_expert_neurons_read_from_a_cache_alone_are_the_same():
    model = _family("mixtral")
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
    ran = tll.direct_logit_attribution(model, TOKENS, answers=ANSWERS, wrong=WRONG, by="neuron")
    read = tll.direct_logit_attribution(cache=cache, answers=ANSWERS, wrong=WRONG, by="neuron")
    assert read.labels == ran.labels
    torch.testing.assert_close(read.values, ran.values, atol=1e-6, rtol=0)


@needs_bridge
def test_an_expert_block_that_normalises_each_expert_is_refused(monkeypatch):
    model = _family("mixtral")
    experts = model.blocks[0].mlp.original_component.experts
    monkeypatch.setattr(experts, "has_post_expert_norm", True, raising=False)
    raises_before_forward(
        model,
        tll.UnsupportedModelError,
        r"layer 0's expert block \(MixtralSparseMoeBlock\) cannot be split .* passes through a norm",
        lambda: tll.direct_logit_attribution(model, TOKENS, answers=ANSWERS, by="neuron"),
    )


# -- refusals name the real cause --------------------------------------------------------------------------------


@needs_bridge
def test_a_stream_the_pieces_miss_is_refused_without_a_false_cause():
    model = _family("llama")
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
    name = "blocks.1.hook_resid_post"
    cache.cache_dict[name] = cache.cache_dict[name].clone()
    cache.cache_dict[name][:, -1, 3] += 5.0
    with pytest.raises(tll.UnsupportedModelError) as caught:
        tll.direct_logit_attribution(cache=cache, answers=ANSWERS, by="head")
    message = str(caught.value)
    assert "each head and attention output bias" in message and "in some other way" in message
    assert "scaled embedding" not in message and "soft" not in message


# -- readout's next_tokens ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "next_tokens, words",
    [
        (torch.tensor([3.9, 5.2, 7.0]), "floats are not truncated"),
        ([3.9, 5, 7], "got 3.9 in the list"),
        ([-5, -1, 3], "next_tokens holds -5: .*only -1 means 'no next token'"),
        (torch.tensor([3, True, 5]).bool(), "dtype torch.bool"),
        (torch.tensor([3, 10_000, 5]), "next_tokens holds 10000"),
        ("3 4 5", "got str"),
    ],
)
def test_readout_refuses_next_tokens_that_are_not_token_ids(next_tokens, words):
    model = tll.demo_model()
    vectors = torch.randn(3, model.cfg.d_model)
    with pytest.raises(tll.LensInputError, match=words):
        tll.readout(model, vectors, next_tokens=next_tokens)


def test_readout_takes_next_tokens_as_a_list_with_minus_one_for_none():
    model = tll.demo_model()
    vectors = torch.randn(3, model.cfg.d_model)
    listed = tll.readout(model, vectors, next_tokens=[3, -1, 4])
    tensor = tll.readout(model, vectors, next_tokens=torch.tensor([3, -1, 4]))
    torch.testing.assert_close(listed.next_token_loss, tensor.next_token_loss, equal_nan=True)
    assert bool(torch.isnan(listed.next_token_loss[1]))


@needs_bridge
def test_an_expert_block_that_adds_what_its_experts_do_not_write_is_refused(monkeypatch):
    model = _family("mixtral")
    block = model.blocks[1].mlp.original_component
    forward = block.forward
    monkeypatch.setattr(block, "forward", lambda hidden: 1.5 * forward(hidden))  # a scale after the experts
    with pytest.raises(tll.UnsupportedModelError, match=r"MixtralSparseMoeBlock's experts do not add up to what"):
        tll.direct_logit_attribution(model, TOKENS, answers=ANSWERS, by="neuron")
    tll.direct_logit_attribution(model, TOKENS, answers=ANSWERS, by="component")  # reads the block's write


@needs_bridge
def test_a_stream_multiplied_by_a_layer_scalar_is_refused_naming_it():
    model = _family("gemma4")
    scalar = model.blocks[0].original_component.layer_scalar  # a buffer: changed in place, put back after
    try:
        with torch.no_grad():
            scalar.fill_(0.5)
        with pytest.raises(tll.UnsupportedModelError, match=r"layer_scalar=0\.5 \(it multiplies the whole stream\)"):
            tll.direct_logit_attribution(model, TOKENS, answers=ANSWERS, by="head")
        tll.logit_lens(model, TOKENS)  # the lens reads the streams as they are
    finally:
        with torch.no_grad():
            scalar.fill_(1.0)
