"""Patchscopes, the batched patched run under them, and generation from a layer.

Every reading is checked against an independent reference: the source cached by the model, the
target run once per (entry, position) with a TransformerLens hook written here that overwrites the
stream, and the model's own logits at the patched position, reduced in float64. A self-patch
(source = target, same entry and position) must read the model's own distribution at every entry.
"""

import dataclasses

import builders
import pretrained
import pytest
import torch

import tl_logitlens as tll
from tl_logitlens.errors import LensInputError, UnsupportedModelError
from tl_logitlens.model_access import StreamPatch, TransformerBridge, capture, patched_rows_per_pass, run_patched

PROMPT = "red cat sun moon red cat"
TOKENS = builders.tokens(batch=2, seq=6, seed=5)  # source ids for the builders' models
TARGET = builders.tokens(batch=1, seq=5, seed=9)[0]  # a target prompt for them, [pos]
_KINDS = [c for c in builders.cases() if c.name in ("ht-ln", "ht-attn-only", "gpt2", "llama-gqa", "neox")]


@pytest.fixture(scope="module")
def demo():
    return tll.demo_model()


@pytest.fixture(params=_KINDS, ids=[c.name for c in _KINDS], scope="module")
def model(request):
    return builders.build(request.param)


def _hook(layer_label: str, n_layers: int) -> str:
    """The hook holding a stack entry, spelt out here (not read from the package)."""
    if layer_label == "final_post":
        return f"blocks.{n_layers - 1}.hook_resid_post"
    layer, where = layer_label.split("_")
    return f"blocks.{layer}.hook_resid_{where}"


def _reference(
    model, source_ids, target_ids, labels, positions, at, target_label=None, carry=None, source=None, read_at=None
):
    """``(logp [entry, batch, n, vocab], source_logp [batch, n, vocab])`` in float64: one hooked target
    run per (entry, prompt, position), each with the source's cached stream written at ``at`` and the
    model's logits read at ``read_at`` (default ``at``)."""
    source = source or model
    n = model.cfg.n_layers
    with torch.no_grad():
        source_logits, cache = source.run_with_cache(source_ids)
    out = torch.empty(len(labels), source_ids.shape[0], len(positions), model.W_U.shape[1], dtype=torch.float64)
    for e, label in enumerate(labels):
        for b in range(source_ids.shape[0]):
            for j, p in enumerate(positions):
                state = cache[_hook(label, source.cfg.n_layers)][b, p]
                state = state if carry is None else carry(state.float()).to(state.dtype)

                def write(act, hook, state=state):
                    act = act.clone()
                    act[:, at] = state
                    return act

                where = _hook(target_label or label, n)
                with torch.no_grad():
                    logits = model.run_with_hooks(target_ids.view(1, -1), fwd_hooks=[(where, write)])
                out[e, b, j] = torch.log_softmax(logits[0, at if read_at is None else read_at].double(), -1)
    source_logp = torch.log_softmax(source_logits[:, positions].double(), -1)
    return out, source_logp


def _assert_reads(result, logp, source_logp=None, atol=2e-5):
    """The result's statistics against full float64 distributions ``logp [entry, batch, n, vocab]``."""
    probs = logp.exp()
    k = result.top_ids.shape[-1]
    torch.testing.assert_close(result.top_probs.double(), probs.topk(k, -1).values, atol=atol, rtol=1e-4)
    assert torch.equal(result.top_ids[..., 0], logp.argmax(-1))
    entropy = -(probs * logp).sum(-1)
    torch.testing.assert_close(result.entropy.double(), entropy, atol=atol * 5, rtol=1e-4)
    if source_logp is not None:
        kl = (source_logp.exp() * (source_logp - logp)).sum(-1)
        torch.testing.assert_close(result.kl_to_final.double(), kl, atol=atol * 5, rtol=1e-4)


# -- the batched patched run ---------------------------------------------------------------------
def test_run_patched_writes_only_its_rows_and_matches_a_hooked_run(demo):
    tokens = demo.to_tokens(PROMPT).repeat(3, 1)
    final = "blocks.1.hook_resid_post"
    clean = capture(demo, tokens, [final])[final][:, -1]
    vectors = torch.randn(2, demo.cfg.d_model, generator=torch.Generator().manual_seed(0))
    patches = [
        StreamPatch("blocks.0.hook_resid_pre", torch.tensor([0]), torch.tensor([3]), vectors[:1]),
        StreamPatch("blocks.1.hook_resid_mid", torch.tensor([2]), torch.tensor([6]), vectors[1:]),
    ]
    read = run_patched(demo, tokens, patches, final, torch.full((3,), 6))
    assert torch.equal(read[1], clean[1])  # row 1 was not patched
    assert not torch.allclose(read[0], clean[0]) and not torch.allclose(read[2], clean[2])
    written = [(0, "blocks.0.hook_resid_pre", 3, vectors[0]), (2, "blocks.1.hook_resid_mid", 6, vectors[1])]
    for row, hook, pos, vec in written:

        def write(act, hook, pos=pos, vec=vec):
            act = act.clone()
            act[:, pos] = vec
            return act

        stream = {}

        def keep(act, hook):
            stream["x"] = act[0, -1].clone()

        with torch.no_grad():
            demo.run_with_hooks(tokens[:1], fwd_hooks=[(hook, write), (final, keep)])
        torch.testing.assert_close(read[row], stream["x"], atol=1e-5, rtol=1e-5)  # batch of 3 vs 1: float32 rounding


def test_run_patched_refuses_a_patch_past_the_read_and_a_wrong_width(demo):
    tokens = demo.to_tokens(PROMPT)
    late = StreamPatch("blocks.1.hook_resid_post", torch.tensor([0]), torch.tensor([1]), torch.zeros(1, 64))
    with pytest.raises(LensInputError, match="never reached hooks \\['blocks.1.hook_resid_post'\\]"):
        run_patched(demo, tokens, [late], "blocks.1.hook_resid_pre", torch.tensor([1]))
    narrow = StreamPatch("blocks.0.hook_resid_pre", torch.tensor([0]), torch.tensor([1]), torch.zeros(1, 8))
    with pytest.raises(LensInputError, match="the activation there is 64 wide"):
        run_patched(demo, tokens, [narrow], "blocks.1.hook_resid_pre", torch.tensor([1]))


def test_rows_per_pass_follows_the_budget(demo):
    one = patched_rows_per_pass(demo, seq=20, budget_bytes=1)
    some = patched_rows_per_pass(demo, seq=20, budget_bytes=2**22)
    assert one == 1 and some > 1
    assert patched_rows_per_pass(demo, seq=40, budget_bytes=2**22) < some  # longer prompts, fewer rows


# -- patchscope against the reference ------------------------------------------------------------
def test_patchscope_matches_hooked_target_runs(model):
    labels = ["0_pre", "1_pre", "final_post"]
    result = tll.patchscope(model, TOKENS, target=TARGET, positions=[2, 5], target_position=3, progress=False)
    assert result.labels == labels and result.lens_name == "patchscope"
    logp, source_logp = _reference(model, TOKENS, TARGET, labels, [2, 5], 3)
    _assert_reads(result, logp, source_logp)
    later = tll.patchscope(
        model, TOKENS, target=TARGET, positions=[2], target_position=1, read_position=-1, progress=False
    )
    logp, source_logp = _reference(model, TOKENS, TARGET, labels, [2], 1, read_at=4)
    _assert_reads(later, logp, source_logp)


def test_patchscope_at_a_fixed_target_layer_with_mids_and_targets(demo):
    ids = demo.to_tokens(PROMPT)
    target = demo.to_tokens("sun moon red sun")[0]
    result = tll.patchscope(
        demo,
        ids,
        target=target,
        layers=["0_mid", "1_pre"],
        positions=-2,
        target_layer="1_pre",
        targets=[5, 9],
        progress=False,
    )
    logp, _ = _reference(demo, ids, target, ["0_mid", "1_pre"], [ids.shape[1] - 2], target.shape[0] - 1, "1_pre")
    _assert_reads(result, logp[:, :, 0])
    torch.testing.assert_close(result.target_probs.double(), logp[:, :, 0][..., [5, 9]].exp(), atol=2e-5, rtol=1e-4)
    assert not result.has_pos_axis


def test_batches_do_not_change_the_reading_and_never_run_row_by_row(demo):
    ids = demo.to_tokens(PROMPT)
    kwargs = dict(target=PROMPT, positions=None, progress=False)
    whole = tll.patchscope(demo, ids, **kwargs)
    rows = 3 * ids.shape[1]
    with builders.CountForwards(demo) as counter:
        tll.patchscope(demo, ids, batch_size=5, **kwargs)
    assert counter.calls == 1 + -(-rows // 5)  # the source once, then ceil(rows / 5) target passes
    with builders.CountForwards(demo) as counter:
        split = tll.patchscope(demo, ids, batch_size=5, **kwargs)
        tll.patchscope(demo, ids, **kwargs)
    assert counter.calls == (1 + -(-rows // 5)) + 2  # batch_size=None: every row in one pass here
    torch.testing.assert_close(split.top_probs, whole.top_probs, atol=1e-6, rtol=1e-6)
    assert torch.equal(split.top_ids, whole.top_ids)


# -- a self-patch is an identity -----------------------------------------------------------------
def _assert_self_patch(model, prompt, position=-1, atol=2e-5):
    """Every entry of a self-patch reads the model's own distribution at ``position``."""
    result = tll.patchscope(model, prompt, target=prompt, positions=position, target_position=position, progress=False)
    ids = prompt if isinstance(prompt, torch.Tensor) else model.to_tokens(prompt)
    with torch.no_grad():
        logits = model(ids.view(1, -1).to(model.W_E.device))
        own = torch.log_softmax(logits[0, position].double(), -1).cpu()
    n = len(result.labels)
    _assert_reads(result, own.expand(n, 1, -1), own.expand(1, -1), atol=atol)
    assert float(result.kl_to_final.abs().max()) <= 1e-5
    return result


def test_self_patch_is_the_identity_on_every_builder_model(model):
    _assert_self_patch(model, TOKENS[0])
    _assert_self_patch(model, TOKENS[0], position=2)


def test_self_patch_is_the_identity_on_the_demo_model(demo):
    result = _assert_self_patch(demo, PROMPT)
    assert result.labels == ["0_pre", "1_pre", "final_post"]


@pytest.mark.skipif(TransformerBridge is None, reason="the real models boot through TransformerBridge (3.x/4.x)")
def test_self_patch_is_the_identity_on_the_real_models(models_dir):
    stories = TransformerBridge.boot_transformers(str(models_dir / "stories260k"), device="cpu").eval()
    _assert_self_patch(stories, "Once upon a time, there was a little girl named Lily.")
    capp = TransformerBridge.boot_transformers(str(models_dir / "capp-gpt2"), device="cpu").eval()
    _assert_self_patch(capp, torch.tensor([49, 12, 7, 20, 33, 50]), position=-2)


def test_self_patch_in_half_precision_reads_the_models_own_prediction():
    model = (
        builders.hf_bridge("gpt2", dtype=torch.bfloat16)
        if TransformerBridge
        else builders.hooked("LN", dtype=torch.bfloat16)
    )
    result = tll.patchscope(model, TOKENS[0], target=TOKENS[0], progress=False)
    own = tll.logit_lens(model, TOKENS[:1], positions=-1, layers=["final_post"])  # checked against the model
    for k in range(len(result.labels)):
        assert torch.equal(result.top_ids[k, 0], own.top_ids[0, 0])
        # The same bfloat16 stream; only the kernel's float32 summation order may differ.
        torch.testing.assert_close(result.top_probs[k, 0], own.top_probs[0, 0], atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_self_patch_and_generation_on_cuda(dtype):
    if TransformerBridge is not None:
        model = builders.hf_bridge("llama", dtype=dtype, device="cuda")
    else:
        model = builders.hooked("RMS", gated=True, rotary=True, n_kv=2, tokenizer=True, dtype=dtype, device="cuda")
    result = tll.patchscope(model, TOKENS[0], target=TOKENS[0], progress=False)
    own = tll.logit_lens(model, TOKENS[:1], positions=-1, layers=["final_post"])  # checked against the model
    assert torch.equal(result.top_ids[:, 0], own.top_ids[0, 0].expand(len(result.labels), -1))
    assert result.top_probs.device.type == "cpu"
    text = tll.LogitLens().generate(model, TOKENS[0], layer="final_post", max_new_tokens=4)
    assert text == model.tokenizer.decode(_greedy(model, TOKENS[:1].cuda(), 4))


# -- mapping a state into another model ----------------------------------------------------------
def test_an_identity_mapping_changes_nothing_and_a_module_equals_its_weights(demo):
    eye = (torch.eye(64), torch.zeros(64))
    plain = tll.patchscope(demo, PROMPT, target=PROMPT, progress=False)
    mapped = tll.patchscope(demo, PROMPT, target=PROMPT, mapping=eye, progress=False)
    torch.testing.assert_close(mapped.top_probs, plain.top_probs, atol=1e-6, rtol=0)
    linear = torch.nn.Linear(64, 64)
    by_module = tll.patchscope(demo, PROMPT, target=PROMPT, mapping=linear, progress=False)
    by_pair = tll.patchscope(
        demo, PROMPT, target=PROMPT, mapping=(linear.weight.detach(), linear.bias.detach()), progress=False
    )
    torch.testing.assert_close(by_module.top_probs, by_pair.top_probs, atol=1e-6, rtol=0)
    assert not torch.allclose(by_module.top_probs, plain.top_probs)


@pytest.mark.skipif(TransformerBridge is None, reason="needs two models of different widths (3.x/4.x bridges)")
def test_a_state_of_another_model_is_read_through_the_mapping(demo):
    other = builders.hf_bridge("gpt2")  # d_model 32, 2 layers, its own vocabulary
    ids = TOKENS[:1]
    with torch.no_grad():
        _, cache = other.run_with_cache(ids)
    g = torch.Generator().manual_seed(3)
    A, b = torch.randn(64, 32, generator=g) / 4, torch.randn(64, generator=g)
    result = tll.patchscope(demo, cache, mapping=(A, b), target=PROMPT, positions=[1, 4], progress=False)
    target = demo.to_tokens(PROMPT)[0]
    logp, _ = _reference(
        demo, ids, target, result.labels, [1, 4], target.shape[0] - 1, carry=lambda h: h @ A.T + b, source=other
    )
    _assert_reads(result, logp)
    assert bool(result.kl_to_final.isnan().all()) and result.input_ids is None  # another model's distribution


@pytest.mark.skipif(TransformerBridge is None, reason="needs two models of different widths (3.x/4.x bridges)")
def test_mapping_errors_come_before_any_forward_pass(demo):
    other = builders.hf_bridge("gpt2")
    with torch.no_grad():
        _, cache = other.run_with_cache(TOKENS[:1])
    refuse = lambda match, **kw: builders.raises_before_forward(  # noqa: E731
        demo, LensInputError, match, lambda: tll.patchscope(demo, cache, target=PROMPT, progress=False, **kw)
    )
    refuse("states are 32 wide but the target model's stream is 64 wide; pass mapping=")
    refuse(
        "A has shape \\(32, 64\\); it must be \\[d_target, d_source\\] = \\[64, 32\\]",
        mapping=(torch.zeros(32, 64), None),
    )
    refuse("b must be None or a tensor \\[64\\]", mapping=(torch.zeros(64, 32), torch.zeros(32)))
    refuse("mapping turns \\[2, 32\\] source states into torch.Size\\(\\[2, 48\\]\\)", mapping=torch.nn.Linear(32, 48))
    refuse("mapping must be \\(A, b\\), a torch Module or a callable", mapping="identity")
    refuse("layer '5_pre' is not a stack entry", target_layer="5_pre", mapping=torch.nn.Linear(32, 64))


# -- the result works like any lens's ------------------------------------------------------------
def test_the_result_plots_tabulates_and_reads_groups_and_next_tokens(demo, tmp_path):
    result = tll.patchscope(
        demo,
        [PROMPT, "sun moon"],
        target=PROMPT,
        positions=None,
        targets={"cats": ["cat"], "sky": ["sun", "moon"]},
        progress=False,
    )
    frame = result.to_dataframe()
    assert set(frame["layer"]) == {"0_pre", "1_pre", "final_post"} and len(frame) == 3 * (7 + 3) * 5
    assert len(result.groups_dataframe()) == 3 * (7 + 3) * 2
    assert "lens='patchscope'" in repr(result)
    result.plot()
    nxt = tll.patchscope(demo, PROMPT, target=PROMPT, positions=None, targets="next", progress=False)
    assert int(nxt.target_ids[0, 0, -1, 0]) == -1 and bool(nxt.next_token_loss[:, 0, :-1].isfinite().all())
    pytest.importorskip("plotly")
    result.to_html(tmp_path / "scope.html")
    assert (tmp_path / "scope.html").stat().st_size > 0


def test_bad_arguments_are_refused_before_any_forward_pass(demo):
    def refuse(match, **kwargs):
        builders.raises_before_forward(
            demo, LensInputError, match, lambda: tll.patchscope(demo, PROMPT, **{"progress": False, **kwargs})
        )

    refuse("target must be one prompt", target=["red cat", "sun"])
    refuse("target_position must be an int", target=PROMPT, target_position=1.0)
    refuse("position 9 is out of range", target=PROMPT, target_position=9)
    refuse("layer 'final_pre' is not a stack entry", target=PROMPT, layers=["final_pre"])
    refuse("layer 7 is out of range", target=PROMPT, target_layer=7)
    refuse("batch_size must be a positive int", target=PROMPT, batch_size=0)
    refuse("top_k must be an int", target=PROMPT, top_k=0)
    refuse("progress must be True or False", target=PROMPT, progress="yes")
    refuse(
        "read_position -3 is target position 4, before the patched position 5",
        target=PROMPT,
        target_position=5,
        read_position=-3,
    )
    refuse("read_position must be an int", target=PROMPT, read_position="last")
    refuse("position 12 is out of range", target=PROMPT, positions=12)
    with torch.no_grad():
        _, cache = demo.run_with_cache(demo.to_tokens(PROMPT))
    builders.raises_before_forward(
        demo,
        LensInputError,
        "targets='next' needs the input tokens",
        lambda: tll.patchscope(demo, cache, target=PROMPT, targets="next", progress=False),
    )


def test_a_model_the_package_cannot_reproduce_is_refused(demo, monkeypatch):
    from tl_logitlens.inputs import resolve

    real = resolve.view_model

    def shifted(model):
        v = real(model)
        own = v.unembedding

        def unembedding(unembed="W_U"):  # a logit transform the model does not apply
            return dataclasses.replace(own(unembed), transform=lambda logits: logits * 3)

        v.unembedding = unembedding
        return v

    monkeypatch.setattr("tl_logitlens.inputs.resolve.view_model", shifted)
    with pytest.raises(UnsupportedModelError, match="differs from the model's own prediction"):
        tll.patchscope(demo, PROMPT, target=PROMPT, progress=False)


# -- source_token_rate ----------------------------------------------------------------------------
def test_source_token_rate_counts_real_cells(demo):
    result = tll.logit_lens(demo, [PROMPT, "sun moon"], top_k=3)
    rates = tll.source_token_rate(result, of="prediction")
    assert rates["final_post"] == 1.0
    top = result.top_ids[..., 0]
    inputs = result.input_ids
    real = result.positions < result.lengths.unsqueeze(1)
    by_hand = [(top[e][real] == inputs[real]).float().mean().item() for e in range(3)]
    assert list(tll.source_token_rate(result, of="input").values()) == pytest.approx(by_hand)
    top3 = tll.source_token_rate(result, of="input", k=3)
    assert all(top3[label] >= rate for label, rate in zip(result.labels, by_hand))
    with pytest.raises(LensInputError, match="k must be an int in \\[1, 3\\]"):
        tll.source_token_rate(result, k=4)
    with pytest.raises(LensInputError, match='of must be "input", "prediction" or a tensor of token ids'):
        tll.source_token_rate(result, of="output")
    given = result.input_ids[:, : result.positions.shape[1]]  # the input ids, passed as ids: the same rates
    assert tll.source_token_rate(result, of=given) == tll.source_token_rate(result, of="input")
    with pytest.raises(LensInputError, match="shaped like the result's cells \\(2, 7\\), got \\(2, 3\\)"):
        tll.source_token_rate(result, of=given[:, :3])
    with pytest.raises(LensInputError, match="compares with the final_post entry"):
        tll.source_token_rate(tll.logit_lens(demo, PROMPT, layers=[0]), of="prediction")


# -- generation from a layer ----------------------------------------------------------------------
def _greedy(model, ids, n):
    """The model's own greedy continuation ``[n]`` (one full forward pass per token, stopping at EOS)."""
    eos = getattr(model.tokenizer, "eos_token_id", None) if getattr(model, "tokenizer", None) else None
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(ids)[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]], device=ids.device)], 1)
    return out


def test_generating_from_the_final_layer_is_the_models_own_greedy_decoding(demo):
    ids = demo.to_tokens(PROMPT)
    text = tll.LogitLens().generate(demo, PROMPT, layer="final_post", max_new_tokens=6)
    assert text == demo.tokenizer.decode(_greedy(demo, ids, 6))
    own = demo.generate(PROMPT, max_new_tokens=6, do_sample=False, use_past_kv_cache=False, verbose=False)
    assert own == f"{PROMPT} {text}"
    # Several prompts of different lengths, right-padded: each continues as it would alone.
    both = tll.LogitLens().generate(demo, [PROMPT, "sun moon"], layer=-1, max_new_tokens=4)
    assert both == [tll.LogitLens().generate(demo, p, layer=-1, max_new_tokens=4) for p in (PROMPT, "sun moon")]


@pytest.mark.skipif(TransformerBridge is None, reason="the real models boot through TransformerBridge (3.x/4.x)")
def test_generating_from_the_final_layer_of_real_models(models_dir):
    stories = TransformerBridge.boot_transformers(str(models_dir / "stories260k"), device="cpu").eval()
    ids = stories.to_tokens("Once upon a time")
    text = tll.LogitLens().generate(stories, ids[0], layer="final_post", max_new_tokens=12)
    assert text == stories.tokenizer.decode(_greedy(stories, ids, 12))
    assert "Lily" in text or len(text) > 10  # a trained story model writes a story


def test_generating_through_a_lens_at_an_inner_layer_reads_that_layer(demo):
    lens = builders.randomise_lens(tll.TunedLens(demo), seed=1)
    ids = demo.to_tokens(PROMPT)
    ours = tll.TunedLens.generate(lens, demo, ids[0], layer="1_pre", max_new_tokens=4)
    # The reference: capture 1_pre at the last token, the translator, ln_final and W_U in float64.
    from reference import final_norm64

    new = []
    for _ in range(4):
        with torch.no_grad():
            _, cache = demo.run_with_cache(ids)
            h = cache["blocks.1.hook_resid_pre"][0, -1]
            h = lens.transform(h, "1_pre")
            logits = final_norm64(demo, h) @ demo.W_U.double() + demo.b_U.double()
        token = int(logits.argmax())
        if token == demo.tokenizer.eos_token_id:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    assert len(new) == 4 and ours == demo.tokenizer.decode(new)
    zero = tll.TunedLens(demo).generate(demo, PROMPT, layer="1_pre", max_new_tokens=4)  # a fresh lens is the identity
    assert zero == tll.LogitLens().generate(demo, PROMPT, layer="1_pre", max_new_tokens=4)


def test_sampling_is_seeded(demo):
    draw = lambda seed: tll.LogitLens().generate(demo, PROMPT, layer=1, max_new_tokens=8, do_sample=True, seed=seed)  # noqa: E731
    assert draw(0) == draw(0)
    assert len({draw(s) for s in range(6)}) > 1


def test_generation_errors_come_before_any_forward_pass(demo):
    lens = tll.LogitLens()
    for match, kwargs in [
        ("layer must be one stack entry", dict(layer=[0, 1])),
        ("max_new_tokens must be a positive int", dict(layer=0, max_new_tokens=0)),
        ("do_sample must be True", dict(layer=0, do_sample=1)),
        ("more than the model's context", dict(layer=0, max_new_tokens=500)),
        ("layer 'final' is not a stack entry", dict(layer="final")),
    ]:
        builders.raises_before_forward(demo, LensInputError, match, lambda kw=kwargs: lens.generate(demo, PROMPT, **kw))


def test_patchscope_generate_self_patch_continues_like_the_model(demo):
    said = tll.patchscope_generate(demo, PROMPT, layer=[0, "0_mid", 1, "final_post"], target=PROMPT, max_new_tokens=5)
    own = tll.LogitLens().generate(demo, PROMPT, layer="final_post", max_new_tokens=5)
    assert said == {label: own for label in ("0_pre", "0_mid", "1_pre", "final_post")}


def test_patchscope_generate_matches_a_hooked_decoding(demo):
    source, target = demo.to_tokens("sun moon red sun"), demo.to_tokens(PROMPT)
    said = tll.patchscope_generate(
        demo, source[0], layer="1_pre", position=2, target=target[0], max_new_tokens=4, target_position=3
    )
    with torch.no_grad():
        _, cache = demo.run_with_cache(source)
    state = cache["blocks.1.hook_resid_pre"][0, 2]

    def write(act, hook):
        act = act.clone()
        act[:, 3] = state
        return act

    ids, new = target, []
    for _ in range(4):
        with torch.no_grad():
            token = int(demo.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_pre", write)])[0, -1].argmax())
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    assert said == demo.tokenizer.decode(new)
    with pytest.raises(LensInputError, match="reads one source prompt, got 2"):
        tll.patchscope_generate(demo, [PROMPT, "sun"], layer=0, target=PROMPT)


@pytest.mark.real
@pytest.mark.skipif(TransformerBridge is None, reason="the real models boot through TransformerBridge (3.x/4.x)")
@pytest.mark.parametrize("name", pretrained.NAMES)
def test_real_pretrained_self_patch_and_generation(name):
    """SmolLM2-135M and Gemma-3-270m (the ``real`` tier, ``make test-real``; skipped when not fetched)."""
    model = TransformerBridge.boot_transformers(str(pretrained.folder(name)), device="cpu").eval()
    result = _assert_self_patch(model, pretrained.PROMPTS[1])
    assert len(result.labels) == model.cfg.n_layers + 1
    ids = model.to_tokens(pretrained.PROMPTS[0])
    text = tll.LogitLens().generate(model, ids[0], layer="final_post", max_new_tokens=5)
    assert text == model.tokenizer.decode(_greedy(model, ids, 5))
