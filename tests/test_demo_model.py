"""The built-in model has learned induction, and the package's own analyses reveal it."""

import pytest
import torch

import tl_logitlens as tll
from tl_logitlens.demo import INDUCTION_HEAD, demo_config, induction_prompt

N = 12


@pytest.fixture(scope="module")
def model():
    return tll.demo_model()


@pytest.fixture(scope="module")
def prompts(model):
    """16 prompts ``<bos> s s`` of 12 random words each, ``[16, 25]``."""
    return torch.cat([induction_prompt(model, n=N, seed=100 + s) for s in range(16)])


def test_shipped_files_are_small_and_describe_their_training():
    config = demo_config()
    assert config["model"]["n_layers"] == 2 and config["model"]["d_mlp"] > 0
    assert config["training"]["seed"] == 0 and config["training"]["steps"] > 0
    from tl_logitlens.demo import CONFIG_PATH, WEIGHTS_PATH

    assert WEIGHTS_PATH.stat().st_size + CONFIG_PATH.stat().st_size < 2 * 2**20


def test_predicts_the_second_repeat_and_not_the_first(model, prompts):
    with torch.no_grad():
        probs = torch.softmax(model(prompts), -1)
    nxt = prompts[:, 1:]
    p_next = probs[:, :-1].gather(-1, nxt.unsqueeze(-1))[..., 0]  # [batch, pos]
    second = p_next[:, N + 1 :]  # predicting words 2..n of the second copy
    first = p_next[:, 1 : N - 1]  # predicting words of the first copy
    assert second.mean() > 0.9
    assert first.mean() < 0.05  # chance is 1/80 words


def test_the_lens_shows_the_prediction_appearing_only_after_the_induction_layer(model, prompts):
    lens = tll.logit_lens(model, prompts, targets="next")
    assert lens.labels == ["0_pre", "1_pre", "final_post"]
    p = lens.target_probs[:, :, N + 1 : 2 * N, 0].mean((1, 2))  # [layer]
    # Before layer 1 (the induction layer) has written, the stream does not hold the answer.
    assert p[0] < 0.2 and p[1] < 0.2
    assert p[2] > 0.9


def test_dla_ranks_an_induction_head_first_and_ablation_confirms_it(model, prompts):
    context, answers = prompts[:, :-1], prompts[:, -1]
    wrong = prompts[:, 1].clone()
    wrong[wrong == answers] = prompts[wrong == answers, 2]
    heads = tll.direct_logit_attribution(model, context, answers=answers, wrong=wrong, by="head")
    per_head = heads.by_head().mean(-1)  # [layer, head]
    layer, head = divmod(int(per_head.argmax()), per_head.shape[1])
    assert layer == INDUCTION_HEAD[0] == 1  # the top writer is a head of the induction layer
    assert (layer, head) == tuple(INDUCTION_HEAD)
    direct = per_head[layer, head].item()

    def zero(z, hook):
        z[:, :, head] = 0.0
        return z

    with torch.no_grad():
        clean = model(context)[:, -1]
        ablated = model.run_with_hooks(context, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero)])[:, -1]
    rows = torch.arange(len(answers))
    diff = lambda logits: (logits[rows, answers] - logits[rows, wrong]).mean().item()  # noqa: E731
    drop = diff(clean) - diff(ablated)
    # Zero-ablating the head removes most of what DLA says it writes directly.
    assert drop > 0.5 * direct > 0
    torch.testing.assert_close(heads.model_value.mean(), torch.tensor(diff(clean)), atol=1e-4, rtol=1e-4)
