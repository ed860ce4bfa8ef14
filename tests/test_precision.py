"""bfloat16, float16 and float64 models: every statistic against a float64 reference, the
identities at the precision that can hold them, and refusals that name their real cause.

The references here never call tl_logitlens: they take the activations the model stored
(half precision), upcast them and the model's weights to float64, and apply the textbook
formulas. The package computes in float32 from the same stored values, so it must agree
with them to float32 precision (1e-4), whatever the model's dtype. Only the comparison with
the model's *own* half-precision logits needs a tolerance from the dtype, computed here
independently: the model rounds its normalised stream ``n`` and its logits ``l`` once each
to its dtype, so a logit moves by at most ``delta = 2 * eps * (|l| + |n| @ |W_U[:, j]|)``.
"""

import builders
import pytest
import reference
import torch

import tl_logitlens as tll
from tl_logitlens.errors import UnsupportedModelError
from tl_logitlens.evaluate import evaluate_lens
from tl_logitlens.kernel import tiles
from tl_logitlens.model_access import TransformerBridge

GRID = builders.precision_cases((torch.bfloat16, torch.float16, torch.float64))
TOKENS = builders.tokens(batch=2, seq=9, seed=3)
ANSWERS = torch.tensor([5, 9])
WRONG = torch.tensor([7, 30])
HALF = (torch.bfloat16, torch.float16)


@pytest.fixture(params=GRID, ids=[c.name for c in GRID])
def pmodel(request):
    return builders.build(request.param)


# -- float64 references (no tl_logitlens) --------------------------------------------------
def _eps_of_norm(model):
    ln = model.ln_final
    inner = getattr(ln, "original_component", None) or ln
    for name in ("eps", "variance_epsilon"):
        value = getattr(inner, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return float(model.cfg.eps)


def _norm64(model, x, scale=None):
    """The final norm in float64 on ``x [..., d]``: own statistics, or a given ``scale [..., 1]``."""
    kind = str(model.cfg.normalization_type)
    weight, bias = reference.norm_affine(model)
    if kind.startswith("LN"):
        x = x - x.mean(-1, keepdim=True)
    if scale is None:
        scale = (x.pow(2).mean(-1, keepdim=True) + _eps_of_norm(model)).sqrt()
    x = x / scale
    if weight is not None:
        x = x * weight.to(x.device).double()
    if bias is not None:
        x = x + bias.to(x.device).double()
    return x


def _unembed64(model):
    b_U = getattr(model, "b_U", None)
    W_U = model.W_U.detach().double()
    return W_U, (torch.zeros(W_U.shape[1], dtype=torch.float64) if b_U is None else b_U.detach().double())


def lens64(model, tokens):
    """Logit-lens statistics ``[layer, batch, pos]`` from the stored stream, in float64."""
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens.to(model.W_E.device))
    W_U, b_U = _unembed64(model)
    n = model.cfg.n_layers
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    stack = torch.stack([cache[name].to(W_U.device) for name in names])  # a split model's layers, gathered
    final_stored = stack[-1]
    out = _norm64(model, stack.double()) @ W_U + b_U
    logp = torch.log_softmax(out, -1)
    nxt = tokens[:, 1:].to(out.device).unsqueeze(0).unsqueeze(-1).expand(out.shape[0], -1, -1, 1)
    target = out[:, :, :-1].gather(-1, nxt)
    out_cpu = {
        "logits": out,
        "entropy": -(logp.exp() * logp).sum(-1),
        "kl": (logp[-1].exp() * (logp[-1] - logp)).sum(-1),
        "loss": -logp[:, :, :-1].gather(-1, nxt)[..., 0],
        "target_logits": target[..., 0],
        "rank_low": (out[:, :, :-1] > target + 1e-4).sum(-1),
        "rank_high": (out[:, :, :-1] > target - 1e-4).sum(-1),
        "model_logits": logits,
        "final_stored": final_stored,
    }
    return {**{k: v.cpu() for k, v in out_cpu.items()}, "cache": cache}


def _prob_tolerance(model, logits, final_stored, p):
    """Bound on |p_reading - p_model| for probabilities ``p [batch, pos, k]`` (the larger
    reading) from the model's dtype: a logit and log Z move by delta each (module docstring)."""
    eps = torch.finfo(logits.dtype).eps
    n = _norm64(model, final_stored.to(model.W_U.device).double()).cpu()  # [batch, pos, d]
    W_U, _ = _unembed64(model)
    W_U = W_U.cpu()
    size = n.norm(dim=-1) * W_U.norm(dim=0).max()  # Cauchy-Schwarz: >= sum_i |n_i W_ij|
    delta = 2 * eps * (logits.double().abs().amax(-1) + size)
    return (p * torch.expm1(2 * delta).unsqueeze(-1)).clamp_min(1e-3)


def dla64(model, cache, answers, wrong, pos=-1):
    """Per-component contributions (plus the stored stream's rounding) at ``pos``, in float64."""
    n_layers = model.cfg.n_layers
    W_U, b_U = _unembed64(model)
    final = cache[f"blocks.{n_layers - 1}.hook_resid_post"][:, pos].to(W_U.device).double()
    answers, wrong = answers.to(W_U.device), wrong.to(W_U.device)
    u = (W_U[:, answers] - W_U[:, wrong]).T
    kind = str(model.cfg.normalization_type)
    centred = final - final.mean(-1, keepdim=True) if kind.startswith("LN") else final
    scale = (centred.pow(2).mean(-1, keepdim=True) + _eps_of_norm(model)).sqrt()
    weight, bias = reference.norm_affine(model)
    names = ["hook_embed"] + (["hook_pos_embed"] if "hook_pos_embed" in cache.cache_dict else [])
    for layer in range(n_layers):
        names += [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]
    pieces = [cache[name][:, pos].to(final.device).double() for name in names]
    pieces.append(final - sum(pieces))  # what the model's roundings added

    def contrib(p):
        x = p - p.mean(-1, keepdim=True) if kind.startswith("LN") else p
        x = x / scale
        if weight is not None:
            x = x * weight.to(x.device).double()
        return (x * u).sum(-1)

    b_diff = b_U[answers] - b_U[wrong]
    constant = b_diff + ((u * bias.to(u.device).double()).sum(-1) if bias is not None else 0)
    model_value = (_norm64(model, final) * u).sum(-1) + b_diff
    normed = _norm64(model, final)
    sizes = normed.abs() @ W_U.abs()  # [batch, vocab]: sum_i |n_i W_ij|
    return {
        "values": torch.stack([contrib(p) for p in pieces]).cpu(),
        "constant": constant.cpu(),
        "model_value": model_value.cpu(),
        "sizes": sizes.cpu(),
    }


# -- the grid -------------------------------------------------------------------------------
@pytest.fixture(params=[None, (7, 128), (16, 8)], ids=["one-tile", "tiles-of-7", "top-k-blocks"])
def tiling(request, monkeypatch):
    """The vocabulary read whole or in tiles, so the per-tile cast of a half-precision W_U is exercised."""
    if request.param is not None:
        monkeypatch.setattr(tiles, "TILE_COLUMNS", request.param[0])
        monkeypatch.setattr(tiles, "_TOPK_BLOCK", request.param[1])


def test_every_lens_statistic_matches_float64_reference(pmodel, tiling):
    ref = lens64(pmodel, TOKENS)
    result = tll.logit_lens(pmodel, TOKENS, targets="next", top_k=3)
    assert result.entropy.dtype == torch.float32 and result.entropy.device.type == "cpu"
    close = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.entropy.double(), ref["entropy"], **close)
    torch.testing.assert_close(result.kl_to_final.double(), ref["kl"], **close)
    torch.testing.assert_close(result.next_token_loss[:, :, :-1].double(), ref["loss"], **close)
    torch.testing.assert_close(result.top_logits.double(), ref["logits"].topk(3, -1).values, **close)
    torch.testing.assert_close(result.target_logits[:, :, :-1, 0].double(), ref["target_logits"], **close)
    ranks = result.target_ranks[:, :, :-1, 0]
    assert bool(((ranks >= ref["rank_low"]) & (ranks <= ref["rank_high"])).all())


def test_final_entry_agrees_with_the_models_own_logits_at_dtype_tolerance(pmodel):
    ref = lens64(pmodel, TOKENS)
    result = tll.logit_lens(pmodel, TOKENS, top_k=5)  # would raise if the package's own check failed
    own = torch.softmax(ref["model_logits"].double(), -1).gather(-1, result.top_ids[-1])
    ours = result.top_probs[-1].double()
    gap = (own - ours).abs()
    tol = _prob_tolerance(pmodel, ref["model_logits"], ref["final_stored"], torch.maximum(own, ours))
    assert bool((gap <= tol).all()), (gap.max().item(), tol.min().item())
    if pmodel.W_U.dtype == torch.float64:
        assert gap.max().item() <= 1e-6


@pytest.mark.parametrize("by", ["component", "head", "neuron"])
def test_dla_identity_holds_with_the_rounding_entry(pmodel, by):
    att = tll.direct_logit_attribution(pmodel, TOKENS, answers=ANSWERS, wrong=WRONG, by=by)
    half = pmodel.W_U.dtype in HALF
    assert (att.labels[-1] == "rounding") == half
    assert att.values.dtype == torch.float32 and att.values.device.type == "cpu"
    assert (att.values.sum(0) + att.constant - att.model_value).abs().max().item() <= 1e-4
    if half:
        assert att.rounding_error == pytest.approx(att.values[-1].abs().max().item())
        assert att.rounding_error > 0  # a half-precision stream really is rounded
    else:
        assert att.rounding_error == 0.0


def test_dla_components_match_float64_reference(pmodel):
    with torch.no_grad():
        logits, cache = pmodel.run_with_cache(TOKENS)
    ref = dla64(pmodel, cache, ANSWERS, WRONG)
    att = tll.direct_logit_attribution(pmodel, TOKENS, answers=ANSWERS, wrong=WRONG, by="component")
    half = pmodel.W_U.dtype in HALF
    expected = ref["values"] if half else ref["values"][:-1]
    torch.testing.assert_close(att.values.double(), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(att.constant.double(), ref["constant"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(att.model_value.double(), ref["model_value"], atol=1e-4, rtol=1e-4)
    # Against the model's own (rounded) logits: within the dtype's rounding of two logits.
    last = logits[:, -1].double()
    rows = torch.arange(2)
    own = last[rows, ANSWERS] - last[rows, WRONG]
    eps = torch.finfo(logits.dtype).eps
    budget = sum(last[rows, t].abs() + ref["sizes"][rows, t] for t in (ANSWERS, WRONG))
    gap = (att.model_value.double() - own).abs()
    assert bool((gap <= 2 * eps * budget + 1e-4 * (1 + own.abs())).all()), gap


def test_residual_stack_adds_up_to_the_stored_stream(pmodel):
    with torch.no_grad():
        _, cache = pmodel.run_with_cache(TOKENS)
    final = cache[f"blocks.{pmodel.cfg.n_layers - 1}.hook_resid_post"].double()
    for by in ("component", "head", "neuron"):
        stack = tll.residual_stack(cache, by=by)
        assert stack.values.device.type == "cpu"
        assert (stack.labels[-1] == "rounding") == (pmodel.W_U.dtype in HALF)
        gap = (stack.values.sum(0).double() - final).abs().max().item()
        assert gap <= 1e-5 * max(1.0, final.abs().max().item()), (by, gap)
    accumulated = tll.residual_stack(cache, by="accumulated")
    assert "rounding" not in accumulated.labels
    assert torch.equal(accumulated.values[-1].double(), final)  # the stored stream, upcast exactly


def test_evaluate_lens_matches_float64_reference(pmodel):
    data = builders.tokens(batch=4, seq=9, seed=5)
    ev = evaluate_lens(pmodel, data, batch_size=2, progress=False)
    ref = lens64(pmodel, data)
    for name, key in (("kl_to_final", "kl"), ("entropy", "entropy")):
        torch.testing.assert_close(ev.mean(name), ref[key][:, :, :-1].mean((1, 2)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ev.mean("next_token_loss"), ref["loss"].mean((1, 2)), atol=1e-4, rtol=1e-4)
    assert ev.top1_agreement[-1] == 1.0


# -- refusals that name their real cause ----------------------------------------------------
def _half_case(name):
    for case in GRID:
        if case.name == name:
            return builders.build(case)
    pytest.skip(f"{name} is not buildable on this transformer-lens")


@pytest.fixture(params=["gpt2-bf16", "ht-ln-folded-f16"])
def half_model(request):
    return _half_case(request.param)


def test_rounding_guard_refuses_a_stream_the_pieces_do_not_explain(half_model):
    with torch.no_grad():
        _, cache = half_model.run_with_cache(TOKENS)
    name = f"blocks.{half_model.cfg.n_layers - 1}.hook_resid_post"
    final = cache.cache_dict[name]
    dtype = str(final.dtype).replace("torch.", "")
    # A write the decomposition misses (like a scaled embedding), far above any rounding.
    cache.cache_dict[name] = final.clone()
    cache.cache_dict[name][:, -1, 3] += final.abs().max() * 0.5 + 1
    with pytest.raises(UnsupportedModelError, match=rf"{dtype} rounding explains at most .*precision is not the cause"):
        tll.direct_logit_attribution(cache=cache, answers=ANSWERS, wrong=WRONG)
    with pytest.raises(UnsupportedModelError, match=rf"{dtype} rounding explains"):
        tll.residual_stack(cache, by="head")
    # A difference of one rounding step is what half precision does: accepted, and reported.
    cache.cache_dict[name] = final.clone()
    cache.cache_dict[name][:, -1, 3] = torch.nextafter(final[:, -1, 3], final[:, -1, 3] * 2)
    att = tll.direct_logit_attribution(cache=cache, answers=ANSWERS, wrong=WRONG)
    assert att.labels[-1] == "rounding" and att.rounding_error > 0


def _bump_logits(model):
    """A forward hook that adds 4 to token 3's logit: an extra head module the package cannot see."""

    def hook(module, inputs, output):
        output = output.clone()
        output[..., 3] += 4
        return output

    return model.unembed.register_forward_hook(hook)


def test_logit_checks_refuse_an_extra_head_module_in_half_precision(half_model):
    handle = _bump_logits(half_model)
    try:
        with torch.no_grad():
            if not torch.equal(half_model(TOKENS)[..., 3], half_model(TOKENS)[..., 3]):
                pytest.skip("nondeterministic forward")
        with pytest.raises(UnsupportedModelError, match=r"rounding explains: the model transforms"):
            tll.logit_lens(half_model, TOKENS)
        with pytest.raises(UnsupportedModelError, match=r"rounding explains: the model does something after ln_final"):
            tll.direct_logit_attribution(half_model, TOKENS, answers=torch.tensor([3, 3]), wrong=WRONG)
    finally:
        handle.remove()


@pytest.mark.skipif(TransformerBridge is None, reason="HF Llama modules boot through TransformerBridge")
def test_norm_probe_runs_in_half_precision(monkeypatch):
    model = _half_case("llama-gqa-bf16")
    inner = model.ln_final.original_component
    forward = inner.forward
    monkeypatch.setattr(inner, "forward", lambda x: 2 * forward(x))  # Gemma-like twist: not weight * x / rms
    with pytest.raises(UnsupportedModelError, match=r"does not behave as a RMS norm .* rounding of torch.bfloat16"):
        tll.logit_lens(model, TOKENS)


# -- real models ----------------------------------------------------------------------------
STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def real(request, models_dir):
    if TransformerBridge is None:
        pytest.skip("the real models boot through TransformerBridge (3.x/4.x)")
    stories = TransformerBridge.boot_transformers(
        str(models_dir / "stories260k"), device="cpu", dtype=request.param
    ).eval()
    capp = TransformerBridge.boot_transformers(str(models_dir / "capp-gpt2"), device="cpu", dtype=request.param).eval()
    capp_tokens = torch.tensor([[49, 3, 7, 12, 20, 50, 30, 31], [49, 4, 8, 15, 50, 33, 34, 35]])
    return [(stories, stories.to_tokens(STORY)), (capp, capp_tokens)]


def test_real_models_in_half_precision(real):
    for model, tokens in real:
        ref = lens64(model, tokens)
        result = tll.logit_lens(model, tokens, targets="next")
        close = dict(atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(result.entropy.double(), ref["entropy"], **close)
        torch.testing.assert_close(result.kl_to_final.double(), ref["kl"], **close)
        torch.testing.assert_close(result.next_token_loss[:, :, :-1].double(), ref["loss"], **close)
        own = torch.softmax(ref["model_logits"].double(), -1).gather(-1, result.top_ids[-1])
        ours = result.top_probs[-1].double()
        tol = _prob_tolerance(model, ref["model_logits"], ref["final_stored"], torch.maximum(own, ours))
        assert bool(((own - ours).abs() <= tol).all())
        batch = tokens.shape[0]
        answers, wrong = tokens[:, -1], tokens[:, 1]
        for by in ("component", "head", "neuron"):
            att = tll.direct_logit_attribution(model, tokens[:, :-1], answers=answers, wrong=wrong, by=by)
            assert att.labels[-1] == "rounding" and att.values.shape[1] == batch
            assert (att.values.sum(0) + att.constant - att.model_value).abs().max().item() <= 1e-4
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens[:, :-1])
        ref_dla = dla64(model, cache, answers, wrong)
        att = tll.direct_logit_attribution(model, tokens[:, :-1], answers=answers, wrong=wrong)
        torch.testing.assert_close(att.values.double(), ref_dla["values"], atol=1e-4, rtol=1e-4)


def test_half_unembedding_is_read_tile_by_tile_never_copied_whole(monkeypatch):
    model = _half_case("gpt2-bf16") if TransformerBridge is not None else _half_case("ht-ln-folded-bf16")
    monkeypatch.setattr(tiles, "TILE_COLUMNS", 16)
    whole = model.W_U.numel()
    copies = []
    for name in ("to", "float", "double", "type"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            if out is not self and out.numel() >= whole and out.dtype != self.dtype and out.ndim == 2:
                copies.append((tuple(out.shape), "".join(__import__("traceback").format_stack(limit=4)[:-1])))
            return out

        monkeypatch.setattr(torch.Tensor, name, spy)
    tll.logit_lens(model, TOKENS, targets="next")
    tll.direct_logit_attribution(model, TOKENS, answers=ANSWERS, wrong=WRONG, by="head")
    monkeypatch.undo()
    assert copies == []
