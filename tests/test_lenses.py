"""The Lens interface, TunedLens and the tuned-lens 0.2.0 file format.

Expected numbers come from tests/reference.py-style full-logit code applied to translated
cached streams, never from tl_logitlens.
"""

import hashlib
import json
import warnings

import builders
import numpy as np
import pytest
import reference
import torch

import tl_logitlens as tll
from tl_logitlens.errors import LensInputError, ModelStateError, NonFiniteActivationError
from tl_logitlens.evaluate import LensEvaluation, evaluate_lens
from tl_logitlens.model_access import HookedTransformer

TOKENS = builders.tokens(batch=2, seq=9)


def _plain():
    # A LayerNorm model whose stream is the Hugging Face one, on every supported version.
    return builders.hooked("LN") if HookedTransformer is not None else builders.native_bridge("LN")


def _centred():
    # LayerNorm with centred writing weights: the stream differs from Hugging Face hidden states.
    return (
        builders.hooked("LN", fold=True) if HookedTransformer is not None else builders.native_bridge("LN", compat=True)
    )


@pytest.fixture(scope="module")
def model():
    return _plain()


def _reference(model, tokens, params, incl_mid):
    """Full-logit statistics of the translated streams; ``params`` maps label -> (A, b) as float64."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        labels, stack = reference.accumulated(model, cache, incl_mid)
        moved = []
        for label, h in zip(labels, stack):
            if label in params:
                A, b = params[label]
                h64 = h.double()
                h = (h64 + h64 @ A.T + b).float()
            moved.append(h)
        x = reference.normalise(model, torch.stack(moved), cache, "recompute")
        logits = x.double() @ model.W_U.double() + model.b_U.double()
        final = torch.log_softmax(
            (
                reference.normalise(model, stack[-1:], cache, "recompute").double() @ model.W_U.double()
                + model.b_U.double()
            )[0],
            -1,
        )
        logp = torch.log_softmax(logits, -1)
    return labels, {
        "entropy": -(logp.exp() * logp).sum(-1),
        "kl": (final.exp() * (final - logp)).sum(-1),
        "top": logits.argmax(-1),
    }


def _params(lens):
    return {
        label: (layer.weight.detach().double(), layer.bias.detach().double())
        for label, layer in lens.translators.items()
    }


# -- the interface ---------------------------------------------------------------------------
def test_logit_lens_is_exactly_the_plain_lens(model):
    plain = tll.logit_lens(model, TOKENS, incl_mid=True)
    same = tll.logit_lens(model, TOKENS, incl_mid=True, lens=tll.LogitLens())
    for name in ("top_ids", "top_probs", "entropy", "kl_to_final", "next_token_loss"):
        torch.testing.assert_close(getattr(same, name), getattr(plain, name), atol=0, rtol=0, equal_nan=True)
    assert plain.lens_name == same.lens_name == "logit"


def test_a_new_tuned_lens_is_the_identity(model):
    lens = tll.TunedLens(model)
    assert isinstance(lens, tll.Lens) and isinstance(lens, torch.nn.Module)
    assert lens.labels == [f"{i}_pre" for i in range(model.cfg.n_layers)]
    for layer in lens.translators.values():
        assert layer.weight.dtype == torch.float32 and layer.weight.device == model.W_U.device
        assert not layer.weight.any() and not layer.bias.any()
    plain = tll.logit_lens(model, TOKENS)
    tuned = tll.logit_lens(model, TOKENS, lens=lens)
    assert tuned.lens_name == "tuned"
    torch.testing.assert_close(tuned.entropy, plain.entropy, atol=1e-6, rtol=0)
    torch.testing.assert_close(tuned.kl_to_final, plain.kl_to_final, atol=1e-6, rtol=0)
    torch.testing.assert_close(tuned.top_probs, plain.top_probs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("incl_mid", [False, True])
def test_a_trained_tuned_lens_reads_the_translated_stream(model, incl_mid):
    lens = builders.randomise_lens(tll.TunedLens(model, incl_mid=incl_mid), seed=3)
    labels, ref = _reference(model, TOKENS, _params(lens), incl_mid)
    result = tll.logit_lens(model, TOKENS, incl_mid=incl_mid, lens=lens)
    assert result.labels == labels
    if incl_mid:
        assert "0_mid" in lens.translators and "1_mid" in lens.labels
    torch.testing.assert_close(result.entropy.double(), ref["entropy"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.kl_to_final.double(), ref["kl"], atol=1e-4, rtol=1e-4)
    assert torch.equal(result.top_ids[..., 0], ref["top"])
    # The translators moved the reading: not the plain lens any more.
    plain = tll.logit_lens(model, TOKENS, incl_mid=incl_mid)
    assert (result.kl_to_final[:-1] - plain.kl_to_final[:-1]).abs().max() > 1e-2


def test_a_lens_without_mid_translators_refuses_mid_entries(model):
    with pytest.raises(LensInputError, match="no translator for stack entry '0_mid'.*incl_mid=True"):
        tll.logit_lens(model, TOKENS, incl_mid=True, lens=tll.TunedLens(model))


def test_a_tuned_lens_returning_nan_is_refused(model):
    lens = tll.TunedLens(model)
    with torch.no_grad():
        lens.translators["1_pre"].bias[0] = float("nan")
    with pytest.raises(NonFiniteActivationError, match="stack entry '1_pre'"):
        tll.logit_lens(model, TOKENS, lens=lens)
    with pytest.raises(NonFiniteActivationError, match="lens returned"):
        evaluate_lens(model, TOKENS, lens=lens, progress=False)


def test_lens_must_be_callable(model):
    with pytest.raises(LensInputError, match="lens must be a callable .*, such as a tl_logitlens.Lens; got int"):
        tll.logit_lens(model, TOKENS, lens=3)


def test_evaluate_lens_with_a_tuned_lens(model):
    lens = builders.randomise_lens(tll.TunedLens(model), seed=5)
    _, ref = _reference(model, TOKENS, _params(lens), False)
    ev = evaluate_lens(model, TOKENS, lens=lens, progress=False)
    assert ev.lens_name == "tuned"
    # Every position but the last has a true next token (no padding in TOKENS).
    torch.testing.assert_close(ev.mean("kl_to_final"), ref["kl"][:, :, :-1].mean((1, 2)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ev.mean("entropy"), ref["entropy"][:, :, :-1].mean((1, 2)), atol=1e-4, rtol=1e-4)
    back = LensEvaluation.from_dict(json.loads(json.dumps(ev.to_dict())))
    assert back.lens_name == "tuned"
    old = ev.to_dict()
    del old["lens_name"]  # a file saved before lenses had names
    assert LensEvaluation.from_dict(old).lens_name == "logit"
    plain = evaluate_lens(model, TOKENS, progress=False, lens=tll.TunedLens(model))
    torch.testing.assert_close(
        plain.mean("kl_to_final"), evaluate_lens(model, TOKENS, progress=False).mean("kl_to_final"), atol=1e-6, rtol=0
    )


def test_figures_name_the_lens(model):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def titles(fig):  # several prompts are drawn as panels under one figure title
        return [ax.get_title() for ax in fig.axes] + [fig._suptitle.get_text() if fig._suptitle else ""]

    lens = tll.TunedLens(model)
    fig = tll.logit_lens(model, TOKENS, lens=lens).plot()
    assert any("Tuned lens" in title for title in titles(fig))
    fig2 = evaluate_lens(model, TOKENS, lens=lens, progress=False).plot()
    assert any("tuned lens" in title for title in titles(fig2))
    fig3 = tll.logit_lens(model, TOKENS).plot()
    assert any("Logit lens" in title for title in titles(fig3))
    plt.close("all")


# -- files -----------------------------------------------------------------------------------
def test_save_writes_the_tuned_lens_format_and_loads_back(model, tmp_path):
    lens = builders.randomise_lens(tll.TunedLens(model, incl_mid=True), seed=7)
    lens.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["lens_type"] == "linear_tuned_lens"
    assert config["d_model"] == model.cfg.d_model and config["num_hidden_layers"] == model.cfg.n_layers
    assert config["bias"] is True and "base_model_revision" in config and "base_model_name_or_path" in config
    # tuned-lens's fingerprint: sha256 of array_str(lm_head.weight [d_vocab, d_model], precision=1)
    expected_hash = hashlib.sha256(
        np.array_str(model.W_U.detach().T.float().numpy(), precision=1).encode("utf-8")
    ).hexdigest()
    assert config["unembed_hash"] == expected_hash
    params = torch.load(tmp_path / "params.pt", weights_only=True)
    d, n = model.cfg.d_model, model.cfg.n_layers
    assert sorted(params) == sorted([f"{i}.weight" for i in range(n)] + [f"{i}.bias" for i in range(n)])
    for i in range(n):
        assert params[f"{i}.weight"].shape == (d, d) and params[f"{i}.bias"].shape == (d,)
        assert torch.equal(params[f"{i}.weight"], lens.translators[f"{i}_pre"].weight.detach())
    extra = torch.load(tmp_path / "tl_logitlens_extra.pt", weights_only=True)
    assert torch.equal(extra["0_mid.bias"], lens.translators["0_mid"].bias.detach())

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same model: no hash warning
        back = tll.TunedLens.load(tmp_path, model)
    assert back.labels == lens.labels
    for label in lens.labels:
        assert torch.equal(back.translators[label].weight, lens.translators[label].weight)
        assert torch.equal(back.translators[label].bias, lens.translators[label].bias)
    a = tll.logit_lens(model, TOKENS, incl_mid=True, lens=lens)
    b = tll.logit_lens(model, TOKENS, incl_mid=True, lens=back)
    assert torch.equal(a.kl_to_final, b.kl_to_final)


def test_load_reads_a_plain_tuned_lens_folder(model, tmp_path):
    # What tuned-lens itself writes: config.json and params.pt only.
    d, n = model.cfg.d_model, model.cfg.n_layers
    params = {f"{i}.weight": torch.full((d, d), 0.01 * (i + 1)) for i in range(n)}
    params.update({f"{i}.bias": torch.full((d,), -0.5 * i) for i in range(n)})
    torch.save(params, tmp_path / "params.pt")
    config = {
        "base_model_name_or_path": "x",
        "d_model": d,
        "num_hidden_layers": n,
        "bias": True,
        "base_model_revision": None,
        "unembed_hash": tll.TunedLens(model).unembed_hash,
        "lens_type": "linear_tuned_lens",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    lens = tll.TunedLens.load(tmp_path, model)
    assert not lens.incl_mid
    h = torch.randn(3, d)
    expect = h + h @ params["1.weight"].T + params["1.bias"]
    torch.testing.assert_close(lens.transform(h, "1_pre"), expect)


def _saved(model, tmp_path):
    tll.TunedLens(model).save(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def test_load_refuses_a_lens_of_another_shape(model, tmp_path):
    config = _saved(model, tmp_path)
    d, n = model.cfg.d_model, model.cfg.n_layers
    (tmp_path / "config.json").write_text(json.dumps(dict(config, d_model=d + 1)))
    with pytest.raises(LensInputError, match=f"d_model={d + 1} but the model has d_model={d}"):
        tll.TunedLens.load(tmp_path, model)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=n + 3)))
    with pytest.raises(LensInputError, match=f"num_hidden_layers={n + 3} but the model has n_layers={n}"):
        tll.TunedLens.load(tmp_path, model)


def test_load_refuses_damaged_or_missing_files(model, tmp_path):
    _saved(model, tmp_path)
    data = (tmp_path / "params.pt").read_bytes()
    (tmp_path / "params.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(LensInputError, match=r"params\.pt: cannot be read .*truncated or corrupted"):
        tll.TunedLens.load(tmp_path, model)
    (tmp_path / "params.pt").unlink()
    with pytest.raises(LensInputError, match=r"params\.pt: not found"):
        tll.TunedLens.load(tmp_path, model)
    torch.save({"0.weight": torch.zeros(2, 2)}, tmp_path / "params.pt")
    with pytest.raises(LensInputError, match=r"params\.pt: missing entries"):
        tll.TunedLens.load(tmp_path, model)
    (tmp_path / "config.json").unlink()
    with pytest.raises(LensInputError, match=r"config\.json: not found"):
        tll.TunedLens.load(tmp_path, model)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LensInputError, match=r"config\.json: not a tuned-lens config"):
        tll.TunedLens.load(tmp_path, model)


def test_load_warns_on_another_unembedding(model, tmp_path):
    config = _saved(model, tmp_path)
    ours = json.loads((tmp_path / "tl_logitlens.json").read_text())
    other = [v + 0.5 for v in ours["unembed_sample"]]  # another model's weights at the same places
    (tmp_path / "tl_logitlens.json").write_text(json.dumps(dict(ours, unembed_sample=other)))
    with pytest.warns(UserWarning, match=r"unembed_sample \(tl_logitlens.json\) differs from this model's"):
        tll.TunedLens.load(tmp_path, model)
    # A folder tuned-lens wrote has no tl_logitlens.json: its unembed_hash is compared.
    (tmp_path / "tl_logitlens.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(dict(config, unembed_hash="0" * 64)))
    with pytest.warns(UserWarning, match=r"unembed_hash \(config.json\) differs from this model's"):
        tll.TunedLens.load(tmp_path, model)


def test_a_centred_stream_is_refused(model, tmp_path):
    _saved(model, tmp_path)
    centred = _centred()
    with pytest.raises(ModelStateError, match="Hugging Face residual stream.*Load the model without"):
        tll.TunedLens.load(tmp_path, centred)
    with pytest.raises(ModelStateError, match="cannot save this TunedLens"):
        tll.TunedLens(centred).save(tmp_path / "other")
    assert tll.lenses.stream_change(model) is None


def test_readout_applies_a_lens_per_entry(model):
    lens = builders.randomise_lens(tll.TunedLens(model), seed=9)
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
    labels, stack = reference.accumulated(model, cache)
    _, ref = _reference(model, TOKENS, _params(lens), False)
    r = tll.readout(model, stack, lens=lens, labels=labels, reference=stack[-1])
    torch.testing.assert_close(r.kl_to_reference.double(), ref["kl"], atol=1e-4, rtol=1e-4)
    one = tll.readout(model, stack[1], lens=lens, labels="1_pre", reference=stack[-1])
    torch.testing.assert_close(one.entropy.double(), ref["entropy"][1], atol=1e-4, rtol=1e-4)
    with pytest.raises(LensInputError, match="labels= must be one stack entry label"):
        tll.readout(model, stack, lens=lens, labels=labels[:-1])
    with pytest.raises(LensInputError, match="needs lens="):
        tll.readout(model, stack, labels=labels)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_take_a_float32_lens(dtype):
    half = (
        builders.hooked("LN", dtype=dtype) if HookedTransformer is not None else builders.hf_bridge("gpt2", dtype=dtype)
    )
    lens = tll.TunedLens(half)
    assert all(p.dtype == torch.float32 for p in lens.parameters())
    assert lens.transform(torch.ones(2, lens.d_model, dtype=dtype), "0_pre").dtype == torch.float32
    plain = tll.logit_lens(half, TOKENS)
    same = tll.logit_lens(half, TOKENS, lens=lens)  # half -> float32 is exact: the same numbers
    torch.testing.assert_close(same.kl_to_final, plain.kl_to_final, atol=1e-6, rtol=0)
    builders.randomise_lens(lens, seed=2)
    assert bool(torch.isfinite(tll.logit_lens(half, TOKENS, lens=lens).kl_to_final).all())
