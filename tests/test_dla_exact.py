"""Direct logit attribution and residual stacks: the pieces add up, and agree with independent references."""

import builders
import pytest
import reference
import torch

import tl_logitlens as tll
from tl_logitlens.model_access import HookedTransformer

TOKENS = builders.tokens(batch=3, seq=8, seed=2)
ANSWERS = torch.tensor([5, 9, 12])
WRONG = torch.tensor([7, 7, 30])


def _kinds(model):
    has_mlp = not getattr(model.cfg, "attn_only", False)
    return ["component", "head", "accumulated"] + (["neuron"] if has_mlp else [])


def test_pieces_add_up_to_the_model_value(case):
    _, model = case
    for by in _kinds(model):
        for wrong in (WRONG, None):
            att = tll.direct_logit_attribution(model, TOKENS, answers=ANSWERS, wrong=wrong, by=by)
            total = att.values[-1] if by == "accumulated" else att.values.sum(0)
            assert (total + att.constant - att.model_value).abs().max().item() <= 1e-4, (by, wrong)
            assert att.residual_error() <= 1e-4


def test_model_value_is_the_models_own_logit_difference(case):
    _, model = case
    with torch.no_grad():
        logits = model(TOKENS)[:, -1]
    rows = torch.arange(3)
    att = tll.direct_logit_attribution(model, TOKENS, answers=ANSWERS, wrong=WRONG)
    torch.testing.assert_close(att.model_value, logits[rows, ANSWERS] - logits[rows, WRONG], atol=1e-5, rtol=1e-5)


def test_components_match_textbook_reference(case):
    _, model = case
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
    ref = reference.dla_reference(model, cache, ANSWERS, WRONG)
    att = tll.direct_logit_attribution(model, TOKENS, answers=ANSWERS, wrong=WRONG, by="component")
    assert len(att.labels) == len(ref["names"])
    torch.testing.assert_close(att.values, ref["values"].float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(att.constant, ref["constant"].float(), atol=1e-4, rtol=1e-4)


def test_cache_only_gives_the_same_attribution(case):
    _, model = case
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
    ran = tll.direct_logit_attribution(model, TOKENS, answers=ANSWERS, wrong=WRONG, by="head")
    read = tll.direct_logit_attribution(cache=cache, answers=ANSWERS, wrong=WRONG, by="head")
    torch.testing.assert_close(read.values, ran.values)
    torch.testing.assert_close(read.model_value, ran.model_value, atol=1e-4, rtol=1e-4)


def test_heads_and_neurons_add_up_to_their_layer(case):
    _, model = case
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
    comp = tll.residual_stack(cache, by="component")
    heads = tll.residual_stack(cache, by="head")
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    for stack in (comp, heads):
        torch.testing.assert_close(stack.values.sum(0), final, atol=1e-4, rtol=1e-4)
    for layer in range(model.cfg.n_layers):
        rows = [
            i for i, label in enumerate(heads.labels) if label.startswith(f"L{layer}H") or label == f"{layer}_attn_bias"
        ]
        assert len(rows) >= model.cfg.n_heads
        torch.testing.assert_close(
            heads.values[rows].sum(0), cache[f"blocks.{layer}.hook_attn_out"], atol=1e-5, rtol=1e-4
        )
    if getattr(model.cfg, "attn_only", False):
        return
    neurons = tll.residual_stack(cache, by="neuron", positions=[0, -1])
    for layer in range(model.cfg.n_layers):
        rows = [
            i
            for i, label in enumerate(neurons.labels)
            if label.startswith(f"L{layer}N") or label == f"{layer}_mlp_bias"
        ]
        expected = cache[f"blocks.{layer}.hook_mlp_out"][:, [0, -1]]
        torch.testing.assert_close(neurons.values[rows].sum(0), expected, atol=1e-5, rtol=1e-4)


def test_head_attribution_matches_the_reference_head_pieces(case):
    _, model = case
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
        pieces = reference.head_pieces(model, cache)  # independent of tl_logitlens
        expected = reference.project_cached(model, cache, torch.stack(list(pieces.values())), ANSWERS, WRONG)
    att = tll.direct_logit_attribution(cache=cache, answers=ANSWERS, wrong=WRONG, by="head")
    index = [att.labels.index(label) for label in pieces]
    torch.testing.assert_close(att.values[index], expected.float(), atol=1e-4, rtol=1e-4)
    assert att.by_head().shape == (model.cfg.n_layers, model.cfg.n_heads, 3)


def test_neuron_attribution_matches_the_reference_neuron_pieces(case):
    _, model = case
    if getattr(model.cfg, "attn_only", False):
        pytest.skip("attention-only: no neurons")
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
    att = tll.direct_logit_attribution(cache=cache, answers=ANSWERS, wrong=WRONG, by="neuron")
    for layer in range(model.cfg.n_layers):
        with torch.no_grad():
            expected = reference.project_cached(
                model, cache, reference.neuron_pieces(model, cache, layer), ANSWERS, WRONG
            )
        index = [att.labels.index(f"L{layer}N{n}") for n in range(expected.shape[0])]
        torch.testing.assert_close(att.values[index], expected.float(), atol=1e-4, rtol=1e-4)


def test_agrees_with_transformer_lens_logit_attrs(case):
    spec, model = case
    if not (spec.hooked and spec.folded):
        pytest.skip("stack_head_results + logit_attrs are exact on folded HookedTransformers")
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
    stack, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    theirs = cache.logit_attrs(stack, tokens=ANSWERS, incorrect_tokens=WRONG, pos_slice=-1)
    att = tll.direct_logit_attribution(model, TOKENS, answers=ANSWERS, wrong=WRONG, by="head")
    index = [att.labels.index(label) for label in labels]
    torch.testing.assert_close(att.values[index], theirs.float(), atol=1e-4, rtol=1e-4)


def test_positions_none_and_padded_prompts():
    model = builders.hf_bridge("llama") if builders.TransformerBridge else builders.hooked(tokenizer=True)
    prompts = ["w3 w4 w5 w6 w7", "w8 w9"]
    att = tll.direct_logit_attribution(model, prompts, answers=["w5", "w6"], wrong="w7", by="component")
    for i, prompt in enumerate(prompts):
        alone = tll.direct_logit_attribution(model, prompt, answers=[["w5", "w6"][i]], wrong="w7")
        torch.testing.assert_close(att.values[:, i], alone.values[:, 0], atol=1e-5, rtol=1e-4)
    every = tll.direct_logit_attribution(model, prompts[:1], answers="w5", positions=None)
    assert every.values.shape[-1] == 6 and every.model_value.shape == (1, 6)
    assert every.residual_error() <= 1e-4
    frame = every.to_dataframe()
    assert len(frame) == len(every.labels) * 6
    top = att.top(3)
    assert len(top) == 3 and abs(top[0][1]) >= abs(top[-1][1])


@pytest.mark.skipif(HookedTransformer is None, reason="HookedTransformer is 2.x/3.x only")
def test_unfolded_and_folded_hooked_agree_per_component():
    unfolded = builders.hooked("LN", seed=3)
    folded = builders.hooked("LN", seed=3, fold=True)
    a = tll.direct_logit_attribution(unfolded, TOKENS, answers=ANSWERS, wrong=WRONG, by="component")
    b = tll.direct_logit_attribution(folded, TOKENS, answers=ANSWERS, wrong=WRONG, by="component")
    torch.testing.assert_close(a.model_value, b.model_value, atol=1e-4, rtol=1e-4)
    # Folding centres the writing weights and moves the final norm's weight into W_U and its
    # bias into b_U: each component's contribution is unchanged; the norm bias's share moves
    # from the unfolded constant's norm term into the folded constant's b_U term.
    assert a.labels == b.labels
    torch.testing.assert_close(a.values, b.values, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(a.constant, b.constant, atol=1e-4, rtol=1e-3)
