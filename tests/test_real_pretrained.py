"""The real-model tier: SmolLM2-135M (Llama, 30 layers, vocabulary 49,152) and Gemma-3-270m (18 layers,
post-norms in every block, vocabulary 262,144), in float32 and bfloat16.

Marker ``real``, run by ``make test-real`` (which fetches the models; see tests/pretrained.py) and by
CI; skipped when the models are absent. Every reference here is computed without tl_logitlens, in
float64: the Hugging Face model's own logits (``model.original_model``), the model's own final norm
module on the cached streams, and the tokenizer's own ids for named tokens.
"""

from __future__ import annotations

import functools

import pretrained
import pytest
import reference
import torch

import tl_logitlens as tll
from tl_logitlens.model_access import TransformerBridge

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(TransformerBridge is None, reason="the real models boot through TransformerBridge (3.x/4.x)"),
]

ANSWERS = [" Paris", " Paris", " cold"]
WRONG = [" London", " London", " warm"]
GROUPS = {"capitals": [" Paris", " London", " Berlin", " Rome", " Madrid"], "temperature": [" cold", " warm"]}

#: Scored tokens read by evaluate_lens and compare_lenses (the paragraph's first ones).
EVAL_TOKENS = 24


class Real:
    """One real model: booted in float32 at once, in bfloat16 on first use (one module's tests share both)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.folder = pretrained.folder(name)
        self.float32 = self.boot(torch.float32)

    def boot(self, dtype: torch.dtype):
        return TransformerBridge.boot_transformers(str(self.folder), device="cpu", dtype=dtype).eval()

    @functools.cached_property
    def bfloat16(self):
        return self.boot(torch.bfloat16)


@pytest.fixture(scope="module", params=pretrained.NAMES)
def real(request):
    return Real(request.param)


# -- independent references ------------------------------------------------------------------------
def token_id(model, text: str) -> int:
    """The tokenizer's own single id for ``text`` (no special tokens)."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


def own_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """``[batch, pos, d_vocab]`` the Hugging Face model's own logits, float64 (right padding is harmless:
    causal attention never lets a real token see it)."""
    with torch.no_grad():
        return model.original_model(input_ids=ids).logits.double()


def last(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``x [batch, pos, ...]`` at each prompt's last real position: ``[batch, ...]``."""
    return x[torch.arange(x.shape[0]), lengths - 1]


def times_unembedding(model, x: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """``x [rows, d_model] @ W_U`` (or ``|x| @ |W_U|``) in float64, a block of vocabulary columns at a time
    (no float64 copy of a 262k-column ``W_U``)."""
    W_U = model.W_U.detach()
    x = x.double().abs() if absolute else x.double()
    out = torch.empty(x.shape[0], W_U.shape[1], dtype=torch.float64)
    for a in range(0, W_U.shape[1], 16384):
        block = W_U[:, a : a + 16384].double()
        out[:, a : a + 16384] = x @ (block.abs() if absolute else block)
    return out


def entry_log_probs(model, cache, hook: str, rows: torch.Tensor) -> torch.Tensor:
    """The stored stream ``hook`` at ``rows [r, 2]`` (batch, position), read by the model's own final
    norm module and ``W_U``: log-probabilities ``[r, d_vocab]`` in float64."""
    stream = cache[hook][rows[:, 0], rows[:, 1]]
    with torch.no_grad():
        normed = model.ln_final(stream[None])[0]
    logits = times_unembedding(model, normed)
    b_U = getattr(model, "b_U", None)
    return torch.log_softmax(logits + (0 if b_U is None else b_U.detach().double()), -1)


@pytest.fixture(scope="module")
def own(real):
    """``(ids, lengths, log-probabilities [batch, pos, d_vocab] float64)`` of the prompts: the model's own."""
    model = real.float32
    ids = [model.to_tokens(p)[0] for p in pretrained.PROMPTS]
    lengths = torch.tensor([len(row) for row in ids])
    pad = model.tokenizer.pad_token_id
    padded = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=0 if pad is None else pad)
    return padded, lengths, torch.log_softmax(own_logits(model, padded), -1)


# -- the lens ------------------------------------------------------------------------------------
def test_lens_final_entry_is_the_models_own_prediction(real, own):
    ids, lengths, logp = own
    result = tll.logit_lens(real.float32, pretrained.PROMPTS, layers=[0, -1], targets="next", top_k=5)
    assert torch.equal(result.input_ids, ids) and torch.equal(result.lengths, lengths)
    cells = torch.arange(ids.shape[1]) < lengths[:, None]  # real tokens, not padding
    p_top = logp.exp().gather(-1, result.top_ids[-1])
    assert (result.top_probs[-1].double() - p_top)[cells].abs().max() <= 1e-5
    entropy = -(logp.exp() * logp).sum(-1)
    assert (result.entropy[-1].double() - entropy)[cells].abs().max() <= 1e-4
    loss = -logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    assert (result.next_token_loss[-1, :, :-1].double() - loss)[cells[:, 1:]].abs().max() <= 1e-4
    assert result.kl_to_final[-1][cells].abs().max() <= 1e-5
    # A trained model: the final entry has " Paris" in its top 5 after "The capital of France is";
    # the first entry (the token embedding) does not.
    answer = token_id(real.float32, " Paris")
    assert answer in last(result.top_ids[-1], lengths)[0].tolist()
    assert answer not in last(result.top_ids[0], lengths)[0].tolist()


def test_lens_inner_entries_match_the_models_final_norm_on_its_stream(real):
    model = real.float32
    layers = [0, model.cfg.n_layers // 2, model.cfg.n_layers - 1]
    result = tll.logit_lens(model, pretrained.PROMPTS, layers=layers, positions=-1, top_k=3)
    with torch.no_grad():
        _, cache = model.run_with_cache(result.input_ids)
    rows = torch.stack([torch.arange(3), result.lengths - 1], 1)
    for i, layer in enumerate(layers):
        logp = entry_log_probs(model, cache, f"blocks.{layer}.hook_resid_pre", rows)
        p_top = logp.exp().gather(-1, result.top_ids[i])
        torch.testing.assert_close(result.top_probs[i].double(), p_top, atol=1e-5, rtol=0)
        torch.testing.assert_close(result.entropy[i].double(), -(logp.exp() * logp).sum(-1), atol=1e-4, rtol=1e-4)


def test_token_groups_are_the_summed_probabilities_of_their_members(real, own):
    model = real.float32
    _, lengths, logp = own
    result = tll.logit_lens(model, pretrained.PROMPTS, layers=[-1], targets=GROUPS, positions=-1)
    members = [[token_id(model, t) for t in tokens] for tokens in GROUPS.values()]
    probs, _ = reference.group_stats(last(logp, lengths), members)
    torch.testing.assert_close(result.group_probs[-1].double(), probs, atol=1e-5, rtol=1e-5)
    # The capitals win after "The capital of France is", the temperatures after "The opposite of hot is".
    assert result.group_probs[-1, 0, 0] > result.group_probs[-1, 0, 1]
    assert result.group_probs[-1, 2, 1] > result.group_probs[-1, 2, 0]


# -- direct logit attribution --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def components(real, own):
    """The by="component" attribution of the answers against the wrong tokens, and the model's own values."""
    model = real.float32
    att = tll.direct_logit_attribution(model, pretrained.PROMPTS, answers=ANSWERS, wrong=WRONG, by="component")
    logp = last(own[2], att.lengths)  # a difference of log-probabilities is the difference of logits
    answer = torch.tensor([token_id(model, t) for t in ANSWERS])
    wrong = torch.tensor([token_id(model, t) for t in WRONG])
    rows = torch.arange(len(ANSWERS))
    return att, logp[rows, answer] - logp[rows, wrong]


def _adds_up(att, own_value):
    assert att.residual_error() <= 1e-4 * (1 + att.model_value.abs().max().item())
    torch.testing.assert_close(att.model_value.double(), own_value, atol=1e-4, rtol=1e-5)


def test_dla_by_component_adds_up_to_the_models_logit_difference(components):
    att, own_value = components
    _adds_up(att, own_value)
    assert att.labels[0] == "embed" and att.labels[-1].endswith("_mlp_out")
    assert (own_value > 0).all()  # the model prefers each answer (Paris over London, cold over warm)


def _layer_sums(att, kind: str, bias: str, n_layers: int) -> torch.Tensor:
    """``[layer, batch]``: each layer's pieces (``L{l}H*`` or ``L{l}N*``) plus its bias term, summed."""
    out = []
    for layer in range(n_layers):
        rows = [i for i, label in enumerate(att.labels) if label.startswith(f"L{layer}{kind}")]
        rows += [att.labels.index(f"{layer}_{bias}")] if f"{layer}_{bias}" in att.labels else []
        out.append(att.values[rows].sum(0))
    return torch.stack(out)


def _layer_rows(att, suffix: str, n_layers: int) -> torch.Tensor:
    return att.values[[att.labels.index(f"{layer}_{suffix}") for layer in range(n_layers)]]


def test_dla_by_head_adds_up_and_each_layers_heads_make_its_attention(real, components):
    comp, own_value = components
    model = real.float32
    att = tll.direct_logit_attribution(model, pretrained.PROMPTS, answers=ANSWERS, wrong=WRONG, by="head")
    _adds_up(att, own_value)
    n = model.cfg.n_layers
    assert att.by_head().shape == (n, model.cfg.n_heads, 3)
    torch.testing.assert_close(
        _layer_sums(att, "H", "attn_bias", n), _layer_rows(comp, "attn_out", n), atol=1e-4, rtol=1e-4
    )


def test_dla_by_neuron_adds_up_and_each_layers_neurons_make_its_mlp(real, components):
    comp, own_value = components
    model = real.float32
    att = tll.direct_logit_attribution(model, pretrained.PROMPTS, answers=ANSWERS, wrong=WRONG, by="neuron")
    _adds_up(att, own_value)
    n = model.cfg.n_layers
    torch.testing.assert_close(
        _layer_sums(att, "N", "mlp_bias", n), _layer_rows(comp, "mlp_out", n), atol=1e-4, rtol=1e-4
    )


def test_dla_by_source_adds_up_to_each_head(real, components):
    _, own_value = components
    att = tll.direct_logit_attribution(
        real.float32, pretrained.PROMPTS, answers=ANSWERS, wrong=WRONG, by="head", by_source=True
    )
    _adds_up(att, own_value)
    sources = att.by_source()  # [layer, head, src, batch]
    torch.testing.assert_close(sources.sum(2), att.by_head(), atol=1e-5, rtol=1e-4)
    for b, length in enumerate(att.lengths.tolist()):
        assert (sources[:, :, length:, b] == 0).all()  # nothing comes from after the destination
    assert len(att.source_tokens()[0]) == sources.shape[2]


# -- a trained lens, evaluation and comparison ---------------------------------------------------------
@pytest.fixture(scope="module")
def tuned(real):
    """A tuned lens after a few training steps on the paragraph (small steps: 4 scored tokens each)."""
    return tll.train_tuned_lens(
        real.float32, pretrained.PARAGRAPH, steps=3, tokens_per_step=4, batch_size=1, progress=False
    )


def test_a_few_tuned_lens_steps_move_the_translators_and_round_trip(real, tuned, tmp_path):
    weights = torch.cat([p.detach().reshape(-1) for p in tuned.parameters()])
    assert torch.isfinite(weights).all() and weights.abs().max() > 0  # zero-initialised, then trained
    tuned.save(tmp_path / "lens")
    loaded = tll.TunedLens.load(tmp_path / "lens", real.float32)
    h = torch.randn(2, 3, real.float32.cfg.d_model)
    for label in ("0_pre", f"{real.float32.cfg.n_layers - 1}_pre"):
        torch.testing.assert_close(loaded.transform(h, label), tuned.transform(h, label))


@pytest.fixture(scope="module")
def evaluation(real):
    return tll.evaluate_lens(real.float32, pretrained.PARAGRAPH, max_tokens=EVAL_TOKENS, progress=False)


def test_evaluate_lens_final_entry_is_the_models_loss(real, evaluation):
    model = real.float32
    ids = model.to_tokens(pretrained.PARAGRAPH)[:, : EVAL_TOKENS + 1]
    logp = torch.log_softmax(own_logits(model, ids), -1)[0, :-1]
    loss = -logp.gather(-1, ids[0, 1:, None])[:, 0]
    assert evaluation.n_tokens == EVAL_TOKENS
    assert abs(evaluation.mean("next_token_loss")[-1].item() - loss.mean().item()) <= 1e-4
    assert evaluation.mean("kl_to_final")[-1].item() <= 1e-5
    assert evaluation.top1_agreement[-1].item() == 1.0
    # Real text: the final entry predicts it far better than the embeddings do.
    assert evaluation.mean("next_token_loss")[-1] < evaluation.mean("next_token_loss")[0] - 1.0


@pytest.fixture(scope="module")
def comparison(real, tuned):
    lenses = {"logit": None, "tuned": tuned}
    return tll.compare_lenses(real.float32, pretrained.PARAGRAPH, lenses, max_tokens=EVAL_TOKENS, progress=False)


def test_compare_lenses_reads_the_logit_lens_as_evaluate_does_and_the_tuned_lens_beside_it(evaluation, comparison):
    logit, tuned = comparison["logit"], comparison["tuned"]
    for statistic in ("kl_to_final", "next_token_loss", "entropy"):
        torch.testing.assert_close(logit.mean(statistic), evaluation.mean(statistic), atol=1e-5, rtol=1e-5)
        # final_post passes the tuned lens untouched: both read the model's own prediction there.
        torch.testing.assert_close(tuned.mean(statistic)[-1], logit.mean(statistic)[-1], atol=1e-5, rtol=1e-5)
    assert (tuned.mean("kl_to_final")[:-1] != logit.mean("kl_to_final")[:-1]).any()


# -- the views -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pages(real, evaluation, comparison, tmp_path_factory):
    """Every result's interactive page: ``{name: (result, path)}``."""
    pytest.importorskip("plotly")
    model = real.float32
    folder = tmp_path_factory.mktemp(f"pages-{real.name}")
    results = {
        "lens": tll.logit_lens(model, pretrained.PROMPTS, layers=[0, 1, -2, -1], targets="next", top_k=3),
        "attribution": tll.direct_logit_attribution(
            model, pretrained.PROMPTS, answers=ANSWERS, wrong=WRONG, by="component"
        ),
        "evaluation": evaluation,
        "comparison": comparison,
    }
    return {name: (result, result.to_html(folder / f"{name}.html")) for name, result in results.items()}


def test_html_views_of_every_result(pages):
    for name, (_, path) in pages.items():
        text = path.read_text(encoding="utf-8")
        assert text.startswith("<!DOCTYPE html>") and "<script src" not in text, name


@pytest.mark.browser
def test_html_views_draw_in_a_browser(pages, driver):
    import test_browser

    for _, path in pages.values():
        test_browser.open_page(driver, path)
    lens, path = pages["lens"]
    test_browser.open_page(driver, path)
    for layer, j in ((0, 1), (len(lens.labels) - 1, 4)):
        assert test_browser.hover(driver, j, layer) == test_browser.expected_lens_lines(lens, layer, 0, j, 3)
    assert test_browser.console_errors(driver) == []


# -- bfloat16 --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def own_bf16(real, own):
    """The bfloat16 model's own reading of the prompts' last positions: ``(logits, slack)``, each
    ``[batch, d_vocab]`` float64, from one run of it.

    ``slack`` is how far the model's own rounding can move each logit: its normalised stream ``n``
    and its logits ``l`` are each rounded once to the dtype (unit roundoff eps / 2), so
    ``|delta l_j| <= eps * (|l_j| + |n| @ |W_U[:, j]|)`` (twice the unit roundoff: room for the
    accumulation).
    """
    model = real.bfloat16
    ids, lengths, _ = own
    eps = torch.finfo(torch.bfloat16).eps
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids)
        n = last(model.ln_final(cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]), lengths)
    logits = last(logits, lengths).double()
    return logits, eps * (logits.abs() + times_unembedding(model, n, absolute=True))


def test_bfloat16_lens_reads_the_models_own_prediction_within_its_rounding(real, own_bf16):
    logits, slack = own_bf16
    result = tll.logit_lens(real.bfloat16, pretrained.PROMPTS, layers=[-1], positions=-1, top_k=5)
    p_own = torch.softmax(logits, -1)
    # log p_j = l_j - log Z moves by l_j's slack plus log Z's, the softmax-weighted mean of all slacks.
    slack_z = (p_own * slack).sum(-1, keepdim=True)
    ours, theirs = result.top_probs[-1].double(), p_own.gather(-1, result.top_ids[-1])
    bound = torch.maximum(ours, theirs) * torch.expm1(slack.gather(-1, result.top_ids[-1]) + slack_z)
    assert ((ours - theirs).abs() <= bound + 1e-6).all()
    assert token_id(real.bfloat16, " Paris") in result.top_ids[-1, 0].tolist()


@pytest.mark.parametrize("by", ["component", "head", "neuron"])
def test_bfloat16_dla_adds_up_with_its_rounding_and_agrees_with_float32(real, own_bf16, by):
    logits, slack = own_bf16
    model = real.bfloat16
    att = tll.direct_logit_attribution(model, pretrained.PROMPTS, answers=ANSWERS, wrong=WRONG, by=by)
    assert att.labels[-1] == "rounding"
    assert att.residual_error() <= 1e-4 * (1 + att.model_value.abs().max().item())
    batch = torch.arange(3)
    answer = torch.tensor([token_id(model, t) for t in ANSWERS])
    wrong = torch.tensor([token_id(model, t) for t in WRONG])
    own_value = logits[batch, answer] - logits[batch, wrong]
    room = 2 * (slack[batch, answer] + slack[batch, wrong]) + 1e-4 * (1 + own_value.abs())
    assert ((att.model_value.double() - own_value).abs() <= room).all()
    # The same pieces as the float32 model's: the largest agree in sign, and all of them closely.
    full = tll.direct_logit_attribution(real.float32, pretrained.PROMPTS, answers=ANSWERS, wrong=WRONG, by=by)
    assert full.labels == att.labels[:-1]
    big = full.values.abs().mean(1).argsort(descending=True)[:5]
    assert (full.values[big].sign() == att.values[big].sign()).all()
    corr = torch.corrcoef(torch.stack([full.values.reshape(-1), att.values[:-1].reshape(-1)]))[0, 1]
    assert corr > 0.95, corr
