"""Token groups in the logit lens: each group's summed probability and log-sum-exp logit, read
inside the kernel's tiles, against full float64 logits (tests/reference.py) in three tilings."""

import builders
import pytest
import reference
import torch

import tl_logitlens as tll
from tl_logitlens.kernel import tuning
from tl_logitlens.model_access import TransformerBridge

TOKENS = builders.tokens(batch=2, seq=9, seed=4)
# Groups share tokens (9 and 40), sit in different tiles, and include the last column.
GROUPS = {"low": [3, 9, 17], "high": [40, 9, 60], "one": [25], "spread": [4, 11, 40, 59, 33]}

# (strategy, columns per tile, rows per product): ragged 7-column tiles of 5 rows; 16-column
# tiles of 12 rows; the whole vocabulary in one product (the CUDA strategy, run on the CPU).
# The tiled ones on the kernel's default statistics path (fused where a compiler works), and eager.
TILINGS = {
    "ragged-7x5": ("tiled", 7, 5),
    "tiles-16x12": ("tiled", 16, 12),
    "whole": ("whole", None, None),
    "ragged-7x5-eager": ("tiled", 7, 5, False),
}
# The same kinds over stories260k's 512 pieces, in tiles big enough to run fast on 2 cores.
REAL_TILINGS = {
    "ragged-100x40": ("tiled", 100, 40),
    "tiles-64x16": ("tiled", 64, 16),
    "whole": ("whole", None, None),
    "ragged-100x40-eager": ("tiled", 100, 40, False),
}


@pytest.fixture(autouse=True)
def fresh_tuning():
    tuning.clear_cache()
    yield
    tuning.clear_cache()


def _run(model, tokens, groups, tiling, **kw):
    strategy, width, rows, *fused = {**TILINGS, **REAL_TILINGS}[tiling]
    with tuning.force(strategy=strategy, width=width, rows=rows, fused=fused[0] if fused else None):
        return tll.logit_lens(model, tokens, targets=groups, **kw)


@pytest.mark.parametrize("tiling", list(TILINGS))
def test_groups_match_full_float64_logits(tiling):
    model = builders.build(builders.cases()[0])
    ref_probs, ref_logits = reference.group_stats(reference.lens_logits64(model, TOKENS), list(GROUPS.values()))
    result = _run(model, TOKENS, GROUPS, tiling)
    assert result.group_names == list(GROUPS)
    assert result.group_probs.shape == (model.cfg.n_layers + 1, 2, 9, len(GROUPS))
    torch.testing.assert_close(result.group_probs.double(), ref_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.group_logits.double(), ref_logits, atol=1e-5, rtol=1e-5)


def test_one_token_group_is_that_tokens_target_probability():
    model = builders.build(builders.cases()[0])
    groups = tll.logit_lens(model, TOKENS, targets={"a": [25]}, positions=-1)
    target = tll.logit_lens(model, TOKENS, targets=25, positions=-1)
    assert groups.group_probs.shape == (model.cfg.n_layers + 1, 2, 1)  # int position: axis dropped
    torch.testing.assert_close(groups.group_probs[..., 0], target.target_probs[..., 0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(groups.group_logits[..., 0], target.target_logits[..., 0], atol=1e-6, rtol=1e-6)
    assert groups.target_ids is None and target.group_names is None


def test_groups_name_tokens_as_elsewhere_and_make_a_table():
    model = builders.word_model()
    prompts = ["w5 w6 w7 w8 w9", "w10 w11"]
    by_text = tll.logit_lens(model, prompts, targets={"evens": ["w6", "w8"], "odds": [" w7", 9]})
    by_id = tll.logit_lens(model, prompts, targets={"evens": [6, 8], "odds": [7, 9]})
    torch.testing.assert_close(by_text.group_probs, by_id.group_probs)
    frame = by_text.groups_dataframe()
    real_cells = int(by_text.lengths.sum())
    assert len(frame) == len(by_text.labels) * real_cells * 2  # padding left out
    assert list(frame.columns) == ["layer", "batch", "pos", "input_token", "group", "prob", "logit"]
    row = frame[(frame.layer == "final_post") & (frame.batch == 0) & (frame.pos == 2) & (frame.group == "odds")]
    assert float(row.prob.iloc[0]) == pytest.approx(float(by_text.group_probs[-1, 0, 2, 1]))


@pytest.fixture(scope="module")
def stories_bf16(models_dir):
    if TransformerBridge is None:
        pytest.skip("the real models boot through TransformerBridge (3.x/4.x)")
    return TransformerBridge.boot_transformers(
        str(models_dir / "stories260k"), device="cpu", dtype=torch.bfloat16
    ).eval()


@pytest.mark.parametrize("tiling", list(REAL_TILINGS))
def test_groups_on_stories260k_in_bfloat16(stories_bf16, tiling):
    model = stories_bf16
    tokens = model.to_tokens("Once upon a time, there was a little girl named Lily. She loved to play outside.")
    # A group of the story's own tokens, one sharing a token with it, and a spread of ids.
    story = sorted(set(tokens[0, 1:8].tolist()))
    groups = {"story": story, "shared": [story[0], 300, 301], "spread": [5, 100, 255, 511]}
    ref_probs, ref_logits = reference.group_stats(reference.lens_logits64(model, tokens), list(groups.values()))
    result = _run(model, tokens, groups, tiling)
    torch.testing.assert_close(result.group_probs.double(), ref_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.group_logits.double(), ref_logits, atol=1e-5, rtol=1e-5)


def test_bad_groups_are_refused_before_the_forward_pass():
    model = builders.word_model()
    prompts = ["w5 w6 w7"]
    for bad, match in [
        ({}, "empty dict"),
        ({"a": []}, "must list at least one token"),
        ({"a": ["w5"], "b": []}, "group 'b' must list at least one token"),
        ({"a": ["not-a-token"]}, "not-a-token"),
        ({"a": [5, 999]}, "999"),
        ({3: ["w5"]}, "names must be non-empty strings"),
        ({"": ["w5"]}, "names must be non-empty strings"),
        ({"a": ["w5", 5]}, "more than once"),
        ({"a": {"w5": 1}}, "must list at least one token"),
    ]:
        builders.raises_before_forward(
            model, tll.LensInputError, match, lambda: tll.logit_lens(model, prompts, targets=bad)
        )


def test_group_trajectory_draws_one_line_per_group():
    import matplotlib

    matplotlib.use("Agg")
    from tl_logitlens.plots import plot_group_trajectory

    model = builders.word_model()
    prompts = ["w5 w6 w7 w8 w9", "w10 w11"]
    result = tll.logit_lens(model, prompts, targets={"evens": ["w6", "w8"], "odds": ["w7", "w9"], "w5": ["w5"]})
    fig = plot_group_trajectory(result, prompt=1, position=1, groups=["odds", "evens"])
    lines = fig.axes[0].lines
    assert [line.get_label() for line in lines] == ["odds", "evens"]
    assert list(lines[0].get_ydata()) == pytest.approx(result.group_probs[:, 1, 1, 1].tolist())
    mean = plot_group_trajectory(result, prompt=None, position=0, metric="logit")
    assert list(mean.axes[0].lines[2].get_ydata()) == pytest.approx(
        result.group_logits[:, :, 0, 2].mean(1).tolist(), rel=1e-6
    )
    with pytest.raises(ValueError, match="padding"):
        plot_group_trajectory(result, prompt=1, position=4)
    with pytest.raises(ValueError, match="unknown group"):
        plot_group_trajectory(result, groups="primes")
    with pytest.raises(ValueError, match="needs token groups"):
        plot_group_trajectory(tll.logit_lens(model, prompts, targets="w6"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("strategy", ["whole", "tiled"])
def test_groups_on_cuda_match_full_float64_logits(strategy):
    for pcase in builders.precision_cases((torch.float32, torch.bfloat16), device="cuda"):
        model = builders.build(pcase)
        tokens = TOKENS.cuda()
        ref_probs, ref_logits = reference.group_stats(
            reference.lens_logits64(model, tokens).cpu(), list(GROUPS.values())
        )
        with tuning.force(strategy=strategy, width=16 if strategy == "tiled" else None, half_products=False):
            result = tll.logit_lens(model, tokens, targets=GROUPS)
        torch.testing.assert_close(result.group_probs.double(), ref_probs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result.group_logits.double(), ref_logits, atol=1e-5, rtol=1e-5)
        if model.W_U.dtype == torch.bfloat16:  # the CUDA default: products of the rounded vectors
            ref_probs, ref_logits = reference.group_stats(
                reference.lens_logits64(model, tokens, round_to=torch.bfloat16).cpu(), list(GROUPS.values())
            )
            with tuning.force(strategy=strategy, width=16 if strategy == "tiled" else None):
                result = tll.logit_lens(model, tokens, targets=GROUPS)
            torch.testing.assert_close(result.group_probs.double(), ref_probs, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(result.group_logits.double(), ref_logits, atol=1e-4, rtol=1e-4)
