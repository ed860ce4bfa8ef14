"""Head attribution by source position: the source pieces of a head add up to the head's value,
agree with an independent float64 reference, and show the demo model's induction head reading
the earlier copy of the prompt."""

import builders
import pytest
import reference
import torch

import tl_logitlens as tll
from tl_logitlens.demo import INDUCTION_HEAD, PREV_TOKEN_HEAD, induction_prompt
from tl_logitlens.errors import LensInputError, UnsupportedModelError

TOKENS = builders.tokens(batch=3, seq=8, seed=2)
ANSWERS = torch.tensor([5, 9, 12])
WRONG = torch.tensor([7, 7, 30])
PRECISION = builders.precision_cases((torch.bfloat16, torch.float16))


def _dla(model, **kw):
    kw.setdefault("answers", ANSWERS)
    return tll.direct_logit_attribution(model, TOKENS, by="head", by_source=True, **kw)


def test_source_pieces_add_up_to_each_heads_attribution(case):
    _, model = case
    for kw in (dict(wrong=WRONG), dict(norm="none"), dict(wrong=WRONG, positions=[2, -1])):
        att = _dla(model, **kw)
        src = att.by_source()
        several = "positions" in kw
        assert src.shape == (model.cfg.n_layers, model.cfg.n_heads, TOKENS.shape[1], 3) + ((2,) if several else ())
        assert att.source_rounding is None  # float32 models: no rounding term
        torch.testing.assert_close(src.sum(2), att.by_head(), atol=1e-5, rtol=0)
        # Sources after the destination get no attention: they carry nothing.
        dest = 2 if several else TOKENS.shape[1] - 1
        later = src[:, :, dest + 1 :, :, 0] if several else src[:, :, dest + 1 :]
        assert bool((later == 0).all())


def test_source_pieces_match_an_independent_reference(case):
    _, model = case
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
    ref = reference.source_pieces(model, cache)
    att = _dla(model, wrong=WRONG)
    src = att.by_source()
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            pieces = ref[f"L{layer}H{head}"]  # [src, batch, d_model], float64
            expected = reference.project_cached(model, cache, pieces.float(), ANSWERS, WRONG)
            torch.testing.assert_close(src[layer, head], expected.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pcase", PRECISION, ids=[c.name for c in PRECISION])
def test_half_precision_pieces_add_up_with_their_rounding(pcase):
    model = builders.build(pcase)
    att = tll.direct_logit_attribution(
        model, TOKENS.to(model.W_E.device), answers=ANSWERS, wrong=WRONG, by="head", by_source=True
    )
    assert att.source_rounding is not None and att.source_rounding.shape == att.by_head().shape
    total = att.by_source().sum(2) + att.source_rounding
    torch.testing.assert_close(total, att.by_head(), atol=1e-5, rtol=0)
    # The rounding term is what the model's own rounding of z adds: small next to the heads.
    eps = torch.finfo(pcase_dtype(pcase)).eps
    assert float(att.source_rounding.abs().max()) <= 64 * eps * (1 + float(att.by_source().abs().sum(2).max()))


def pcase_dtype(pcase):
    return torch.bfloat16 if "bf16" in pcase.name else torch.float16


def test_cache_only_gives_the_same_split_and_no_source_text():
    model = builders.build(builders.cases()[0])
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
    ran = _dla(model, wrong=WRONG)
    read = tll.direct_logit_attribution(cache=cache, answers=ANSWERS, wrong=WRONG, by="head", by_source=True)
    torch.testing.assert_close(read.by_source(), ran.by_source())
    assert read.source_tokens() is None


def test_source_tokens_name_the_input():
    model = builders.word_model()
    att = tll.direct_logit_attribution(
        model, ["w5 w6 w7 w8", "w9 w10"], answers="w11", by="head", by_source=True, positions=None
    )
    texts = att.source_tokens()
    assert len(texts) == 2 and len(texts[0]) == att.by_source().shape[2]
    assert [t.strip() for t in texts[0][-4:]] == ["w5", "w6", "w7", "w8"]
    src = att.by_source()  # [layer, head, src, batch, pos]
    short = int(att.lengths[1])
    assert bool(src[..., 1, short:].isnan().all())  # padding destinations of the short prompt
    assert not bool(src[..., 1, :short].isnan().any())


def test_demo_induction_head_reads_the_earlier_copy():
    """The induction head at each destination of the second copy reads most from the earlier copy.

    This trained model's layer-0 head ``PREV_TOKEN_HEAD`` copies the token two positions back
    (measured here from its pattern, which TransformerLens records), so the answer (the token after
    the previous occurrence ``prev`` of the current token, at ``prev + 1``) sits in the stream of
    ``prev + 3``; the induction head's top source is that position, whose layer-0 write carries
    the answer. Expected positions come from the prompt's structure and the cached pattern.
    """
    model = tll.demo_model()
    n = 12
    for seed in (0, 1, 2):
        tokens = induction_prompt(model, n=n, seed=seed)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens)
        prev_head = cache[f"blocks.{PREV_TOKEN_HEAD[0]}.attn.hook_pattern"][0, PREV_TOKEN_HEAD[1]]
        for dest in range(n + 2, 2 * n):  # second copy, predicting tokens[dest + 1]
            att = tll.direct_logit_attribution(
                model, tokens[:, : dest + 1], answers=int(tokens[0, dest + 1]), by="head", by_source=True
            )
            layer, head = INDUCTION_HEAD
            top = int(att.by_source()[layer, head, :, 0].argmax())
            prev = dest - n  # the earlier occurrence of the current token
            assert int(tokens[0, prev]) == int(tokens[0, dest])
            answer_at = int(prev_head[top].argmax())  # where layer 0 copied from into the top source
            assert answer_at == prev + 1 and int(tokens[0, answer_at]) == int(tokens[0, dest + 1])
            assert top == prev + 3
            # The head's value at this destination is mostly that one source.
            assert float(att.by_source()[layer, head, top, 0]) > 0.5 * float(att.by_head()[layer, head, 0])


def test_a_pattern_that_does_not_make_the_heads_output_is_refused():
    """A cache whose pattern is not the one that made hook_z (here shifted by one source) is refused."""
    model = builders.build(builders.cases()[0])
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
    name = "blocks.1.attn.hook_pattern"
    cache.cache_dict[name] = cache.cache_dict[name].roll(1, dims=-1)
    with pytest.raises(UnsupportedModelError, match="L1H.*do not add up to its output"):
        tll.direct_logit_attribution(cache=cache, answers=ANSWERS, wrong=WRONG, by="head", by_source=True)


def test_by_source_is_refused_clearly():
    model = builders.build(builders.cases()[0])
    builders.raises_before_forward(
        model,
        LensInputError,
        "needs by='head'",
        lambda: tll.direct_logit_attribution(model, TOKENS, answers=ANSWERS, by_source=True),
    )
    builders.raises_before_forward(
        model,
        LensInputError,
        "by_source must be True or False",
        lambda: tll.direct_logit_attribution(model, TOKENS, answers=ANSWERS, by="head", by_source="yes"),
    )
    plain = tll.direct_logit_attribution(model, TOKENS, answers=ANSWERS, by="head")
    with pytest.raises(LensInputError, match="by_source=True"):
        plain.by_source()


def test_source_figure_shows_the_top_heads_by_source():
    import matplotlib

    matplotlib.use("Agg")
    from tl_logitlens.plots import plot_source_attribution

    model = builders.word_model()
    att = tll.direct_logit_attribution(
        model, ["w5 w6 w7 w8 w9", "w10 w11 w12"], answers="w11", by="head", by_source=True, positions=None
    )
    fig = plot_source_attribution(att, top_k=3, prompt=1, position=2)
    grid = fig.axes[0].images[0].get_array()
    dest = int(att.positions[1, 2])
    assert grid.shape == (dest + 1, 3)
    # Columns are the heads with the largest |value| at that cell, strongest first, and each
    # column is that head's split: it sums to the head's own attribution.
    heads = att.by_head()[:, :, 1, 2].reshape(-1)
    order = heads.abs().argsort(descending=True)[:3].tolist()
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == [f"L{i // model.cfg.n_heads}H{i % model.cfg.n_heads}" for i in order]
    torch.testing.assert_close(torch.tensor(grid.sum(0)), heads[order], atol=1e-5, rtol=0)
    assert "w11" in fig.axes[0].get_title() or "logit" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        plot_source_attribution(att, top_k=0)
    plain = tll.direct_logit_attribution(model, ["w5 w6"], answers="w11", by="head")
    with pytest.raises(LensInputError, match="by_source=True"):
        plot_source_attribution(plain)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_source_split_on_cuda_adds_up_and_matches_the_cpu(dtype):
    for pcase in builders.precision_cases((dtype,), device="cuda"):
        model = builders.build(pcase)
        att = tll.direct_logit_attribution(
            model, TOKENS.cuda(), answers=ANSWERS, wrong=WRONG, by="head", by_source=True
        )
        assert att.by_source().device.type == "cpu"
        total = att.by_source().sum(2) + (0 if att.source_rounding is None else att.source_rounding)
        torch.testing.assert_close(total, att.by_head(), atol=1e-5, rtol=0)
