"""Public entry points that the exactness grid reaches only through logit_lens get direct tests.

Each compares with the independent full-logit reference in tests/reference.py.
"""

import builders
import pytest
import reference
import torch
from conftest import FUSED_AVAILABLE

import tl_logitlens as tll

TOKENS = builders.tokens(batch=2, seq=7, seed=4)
_KINDS = [c for c in builders.cases() if c.name in ("gpt2", "llama-tied", "ht-ln", "ht-tied")]


@pytest.fixture(params=_KINDS, ids=[c.name for c in _KINDS], scope="module")
def model(request):
    return builders.build(request.param)


def test_residual_stack_accumulated_is_the_cached_stream(model):
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
    labels, expected = reference.accumulated(model, cache, incl_mid=True)
    stack = tll.residual_stack(cache, by="accumulated", incl_mid=True)
    assert stack.labels == labels
    torch.testing.assert_close(stack.values, expected.float(), atol=0, rtol=0)
    last = tll.residual_stack(cache, by="accumulated", positions=-1)
    assert last.labels[-1] == "final_post" and tuple(last.values.shape) == (
        model.cfg.n_layers + 1,
        2,
        model.cfg.d_model,
    )
    torch.testing.assert_close(last.values[-1], expected[-1][:, -1].float(), atol=0, rtol=0)


def test_readout_cached_norm_matches_the_reference(model):
    ref = reference.lens_reference(model, TOKENS, norm="cached")
    with torch.no_grad():
        _, stack = reference.accumulated(model, ref["cache"])
    r = tll.readout(model, stack, norm="cached", reference=stack[-1], top_k=3)
    logp = torch.log_softmax(ref["logits"].double(), -1)
    torch.testing.assert_close(r.entropy.double(), ref["entropy"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(r.top_logits.double(), ref["logits"].double().topk(3, -1).values, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(r.kl_to_reference.double(), ref["kl"], atol=2e-5, rtol=1e-4)
    assert torch.equal(r.top_ids[..., 0], logp.argmax(-1))


def test_readout_through_the_embedding_matches_the_reference(model):
    ref = reference.lens_reference(model, TOKENS, norm="none", unembed="W_E")
    with torch.no_grad():
        _, stack = reference.accumulated(model, ref["cache"])
    r = tll.readout(
        model,
        stack,
        norm="none",
        unembed="W_E",
        top_k=2,
        next_tokens=torch.cat([TOKENS[:, 1:], torch.full((2, 1), -1)], 1),
    )
    torch.testing.assert_close(r.entropy.double(), ref["entropy"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(r.top_logits.double(), ref["logits"].double().topk(2, -1).values, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(r.next_token_loss[..., :-1].double(), ref["loss"], atol=2e-5, rtol=1e-5)
    assert bool(r.next_token_loss[..., -1].isnan().all())


def test_the_lens_unembeds_its_final_entry_once(model, monkeypatch):
    """The final stream is both the last entry and the KL reference: the lens names its
    index to the kernel, which then reads it once (no second unembedding of every row)."""
    import importlib

    from tl_logitlens.kernel import tiles, tuning

    readout_module = importlib.import_module("tl_logitlens.kernel.read")  # the module: tll.readout is the function
    entries = []
    real = tiles.read_product

    def spy(x, g, *args, **kwargs):
        entries.append(g)
        return real(x, g, *args, **kwargs)

    monkeypatch.setattr(readout_module, "read_product", spy)
    with tuning.force(strategy="tiled"):
        result = tll.logit_lens(model, TOKENS)
    assert sum(entries) == len(result.labels)  # one product per row block, every entry once
    entries.clear()
    with tuning.force(strategy="tiled"):
        tll.logit_lens(model, TOKENS, lens=lambda h, label: h)  # a lens: the reference is read on its own
    assert sum(entries) == len(result.labels) + 1


def test_the_chunk_budget_knob_sets_the_rows_per_product(monkeypatch):
    """tll.set_chunk_budget changes how many rows each product holds (more, smaller products)
    and nothing else; assigning the DEFAULT constant would change nothing, so it is refused."""
    import importlib

    from tl_logitlens.kernel import tiles, tuning

    model = builders.build(_KINDS[0])
    readout_module = importlib.import_module("tl_logitlens.kernel.read")
    rows_seen = []
    real = tiles.read_product

    def spy(x, g, *args, **kwargs):
        rows_seen.append(kwargs.get("piece_rows") or x.shape[0])  # with workers: rows per piece
        return real(x, g, *args, **kwargs)

    monkeypatch.setattr(readout_module, "read_product", spy)
    tokens = builders.tokens(batch=4, seq=20, seed=5)
    per_row = tiles.BUFFERS * 4 * 16  # bytes of working buffers per row of 16 float32 columns
    with tuning.force(strategy="tiled", width=16, workers=1):
        try:
            tll.set_chunk_budget(per_row * 240)  # room for every entry of all 80 positions at once
            plain = tll.logit_lens(model, tokens, targets="next")
            assert rows_seen == [3 * 80]
            rows_seen.clear()
            tll.set_chunk_budget(per_row * 30)
            small = tll.logit_lens(model, tokens, targets="next")
        finally:
            tll.set_chunk_budget(None)
    assert rows_seen == [30] * 8  # 30 rows: 10 prompt positions x 3 entries, 8 products for 80 positions
    rows_seen.clear()
    with tuning.force(strategy="tiled", width=16, workers=2):
        try:  # two workers: each holds a piece and its reference rows, so pieces of 30 * 3 / 4 rows
            tll.set_chunk_budget(per_row * 30)
            pieces = tll.logit_lens(model, tokens, targets="next")
        finally:
            tll.set_chunk_budget(None)
    if FUSED_AVAILABLE:
        assert set(rows_seen) == {30 * 3 // 4}
    for result in (small, pieces):
        for name in ("top_ids", "entropy", "kl_to_final", "next_token_loss", "target_ranks"):
            torch.testing.assert_close(
                getattr(result, name), getattr(plain, name), rtol=1e-5, atol=1e-5, equal_nan=True
            )
    with pytest.raises(AttributeError, match=r"set_chunk_budget"):
        tll.DEFAULT_CHUNK_BUDGET_BYTES = 1
    with pytest.raises(tll.LensInputError, match="positive number of bytes"):
        tll.set_chunk_budget(0)


def test_dla_without_the_norm_matches_the_raw_reference(model):
    """norm='none': each piece dotted with W_U's columns as it is; the pieces add up to the
    unnormalised final @ u + b_U. Reference: the cached component outputs, by hand."""
    answers, wrong = torch.tensor([5, 9]), torch.tensor([7, 30])
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
    ref = reference.dla_reference(model, cache, answers, wrong)  # for its component names only
    u = (model.W_U[:, answers] - model.W_U[:, wrong]).T.detach()
    expected = torch.stack([(cache[name][:, -1] * u).sum(-1) for name in ref["names"]])
    b_diff = (model.b_U[answers] - model.b_U[wrong]).detach()
    raw_value = (cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, -1] * u).sum(-1) + b_diff
    att = tll.direct_logit_attribution(cache=cache, answers=answers, wrong=wrong, norm="none")
    assert att.norm == "none" and len(att.labels) == len(ref["names"])
    torch.testing.assert_close(att.values, expected.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(att.model_value, raw_value.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(att.constant, b_diff.float(), atol=1e-5, rtol=1e-5)
    assert att.residual_error() <= 1e-4


def test_dla_refuses_a_norm_under_which_pieces_do_not_add_up(model):
    with pytest.raises(tll.LensInputError, match=r"not linear, so the pieces would not add up"):
        tll.direct_logit_attribution(model, TOKENS, answers=5, norm="recompute")
    with pytest.raises(tll.LensInputError, match=r"norm must be one of \('cached', 'none'\)"):
        tll.direct_logit_attribution(model, TOKENS, answers=5, norm="layer")
