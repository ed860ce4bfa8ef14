"""compare_lenses: several lenses in one streaming pass, each equal to evaluate_lens run alone.

The independent check is a full-logit float64 computation of the translated streams (the
tests/reference.py route, which never calls tl_logitlens); the agreement with evaluate_lens
run separately shows that sharing the pass, the stream and the reference changes nothing.
"""

import json
import warnings

import builders
import pytest
import reference
import torch

import tl_logitlens as tll
from tl_logitlens.errors import LensInputError
from tl_logitlens.evaluate import STATISTICS, LensComparison, compare_lenses, evaluate_lens
from tl_logitlens.model_access import HookedTransformer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


def _plain():
    return builders.hooked("LN") if HookedTransformer is not None else builders.native_bridge("LN")


@pytest.fixture(scope="module")
def model():
    return _plain()


def _halve(h, label):
    """A custom callable lens (no name, no TunedLens): it transforms final_post too."""
    return 0.5 * h


def _assert_same(got, want, tol=1e-6):
    """Statistics of one lens equal: sums, extremes and rates within ``tol``, counts exact."""
    assert got.labels == want.labels
    assert (got.n_tokens, got.n_sequences) == (want.n_tokens, want.n_sequences)
    for stat in STATISTICS:
        torch.testing.assert_close(got.mean(stat), want.mean(stat), atol=tol, rtol=tol)
        torch.testing.assert_close(got.minima[stat], want.minima[stat], atol=tol, rtol=tol)
        torch.testing.assert_close(got.maxima[stat], want.maxima[stat], atol=tol, rtol=tol)
    assert got.top1_agree.tolist() == want.top1_agree.tolist()
    assert got.top1_correct.tolist() == want.top1_correct.tolist()


def test_each_lens_equals_evaluate_lens_run_alone(model):
    tuned = builders.randomise_lens(tll.TunedLens(model), seed=3)
    tokens = builders.tokens(batch=7, seq=10, seed=4)
    lenses = {"logit": None, "tuned": tuned, "half": _halve, "also logit": tll.LogitLens()}
    cmp = compare_lenses(model, tokens, lenses, batch_size=3, progress=False)
    assert cmp.lenses == list(lenses) and cmp.labels == ["0_pre", "1_pre", "final_post"]
    for name, lens in lenses.items():
        alone = evaluate_lens(model, tokens, lens=lens, batch_size=3, progress=False)
        _assert_same(cmp[name], alone)
        assert cmp[name].lens_name == name
    # A shorter run stops at the same token in every lens.
    short = compare_lenses(model, tokens, {"logit": None, "tuned": tuned}, batch_size=3, max_tokens=20, progress=False)
    _assert_same(short["tuned"], evaluate_lens(model, tokens, lens=tuned, batch_size=3, max_tokens=20, progress=False))
    assert short.n_tokens == 20


def test_tuned_lens_statistics_match_full_float64_logits(model):
    """Independent of the package: translate the cached stream, unembed in float64, average by hand."""
    tuned = builders.randomise_lens(tll.TunedLens(model), seed=8)
    tokens = builders.tokens(batch=3, seq=9, seed=6)
    cmp = compare_lenses(model, tokens, {"logit": None, "tuned": tuned}, batch_size=2, progress=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        labels, stack = reference.accumulated(model, cache)
        final = (
            reference.normalise(model, stack[-1:], cache, "recompute").double() @ model.W_U.double()
            + model.b_U.double()
        )
        final = torch.log_softmax(final[0], -1)[:, :-1]
        for name in ("logit", "tuned"):
            moved = []
            for label, h in zip(labels, stack):
                if name == "tuned" and label in tuned.translators:
                    A = tuned.translators[label].weight.double()
                    b = tuned.translators[label].bias.double()
                    h = (h.double() + h.double() @ A.T + b).float()
                moved.append(h)
            x = reference.normalise(model, torch.stack(moved), cache, "recompute").double()
            logp = torch.log_softmax(x @ model.W_U.double() + model.b_U.double(), -1)[:, :, :-1]
            kl = (final.exp() * (final - logp)).sum(-1).flatten(1)
            entropy = -(logp.exp() * logp).sum(-1).flatten(1)
            nxt = tokens[:, 1:]
            loss = -logp.gather(-1, nxt.expand(logp.shape[0], *nxt.shape).unsqueeze(-1))[..., 0].flatten(1)
            ev = cmp[name]
            torch.testing.assert_close(ev.mean("kl_to_final"), kl.mean(1), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ev.mean("entropy"), entropy.mean(1), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ev.mean("next_token_loss"), loss.mean(1), atol=1e-5, rtol=1e-5)
            top = logp.argmax(-1).flatten(1)
            assert ev.top1_agree.tolist() == (top == top[-1]).sum(1).tolist()
            assert ev.top1_correct.tolist() == (top == nxt.flatten()).sum(1).tolist()


def test_the_model_runs_once_per_batch_and_the_reference_is_read_once(model, monkeypatch):
    tuned = builders.randomise_lens(tll.TunedLens(model), seed=1)
    tokens = builders.tokens(batch=7, seq=8, seed=2)
    entries = []
    from tl_logitlens.evaluate.stream import read_rows as real

    def spy(view, vectors, **kwargs):
        entries.append((vectors.shape[0], kwargs["reference_entry"]))
        return real(view, vectors, **kwargs)

    monkeypatch.setattr("tl_logitlens.evaluate.stream.read_rows", spy)
    with builders.CountForwards(model) as counter:
        compare_lenses(model, tokens, {"logit": None, "tuned": tuned, "half": _halve}, batch_size=2, progress=False)
    assert counter.calls == 4  # ceil(7 / 2) batches, whatever the number of lenses
    n = model.cfg.n_layers
    # One kernel call per batch over the distinct vectors: the logit lens's n + 1 entries (its
    # final_post is the reference), the tuned lens's n translated ones (its final_post is the
    # same stream: shared), and the custom lens's n + 1.
    assert entries == [(n + 1 + n + n + 1, n)] * 4


def test_a_bfloat16_model(model):
    case = builders.precision_cases((torch.bfloat16,))[0]
    half = builders.build(case)
    tuned = builders.randomise_lens(tll.TunedLens(half), seed=2)
    assert tuned.translators["0_pre"].weight.dtype == torch.float32  # the lens stays float32
    tokens = builders.tokens(batch=4, seq=8, seed=5)
    cmp = compare_lenses(half, tokens, {"logit": None, "tuned": tuned}, batch_size=2, progress=False)
    for name, lens in (("logit", None), ("tuned", tuned)):
        _assert_same(cmp[name], evaluate_lens(half, tokens, lens=lens, batch_size=2, progress=False))
        assert float(cmp[name].mean("kl_to_final")[-1]) < 1e-5  # final_post is the model's own distribution
    assert bool((cmp["tuned"].mean("kl_to_final")[:-1] != cmp["logit"].mean("kl_to_final")[:-1]).all())


def test_errors_come_before_any_forward_pass(model):
    tokens = builders.tokens(batch=2, seq=6)
    foreign = tll.TunedLens(tll.demo_model())  # d_model 64; this model's is 32
    cases = [
        ({}, "lenses is empty"),
        ([None], "lenses must be a dict"),
        ({3: None}, "lens names must be non-empty strings"),
        ({"": None}, "lens names must be non-empty strings"),
        ({"logit": None, "bad": 3}, "lens 'bad': lens must be a callable"),
        (
            {"logit": None, "foreign": foreign},
            r"lens 'foreign': lens is a TunedLens for another model: it has d_model=64 .* the model has d_model=32",
        ),
    ]
    for lenses, match in cases:
        builders.raises_before_forward(
            model, LensInputError, match, lambda lenses=lenses: compare_lenses(model, tokens, lenses, progress=False)
        )
    for kwargs, match in (
        ({"norm": "bogus"}, "norm must be one of"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"max_tokens": -1}, "max_tokens must be"),
    ):
        builders.raises_before_forward(
            model,
            LensInputError,
            match,
            lambda kwargs=kwargs: compare_lenses(model, tokens, {"logit": None}, progress=False, **kwargs),
        )
    with pytest.raises(LensInputError, match="data is empty"):
        compare_lenses(model, torch.zeros(0, 5, dtype=torch.long), {"logit": None}, progress=False)


def test_long_sequences_warn_once_naming_compare_lenses(model):
    long = builders.tokens(batch=1, seq=builders.N_CTX + 10, seed=9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cmp = compare_lenses(model, long, {"logit": None, "tuned": tll.TunedLens(model)}, progress=False)
    split = [w for w in caught if "split into" in str(w.message)]
    assert len(split) == 1 and "compare_lenses" in str(split[0].message)
    assert split[0].filename == __file__  # reported at the caller's line
    assert cmp.meta["split_sequences"] == 1 and cmp["tuned"].n_tokens == builders.N_CTX + 9


def test_dataframe_plot_save_load_and_repr(model, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tuned = builders.randomise_lens(tll.TunedLens(model), seed=4)
    tokens = builders.tokens(batch=3, seq=8, seed=7)
    cmp = compare_lenses(model, tokens, {"logit": None, "tuned": tuned}, batch_size=2, progress=False)
    frame = cmp.to_dataframe()
    assert list(frame.columns[:2]) == ["lens", "layer"] and len(frame) == 2 * len(cmp.labels)
    tuned_rows = frame[frame["lens"] == "tuned"]
    assert tuned_rows["kl_to_final_mean"].tolist() == cmp["tuned"].mean("kl_to_final").tolist()
    assert tuned_rows["top1_accuracy"].tolist() == cmp["tuned"].top1_accuracy.tolist()

    fig = cmp.plot()
    nats, rates = fig.axes[0], fig.axes[1]
    assert len(nats.lines) == 2 * 3 and len(rates.lines) == 2
    by_label = {line.get_label(): line for line in nats.lines + rates.lines}
    # Colour per statistic, line style per lens; the legend names every lens's curves.
    assert by_label["logit: entropy"].get_color() == by_label["tuned: entropy"].get_color()
    assert by_label["logit: entropy"].get_linestyle() != by_label["tuned: entropy"].get_linestyle()
    assert by_label["tuned: kl_to_final"].get_ydata().tolist() == pytest.approx(
        cmp["tuned"].mean("kl_to_final").tolist(), rel=1e-6
    )
    legend = [t.get_text() for t in nats.get_legend().get_texts()]
    assert "tuned: top1_agreement" in legend and "logit: kl_to_final" in legend
    # Same colours per metric as LensEvaluation.plot.
    single = cmp["logit"].plot()
    rgba = matplotlib.colors.to_rgba
    assert [rgba(line.get_color()) for line in single.axes[0].lines] == [
        rgba(by_label[f"logit: {s}"].get_color()) for s in STATISTICS
    ]
    assert len(cmp.plot(statistics=("top1_accuracy",)).axes[0].lines) == 2
    with pytest.raises(LensInputError, match="statistics must be"):
        cmp.plot(statistics=("perplexity",))
    plt.close("all")

    path = tmp_path / "cmp.json"
    cmp.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["cmp.json"]  # no temporary file left behind
    back = LensComparison.load(path)
    assert back.lenses == cmp.lenses
    for name in cmp.lenses:
        _assert_same(back[name], cmp[name], tol=0)
        assert back[name].histograms["entropy"].tolist() == cmp[name].histograms["entropy"].tolist()
    assert "tuned: [" in repr(cmp) and "2 lenses" in repr(cmp)
    with pytest.raises(KeyError, match="no lens named 'x'"):
        cmp["x"]

    data = json.loads(path.read_text())
    broken = dict(data, evaluations={"logit": data["evaluations"]["logit"]})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(broken))
    with pytest.raises(LensInputError, match=r"bad\.json.*'evaluations' lacks the lens 'tuned'"):
        LensComparison.load(bad)
    del data["evaluations"]["tuned"]["statistics"]["entropy"]["sum"]
    bad.write_text(json.dumps(data))
    with pytest.raises(LensInputError, match=r"bad\.json.*evaluations\.tuned.*statistics\.entropy"):
        LensComparison.load(bad)
    bad.write_text("{not json")
    with pytest.raises(LensInputError, match=r"bad\.json: not a saved LensComparison"):
        LensComparison.load(bad)


def test_stories260k_with_a_perturbed_tuned_lens(models_dir):
    if builders.TransformerBridge is None:
        pytest.skip("the real models boot through TransformerBridge (3.x/4.x)")
    model = builders.TransformerBridge.boot_transformers(str(models_dir / "stories260k"), device="cpu").eval()
    tuned = builders.randomise_lens(tll.TunedLens(model), seed=11, scale=0.05)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.cfg.d_vocab, (6, 33), generator=gen)
    tokens[:, 0] = model.tokenizer.bos_token_id
    cmp = compare_lenses(model, tokens, {"logit": None, "tuned": tuned}, batch_size=4, progress=False)
    for name, lens in (("logit", None), ("tuned", tuned)):
        _assert_same(cmp[name], evaluate_lens(model, tokens, lens=lens, batch_size=4, progress=False))
    with torch.no_grad():
        logits = model(tokens)
    own = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(), tokens[:, 1:].reshape(-1)
    )
    for name in cmp.lenses:  # both lenses read final_post as the model does
        assert abs(float(cmp[name].mean("next_token_loss")[-1]) - float(own)) <= 1e-4
        assert float(cmp[name].mean("kl_to_final")[-1]) <= 1e-5
    assert bool((cmp["tuned"].mean("kl_to_final")[:-1] != cmp["logit"].mean("kl_to_final")[:-1]).all())
