"""The logit lens against the model's own forward pass and an independent reference, on every configuration."""

import builders
import pytest
import reference
import torch

import tl_logitlens as tll
from tl_logitlens.kernel import tiles, tuning
from tl_logitlens.model_access import TL_MAJOR

TOKENS = builders.tokens(batch=2, seq=9)


@pytest.fixture(
    params=[None, (7, 128, None), (16, 8, None), (7, 128, False)],
    ids=["one-tile", "tiles-of-7", "top-k-blocks", "tiles-of-7-eager"],
)
def tiling(request, monkeypatch):
    """The vocabulary (61 tokens) read whole, in ragged tiles of 7 columns (each searched whole
    for top-k), or in tiles of 16 whose top-k candidates come from blocks of 8 columns; the
    statistics on the kernel's default path (fused where a compiler works), and once eager."""
    if request.param is None:
        yield request.param
        return
    columns, block, fused = request.param
    monkeypatch.setattr(tiles, "TILE_COLUMNS", columns)
    monkeypatch.setattr(tiles, "_TOPK_BLOCK", block)
    with tuning.force(fused=fused):
        yield request.param


def _assert_top_matches(ours_ids, ours_logits, ref_logits, k):
    """Top-k logits equal the reference's sorted top-k; ids agree wherever there is no near-tie."""
    ref_top = ref_logits.topk(k, dim=-1)
    torch.testing.assert_close(ours_logits.double(), ref_top.values.double(), atol=1e-4, rtol=1e-5)
    gaps = ref_top.values[..., :-1] - ref_top.values[..., 1:]
    clear = torch.cat([gaps > 1e-3, torch.ones_like(gaps[..., :1], dtype=torch.bool)], -1)
    clear = clear & torch.cat([torch.ones_like(gaps[..., :1], dtype=torch.bool), gaps > 1e-3], -1)
    assert torch.equal(ours_ids[clear], ref_top.indices[clear])


def test_final_entry_reproduces_model_log_probs(case, tiling):
    _, model = case
    result = tll.logit_lens(model, TOKENS, top_k=5)
    with torch.no_grad():
        logits, cache = model.run_with_cache(TOKENS)
    model_logp = torch.log_softmax(logits.double(), -1)
    # The full final-entry readout, through the same kernel, against the model's log-probs.
    final = tll.readout(model, cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"], return_logits=True)
    ours_logp = torch.log_softmax(final.logits.double(), -1)
    assert (ours_logp - model_logp).abs().max().item() <= 1e-4
    assert result.labels[-1] == "final_post"
    top = model_logp.topk(5, dim=-1)
    torch.testing.assert_close(result.top_probs[-1].double(), top.values.exp(), atol=1e-5, rtol=1e-4)
    entropy = -(model_logp.exp() * model_logp).sum(-1)
    torch.testing.assert_close(result.entropy[-1].double(), entropy, atol=1e-4, rtol=1e-4)
    assert result.kl_to_final[-1].abs().max().item() <= 1e-5


@pytest.mark.parametrize("norm", ["recompute", "cached", "none"])
def test_every_entry_matches_reference(case, norm, tiling):
    _, model = case
    # parallel and attention-only blocks have no resid_mid
    mid = not getattr(model.cfg, "parallel_attn_mlp", False) and not getattr(model.cfg, "attn_only", False)
    ref = reference.lens_reference(model, TOKENS, norm=norm, incl_mid=mid)
    result = tll.logit_lens(model, TOKENS, norm=norm, incl_mid=mid, targets="next", top_k=3)
    keep = [ref["labels"].index(label) for label in result.labels]
    assert len(keep) == len(result.labels)
    logits = ref["logits"][keep]
    _assert_top_matches(result.top_ids, result.top_logits, logits, 3)
    torch.testing.assert_close(result.entropy.double(), ref["entropy"][keep], atol=1e-4, rtol=1e-4)
    if norm == "recompute":  # the reference's final distribution is the same reading
        torch.testing.assert_close(result.kl_to_final.double(), ref["kl"][keep], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.next_token_loss[:, :, :-1].double(), ref["loss"][keep], atol=1e-4, rtol=1e-4)
    assert torch.isnan(result.next_token_loss[:, :, -1]).all()
    assert torch.equal(result.target_ranks[:, :, :-1, 0], ref["next_ranks"][keep])


def test_kl_uses_the_final_entry_read_the_same_way(case, tiling):
    _, model = case
    for norm in ("cached", "none"):
        ref = reference.lens_reference(model, TOKENS, norm=norm)
        result = tll.logit_lens(model, TOKENS, norm=norm)
        logp = torch.log_softmax(ref["logits"].double(), -1)
        kl = (logp[-1].exp() * (logp[-1] - logp)).sum(-1)
        torch.testing.assert_close(result.kl_to_final.double(), kl, atol=1e-4, rtol=1e-4)


def test_shared_targets_ranks_and_probs(case, tiling):
    _, model = case
    targets = [3, 17, 40]
    ref = reference.lens_reference(model, TOKENS)
    result = tll.logit_lens(model, TOKENS, targets=targets)
    logits = ref["logits"]
    picked = logits[..., targets]
    ranks = (logits.unsqueeze(-2) > picked.unsqueeze(-1)).sum(-1)
    assert torch.equal(result.target_ranks, ranks)
    torch.testing.assert_close(result.target_logits.double(), picked.double(), atol=1e-4, rtol=1e-5)
    probs = torch.softmax(logits.double(), -1)[..., targets]
    torch.testing.assert_close(result.target_probs.double(), probs, atol=1e-5, rtol=1e-4)


def test_tied_embedding_lens(case, tiling):
    _, model = case
    ref = reference.lens_reference(model, TOKENS, norm="none", unembed="W_E")
    result = tll.logit_lens(model, TOKENS, norm="none", unembed="W_E", top_k=2)
    _assert_top_matches(result.top_ids, result.top_logits, ref["logits"], 2)
    torch.testing.assert_close(result.entropy.double(), ref["entropy"], atol=1e-4, rtol=1e-4)


def test_cache_only_and_layers_and_int_position(case):
    _, model = case
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
    full = tll.logit_lens(model, TOKENS)
    from_cache = tll.logit_lens(cache=cache, layers=[0, "final_post"], positions=-1)
    assert from_cache.labels == ["0_pre", "final_post"]
    assert from_cache.entropy.shape == (2, TOKENS.shape[0])
    torch.testing.assert_close(from_cache.entropy, full.entropy[[0, -1], :, -1])
    assert torch.isnan(from_cache.next_token_loss).all()  # no input tokens were given


def test_lens_transform_is_applied_before_the_norm(case):
    _, model = case
    seen = []

    def double(vectors, label):
        seen.append(label)
        return vectors * 2.0

    targets = [3, 17, 40]
    plain = tll.logit_lens(model, TOKENS, norm="none", layers=[1, 2], targets=targets)
    doubled = tll.logit_lens(model, TOKENS, norm="none", layers=[1, 2], targets=targets, lens=double)
    assert (
        seen == plain.labels == ["1_pre", "final_post" if model.cfg.n_layers == 2 else "2_pre"]
    )  # labels, not stack indices
    # Raw logits are affine in the vector: doubling it doubles (logits - b_U).
    b_U = model.b_U.detach()[targets]
    torch.testing.assert_close(doubled.target_logits, 2 * (plain.target_logits - b_U) + b_U, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(TL_MAJOR < 4, reason="transformer_lens.tools.analysis.logit_lens is 4.x only")
def test_agrees_with_transformer_lens_own_logit_lens(case):
    spec, model = case
    if not spec.folded:
        pytest.skip("compared on folded models, where transformer-lens's helper is exact")
    from transformer_lens.tools.analysis import logit_lens as tl_logit_lens

    theirs = tl_logit_lens(model, TOKENS, positions=None, top_k=4, return_type="log_probs")
    ours = tll.logit_lens(model, TOKENS, top_k=4)
    assert theirs.labels == ours.labels
    torch.testing.assert_close(ours.entropy, theirs.readout.entropy.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.top_probs.log(), theirs.readout.values.float(), atol=1e-4, rtol=1e-4)


def test_padded_batch_reads_each_prompt_at_its_own_end():
    model = builders.hf_bridge("gpt2") if builders.TransformerBridge else builders.hooked(tokenizer=True)
    prompts = ["w5 w6 w7 w8 w9 w4", "w3 w4"]  # single-digit words: one token each
    batch = tll.logit_lens(model, prompts, positions=-1, targets="next")
    for i, prompt in enumerate(prompts):
        alone = tll.logit_lens(model, prompt, positions=-1)
        torch.testing.assert_close(batch.entropy[:, i], alone.entropy[:, 0], atol=1e-5, rtol=1e-5)
        assert torch.equal(batch.top_ids[:, i], alone.top_ids[:, 0])
    assert batch.lengths.tolist() == [7, 3]  # BOS + words
    assert batch.positions[:, 0].tolist() == [6, 2]
    assert (batch.next_ids == -1).all()  # nothing follows the last token
    frame = batch.to_dataframe()
    assert set(frame["pos"]) == {6, 2} and len(frame) == len(batch.labels) * 2 * 5


def test_readout_chunking_does_not_change_results(case):
    _, model = case
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
    vectors = torch.stack([cache["blocks.0.hook_resid_pre"], cache["blocks.1.hook_resid_pre"]])
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    one = tll.readout(
        model, vectors, reference=final, next_tokens=torch.full(final.shape[:2], 4), chunk_size=1, targets=[5, 6]
    )
    big = tll.readout(model, vectors, reference=final, next_tokens=torch.full(final.shape[:2], 4), targets=[5, 6])
    for name in ("top_ids", "target_ranks"):
        assert torch.equal(getattr(one, name), getattr(big, name))
    for name in ("entropy", "kl_to_reference", "next_token_loss", "target_probs"):
        torch.testing.assert_close(getattr(one, name), getattr(big, name), atol=1e-5, rtol=1e-5)
    assert one.top_ids.shape == (2, 2, 9, 5)


def _large_vocabulary_model(d_vocab: int, soft_cap: float):
    """A perturbed random model with ``d_vocab`` tokens: HookedTransformer where installed, else a
    Gemma 2 ``TransformerBridge`` (whose final soft cap the bridge applies itself)."""
    if builders.HookedTransformer is not None:
        cfg = builders.HookedTransformerConfig(
            n_layers=2,
            d_model=32,
            n_heads=4,
            d_head=8,
            d_mlp=48,
            d_vocab=d_vocab,
            n_ctx=24,
            act_fn="gelu",
            normalization_type="LN",
            output_logits_soft_cap=soft_cap,
            seed=3,
        )
        model = builders.HookedTransformer(cfg)
    else:
        import transformers as tf

        torch.manual_seed(3)
        hf = tf.Gemma2ForCausalLM(
            tf.Gemma2Config(
                vocab_size=d_vocab,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                final_logit_softcapping=soft_cap or None,
                max_position_embeddings=24,
            )
        )
        path = builders.temp_dir("large-vocab-")
        hf.save_pretrained(path)
        builders.word_tokenizer(d_vocab).save_pretrained(path)
        model = builders.TransformerBridge.boot_transformers(path, device="cpu")
    builders.perturb_(model, 3)
    return model.eval()


@pytest.mark.parametrize("soft_cap", [0.0, 2.0], ids=["plain", "soft-capped"])
def test_large_vocabulary_in_default_tiles(soft_cap):
    """3000 tokens with the shipped tiling: two 1024-column tiles whose top-k comes from
    blocks of 128, then a ragged 952-column tail; the soft cap is applied tile by tile."""
    model = _large_vocabulary_model(3000, soft_cap)
    assert tiles.tile_width(3000, None) == 1024 < 3000
    tokens = torch.randint(0, 3000, (2, 20), generator=torch.Generator().manual_seed(3))
    ref = reference.lens_reference(model, tokens)
    with tuning.force(width=1024):  # the measured width may differ on this machine
        result = tll.logit_lens(model, tokens, targets="next", top_k=5)  # also checks the final entry vs the model
    _assert_top_matches(result.top_ids, result.top_logits, ref["logits"], 5)
    torch.testing.assert_close(result.entropy.double(), ref["entropy"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.kl_to_final.double(), ref["kl"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.next_token_loss[:, :, :-1].double(), ref["loss"], atol=1e-4, rtol=1e-4)
    assert torch.equal(result.target_ranks[:, :, :-1, 0], ref["next_ranks"])
