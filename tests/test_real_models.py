"""Behaviour on real trained models (../shared/models via TL_LOGITLENS_MODELS; skipped without it)."""

import pytest
import torch

import tl_logitlens as tll
from tl_logitlens.model_access import TransformerBridge

pytestmark = pytest.mark.skipif(
    TransformerBridge is None, reason="local HF models boot through TransformerBridge (3.x/4.x)"
)

STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture(scope="module")
def stories(models_dir):
    return TransformerBridge.boot_transformers(str(models_dir / "stories260k"), device="cpu").eval()


@pytest.fixture(scope="module")
def capp(models_dir):
    return TransformerBridge.boot_transformers(str(models_dir / "capp-gpt2"), device="cpu").eval()


def _final_entry_reproduces(model, tokens):
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    ours = tll.readout(model, final, return_logits=True).logits
    gap = (torch.log_softmax(ours.double(), -1) - torch.log_softmax(logits.double(), -1)).abs().max().item()
    assert gap <= 1e-4


def test_stories_final_entry_reproduces_the_model(stories):
    tokens = stories.to_tokens(STORY)
    _final_entry_reproduces(stories, tokens)
    result = tll.logit_lens(stories, tokens, targets="next")
    loss = result.next_token_loss[:, 0, :-1].mean(-1)
    # A trained model's next-token loss falls through the stack and the final entry is its own loss.
    assert loss[-1] < loss[0] and loss[-1] < 1.0
    assert result.kl_to_final[-1].abs().max() <= 1e-5


def test_stories_tied_embedding_lens_reads_back_the_input_token(stories):
    tokens = stories.to_tokens(STORY)
    result = tll.logit_lens(stories, tokens, norm="none", unembed="W_E", layers=["0_pre"], top_k=1)
    # At 0_pre the stream is the token's own embedding row e_t, and e_t . e_t beats e_t . e_s for
    # almost every s: with tied embeddings the lens returns the input token.
    hits = (result.top_ids[0, 0, :, 0] == tokens[0]).float().mean().item()
    assert hits >= 0.9


def test_stories_dla_adds_up_by_neuron_and_head(stories):
    tokens = stories.to_tokens(STORY)
    answer = int(tokens[0, -1])
    for by in ("neuron", "head", "component"):
        att = tll.direct_logit_attribution(
            stories, tokens, answers=answer, wrong=int(tokens[0, 5]), by=by, positions=-2
        )
        assert att.residual_error() <= 1e-4


def test_capp_predicts_the_process_after_end_of_components(capp):
    # <SOS> prismatic part, normal holes, no external threads, normal finish, <EOC>
    tokens = torch.tensor([[49, 2, 8, 15, 17, 50]])
    _final_entry_reproduces(capp, tokens)
    result = tll.logit_lens(capp, tokens, positions=-1)
    assert result.top_probs[-1, 0, 0].item() > 0.9  # after <EOC> the model is near-certain
    att = tll.direct_logit_attribution(capp, tokens, answers=int(result.top_ids[-1, 0, 0]), by="head")
    assert att.residual_error() <= 1e-4


def test_text_the_model_writes_is_text_it_predicts(stories):
    """Sampled at temperature 1, a model's own text has an expected loss equal to its expected entropy: on real
    stories the two agree (1.18 and 1.24 nats); text sampled through the bridge's key-value cache is noise to the
    model (6.05 against 1.80). Loss and entropy are computed here from the model's own logits in float64."""
    import builders

    text = builders.sampled_tokens(stories, 16, 96, seed=0)
    with torch.no_grad():
        logp = torch.log_softmax(stories(text).double(), -1)[:, :-1]  # [n, length - 1, vocab]
    loss = -logp.gather(-1, text[:, 1:, None]).mean().item()
    entropy = -(logp.exp() * logp).sum(-1).mean().item()
    assert abs(loss - entropy) < 0.25 and loss < 2.0, (loss, entropy)
    words = stories.tokenizer.decode(text[0, 1:40])
    assert words.count(" ") > 5 and all(w.isascii() for w in words), words
