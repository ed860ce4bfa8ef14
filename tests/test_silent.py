"""Nothing silently wrong (issue 8, section 4): each class of bad or edge input is refused
clearly or answered correctly, never answered with a quietly wrong number."""

import json
import warnings

import builders
import numpy as np
import pytest
import torch

import tl_logitlens as tll
from tl_logitlens.evaluate import LensEvaluation, evaluate_lens
from tl_logitlens.model_access import ActivationCache

raises_before_forward = builders.raises_before_forward


@pytest.fixture(scope="module")
def model():
    """Word tokenizer (<unk> 0, <bos> 1, <pad> 2, w3..w60), context 24."""
    return builders.word_model()


@pytest.fixture(scope="module")
def twin():
    """The same architecture, another object (another model's weights)."""
    return builders.word_model(seed=1)


PROMPTS = ["w3 w4 w5 w6 w7", "w8 w9"]  # right-padded (bos added): the second prompt has 3 real tokens of 6


# -- targets="next" --------------------------------------------------------------------------
def test_next_target_without_a_next_token_is_nan_and_rank_minus_one(model):
    result = tll.logit_lens(model, PROMPTS, targets="next")
    lengths = result.lengths.tolist()
    with torch.no_grad():
        logits = model(result.input_ids)
    probs = torch.softmax(logits.double(), -1)
    for b, length in enumerate(lengths):
        for j in range(result.input_ids.shape[1]):
            cell = result.target_probs[-1, b, j, 0]
            if j < length - 1:  # a real next token: the model's own probability of it
                nxt = int(result.input_ids[b, j + 1])
                assert abs(float(cell) - float(probs[b, j, nxt])) < 1e-5
                assert int(result.target_ids[-1, b, j, 0]) == nxt
            else:  # last token or padding: there is no target
                assert torch.isnan(cell) and torch.isnan(result.target_logits[-1, b, j, 0])
                assert int(result.target_ranks[-1, b, j, 0]) == -1 and int(result.target_ids[-1, b, j, 0]) == -1
    frame = result.to_dataframe()
    last = frame[(frame["batch"] == 0) & (frame["pos"] == lengths[0] - 1)]
    assert last["target_prob"].isna().all() and (last["target_rank"] == -1).all()


# -- DLA over a padded batch -----------------------------------------------------------------
def test_dla_padding_cells_are_nan_and_left_out_of_mean_and_top(model):
    att = tll.direct_logit_attribution(model, PROMPTS, answers="w5", positions=None, by="component")
    assert att.values.shape[2] == 6
    assert torch.isnan(att.values[:, 1, 3:]).all() and torch.isnan(att.model_value[1, 3:]).all()
    assert torch.isfinite(att.values[:, 0]).all() and torch.isfinite(att.values[:, 1, :3]).all()
    assert att.residual_error() < 1e-4
    # Reference: each prompt alone (no padding anywhere), averaged over the prompts that have the position.
    alone = [tll.direct_logit_attribution(model, p, answers="w5", positions=None).values[:, 0] for p in PROMPTS]
    expected = torch.stack([torch.stack([a[:, j] for a in alone if j < a.shape[1]]).mean(0) for j in range(6)], dim=1)
    assert torch.allclose(att.mean(), expected, atol=1e-5)
    cells = torch.cat([alone[0], alone[1]], dim=1)  # every real (prompt, position) cell
    overall = cells.mean(1)
    order = overall.abs().argsort(descending=True)[:3].tolist()
    top = att.top(3)
    assert [label for label, _ in top] == [att.labels[i] for i in order]
    assert all(abs(value - float(overall[i])) < 1e-5 for (_, value), i in zip(top, order))
    frame = att.to_dataframe()
    assert len(frame) == len(att.labels) * (6 + 3) and not frame["value"].isna().any()
    sliced = tll.direct_logit_attribution(model, PROMPTS, answers="w5", positions=slice(1, None))
    assert torch.isnan(sliced.values[:, 1, 2:]).all() and torch.isfinite(sliced.mean()[:, :2]).all()


def test_top_takes_a_positive_int(model):
    att = tll.direct_logit_attribution(model, PROMPTS, answers="w5")
    assert len(att.top(np.int64(2))) == 2
    assert len(att.top(100)) == len(att.labels)
    for bad in (-1, 0, True, 2.5, "3"):
        with pytest.raises(tll.LensInputError, match="k must be a positive int"):
            att.top(bad)


# -- positions ---------------------------------------------------------------------------------
def test_positions_are_refused_unless_they_are_integers(model):
    for bad in (
        True,
        False,
        [True, 1],
        1.0,
        [1.5],
        torch.tensor([1.0]),
        torch.tensor([True]),
        torch.zeros(2, 2, 2, dtype=torch.long),
        torch.tensor([[0, 1], [0, 1], [0, 1]]),
        slice(0.5, 2),
    ):
        raises_before_forward(
            model, tll.LensInputError, "positions", lambda: tll.logit_lens(model, PROMPTS, positions=bad)
        )
    raises_before_forward(
        model,
        tll.LensInputError,
        "positions",
        lambda: tll.direct_logit_attribution(model, PROMPTS, answers="w5", positions=True),
    )


def test_a_two_dimensional_positions_tensor_is_per_prompt(model):
    per_prompt = torch.tensor([[1, 4], [0, -1]])
    result = tll.logit_lens(model, PROMPTS, positions=per_prompt, targets="w6")
    assert result.positions.tolist() == [[1, 4], [0, 2]]
    for b, prompt in enumerate(PROMPTS):
        alone = tll.logit_lens(model, prompt, positions=per_prompt[b].tolist(), targets="w6")
        assert torch.allclose(result.target_probs[:, b], alone.target_probs[:, 0], atol=1e-6)
    att = tll.direct_logit_attribution(model, PROMPTS, answers="w5", positions=[[1, 4], [0, -1]])
    assert att.positions.tolist() == [[1, 4], [0, 2]]


# -- targets -------------------------------------------------------------------------------------
def test_targets_that_are_not_tokens_are_refused(model):
    for bad, match in [
        ({"w5": []}, "must list at least one token"),  # a dict is token groups (tests/test_groups.py)
        ({"w5", "w6"}, "set"),
        (2.5, "is a float; token ids are integers"),
        ([5, 6.0], "is a float"),
        (torch.tensor([5.0, 6.0]), "integer token ids"),
    ]:
        raises_before_forward(model, tll.LensInputError, match, lambda: tll.logit_lens(model, PROMPTS, targets=bad))
    raises_before_forward(
        model, tll.LensInputError, "is a float", lambda: tll.direct_logit_attribution(model, PROMPTS, answers=5.0)
    )
    raises_before_forward(
        model, tll.LensInputError, "mapping", lambda: tll.direct_logit_attribution(model, PROMPTS, answers={"w5": 0})
    )


def test_top_k_takes_numpy_integers_but_not_bool(model):
    result = tll.logit_lens(model, PROMPTS, top_k=np.int64(3), positions=-1)
    assert result.top_ids.shape[-1] == 3
    raises_before_forward(model, tll.LensInputError, "top_k", lambda: tll.logit_lens(model, PROMPTS, top_k=True))


# -- caches --------------------------------------------------------------------------------------
def test_a_cache_of_another_model_is_refused(model, twin):
    tokens = builders.tokens()
    with torch.no_grad():
        _, cache = twin.run_with_cache(tokens)
    raises_before_forward(
        model, tll.LensInputError, "another model", lambda: tll.logit_lens(model, tokens, cache=cache)
    )
    raises_before_forward(
        model, tll.LensInputError, "another model", lambda: tll.direct_logit_attribution(model, cache=cache, answers=5)
    )
    with torch.no_grad():
        _, own = model.run_with_cache(tokens)
    deeper = dict(own.cache_dict)
    deeper[f"blocks.{model.cfg.n_layers + 1}.hook_resid_post"] = deeper[
        f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    ]
    raises_before_forward(
        model,
        tll.LensInputError,
        rf"block {model.cfg.n_layers + 1}, but this model has {model.cfg.n_layers} layers",
        lambda: tll.logit_lens(model, cache=ActivationCache(deeper, model)),
    )
    wide = {name: (torch.cat([t, t], -1) if "hook_resid_" in name else t) for name, t in own.cache_dict.items()}
    raises_before_forward(
        model,
        tll.LensInputError,
        "wide, but this model's d_model",
        lambda: tll.logit_lens(model, cache=ActivationCache(wide, model)),
    )
    # The model's own cache still reads.
    assert tll.logit_lens(model, tokens, cache=own).labels[-1] == "final_post"


# -- lenses ----------------------------------------------------------------------------------------
def test_a_lens_that_returns_nan_is_refused(model):
    def broken(vectors, label):
        return vectors * float("nan") if label == "1_pre" else vectors

    with pytest.raises(tll.NonFiniteActivationError, match="lens returned .* stack entry '1_pre'"):
        tll.logit_lens(model, PROMPTS, lens=broken)
    with pytest.raises(tll.NonFiniteActivationError, match="lens returned"):
        evaluate_lens(model, builders.tokens(), lens=broken, progress=False)


# -- evaluate_lens -----------------------------------------------------------------------------------
def test_evaluate_splits_long_sequences_into_windows_and_says_so(model):
    n_ctx = model.cfg.n_ctx
    ids = builders.tokens(batch=2, seq=2 * n_ctx + 3, seed=4)
    with pytest.warns(
        UserWarning,
        match=rf"2 sequence\(s\) longer than the model's context of {n_ctx} tokens were split into 6 windows",
    ):
        ev = evaluate_lens(model, ids, batch_size=2, progress=False)
    assert ev.n_tokens == ids.shape[0] * (ids.shape[1] - 1)  # every token scored once
    assert ev.n_sequences == 2
    assert ev.meta["split_sequences"] == 2 and ev.meta["windows"] == 6 and ev.meta["n_ctx"] == n_ctx
    # Reference: the same windows cut by hand (overlap one token), evaluated as ordinary batches.
    stride = n_ctx - 1
    windows = [ids[:, s : s + n_ctx] for s in range(0, ids.shape[1] - 1, stride)]
    by_hand = evaluate_lens(model, windows, progress=False)
    assert by_hand.n_tokens == ev.n_tokens
    for stat in ("kl_to_final", "next_token_loss", "entropy"):
        # float32 statistics; batches of other shapes round differently (KL at final_post is ~1e-8, not 0)
        eps = torch.finfo(torch.float32).eps
        assert torch.allclose(ev.mean(stat), by_hand.mean(stat), rtol=100 * eps, atol=10 * eps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to split: no warning
        short = evaluate_lens(model, ids[:, :n_ctx], progress=False)
    assert "split_sequences" not in short.meta
    # Text is never cut at the context either: every token of a long string is scored.
    text = " ".join(f"w{3 + i % 50}" for i in range(2 * n_ctx))
    with pytest.warns(UserWarning, match="split into 3 windows"):
        ev = evaluate_lens(model, [text], progress=False)
    assert ev.n_tokens == model.to_tokens(text, truncate=False).shape[1] - 1


def test_layers_and_counts_take_any_integer_and_refuse_the_rest(model):
    assert tll.logit_lens(model, PROMPTS, layers=np.int64(-1), positions=-1).labels == ["final_post"]
    assert tll.logit_lens(model, PROMPTS, layers=np.array([0, -1]), positions=-1).labels == ["0_pre", "final_post"]
    for bad in (2.5, {"0_pre": 1}, [0.0], True):
        raises_before_forward(model, tll.LensInputError, "layer", lambda: tll.logit_lens(model, PROMPTS, layers=bad))
    assert (
        evaluate_lens(model, builders.tokens(), batch_size=np.int64(1), max_tokens=np.int32(5), progress=False).n_tokens
        == 5
    )


def test_evaluate_finds_an_out_of_range_id_before_the_first_batch(model):
    ids = builders.tokens(batch=9, seq=6)
    ids[7, 3] = builders.D_VOCAB + 5
    calls = []
    # On the embedding: evaluate_lens stops its forward passes early and a bridge's
    # run_with_hooks does not go through the bridge's own __call__.
    handle = model.embed.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(tll.LensInputError, match=rf"must lie in \[0, {builders.D_VOCAB}\)"):
            evaluate_lens(model, ids, batch_size=2, progress=False)
    finally:
        handle.remove()
    assert not calls, "the bad id was found after a batch had run"


def test_evaluate_reads_a_dict_as_one_batch_not_as_its_keys(model):
    ids = builders.tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the key "input_ids" read as text would warn of unknown words
        ev = evaluate_lens(model, {"input_ids": ids}, progress=False)
    assert ev.n_tokens == ids.shape[0] * (ids.shape[1] - 1)


def test_a_malformed_saved_evaluation_names_the_file_and_the_field(model, tmp_path):
    ev = evaluate_lens(model, builders.tokens(), progress=False)
    good = tmp_path / "ev.json"
    ev.save(good)
    assert LensEvaluation.load(good).n_tokens == ev.n_tokens
    data = json.loads(good.read_text())
    for field, damage in [
        ("n_tokens", lambda d: d.pop("n_tokens")),
        ("statistics.entropy", lambda d: d["statistics"].pop("entropy")),
        ("statistics.kl_to_final.sum", lambda d: d["statistics"]["kl_to_final"].update(sum=[1.0])),
        ("top1_agree", lambda d: d.update(top1_agree="x")),
    ]:
        broken = json.loads(json.dumps(data))
        damage(broken)
        path = tmp_path / f"broken-{field}.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(
            tll.LensInputError, match=rf"broken-{field}\.json: malformed saved LensEvaluation: field '{field}'"
        ):
            LensEvaluation.load(path)
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(tll.LensInputError, match=r"model\.bin: not a saved LensEvaluation"):
        LensEvaluation.load(binary)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(tll.LensInputError, match=r"garbage\.json: not a saved LensEvaluation \(not valid JSON"):
        LensEvaluation.load(garbage)
