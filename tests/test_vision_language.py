"""Vision-language models: the lens and attribution on the language stream of a prompt with an image.

A tiny random LLaVA (CLIP tower, Llama text model) built offline (builders.llava_bridge). Its
forward pass writes the projected image features into the stream at the ``<image>`` tokens'
positions in place of their embeddings; everything here is checked at text AND image positions
against references that never call tl_logitlens: the model's own final norm and ``W_U`` on the
cached streams, the Hugging Face model's own logits, and the image features recomputed from the
Hugging Face vision tower and projector.
"""

import builders
import pytest
import reference
import torch

import tl_logitlens as tll

pytestmark = pytest.mark.skipif(
    builders.TransformerBridge is None, reason="vision-language models boot through TransformerBridge (3.x/4.x)"
)

IMAGE = builders.LLAVA_IMAGE_ID
IDS = builders.llava_prompt(batch=2)  # <bos> w w <image> x4 w w: image positions 3..6
PIXELS = builders.llava_images(2)  # one image per prompt
IMAGE_POS = list(range(3, 3 + builders.LLAVA_TOKENS_PER_IMAGE))
ANSWERS = torch.tensor([5, 9])
WRONG = torch.tensor([7, 30])


def _boots_llava():
    try:
        return builders.llava_bridge()
    except Exception as e:  # an older transformer-lens without the LLaVA adapter
        pytest.skip(f"this transformer-lens cannot boot a LLaVA: {type(e).__name__}: {e}")


@pytest.fixture(scope="module")
def llava():
    return _boots_llava()


@pytest.fixture(scope="module")
def run(llava):
    """``(hf_logits float64, cache)`` of the prompt with its images: the Hugging Face model run on its own,
    and the bridge's cache of every hook."""
    with torch.no_grad():
        hf_logits = llava.original_model(input_ids=IDS, pixel_values=PIXELS).logits.double()
        _, cache = llava.run_with_cache(IDS, pixel_values=PIXELS)
    return hf_logits, cache


def _image_features(llava):
    """``[images, tokens per image, d_model]``: LLaVA's recipe on the Hugging Face modules (last CLIP layer,
    class token dropped, then the projector)."""
    hf = llava.original_model.model
    with torch.no_grad():
        hidden = hf.vision_tower(PIXELS, output_hidden_states=True).hidden_states[-1]
        return hf.multi_modal_projector(hidden[:, 1:])


def test_lens_is_exact_at_text_and_image_positions(llava, run):
    hf_logits, cache = run
    result = tll.logit_lens(llava, IDS, pixel_values=PIXELS, targets="next", top_k=3)
    _, stack = reference.accumulated(llava, cache)
    with torch.no_grad():
        normed = torch.stack([llava.ln_final(x) for x in stack])  # the model's own final norm
    logp = torch.log_softmax(normed.double() @ llava.W_U.detach().double(), -1)  # [layer, batch, pos, vocab]
    torch.testing.assert_close(result.top_probs.double(), logp.exp().gather(-1, result.top_ids), atol=1e-5, rtol=0)
    entropy = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(result.entropy.double(), entropy, atol=1e-4, rtol=1e-4)
    kl = (logp[-1].exp() * (logp[-1] - logp)).sum(-1)
    torch.testing.assert_close(result.kl_to_final.double(), kl, atol=1e-4, rtol=1e-4)
    # The final entry is the Hugging Face model's own prediction, at the image positions too.
    own = torch.log_softmax(hf_logits, -1)
    torch.testing.assert_close(
        result.top_probs[-1].double(), own.exp().gather(-1, result.top_ids[-1]), atol=1e-5, rtol=0
    )
    assert torch.equal(result.top_ids[-1, :, :, 0], hf_logits.argmax(-1))
    # The image changed what the model reads at image positions (else these checks prove nothing).
    text_only = tll.logit_lens(llava, torch.where(IDS == IMAGE, 5, IDS), top_k=3)
    assert (text_only.entropy[1:, :, IMAGE_POS] - result.entropy[1:, :, IMAGE_POS]).abs().max() > 1e-3


def test_image_embed_is_the_projected_image_features(llava, run):
    _, cache = run
    stack = tll.residual_stack(cache, by="component")
    assert stack.labels[:2] == ["embed", "image_embed"]
    embed, image = stack.values[0], stack.values[1]  # [batch, pos, d_model]
    features = _image_features(llava)
    assert features.abs().min() > 1e-4  # a real image feature in every coordinate (else this proves nothing)
    torch.testing.assert_close(image[:, IMAGE_POS], features, atol=1e-6, rtol=1e-5)
    text = [p for p in range(IDS.shape[1]) if p not in IMAGE_POS]
    assert torch.equal(image[:, text], torch.zeros_like(image[:, text]))  # exactly zero at text positions
    assert torch.equal(embed[:, IMAGE_POS], torch.zeros_like(embed[:, IMAGE_POS]))  # replaced, not added
    torch.testing.assert_close(embed[:, text], llava.W_E.detach()[IDS[:, text]])
    torch.testing.assert_close(stack.values.sum(0), cache["blocks.1.hook_resid_post"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("by", ["component", "head", "neuron"])
def test_attribution_adds_up_at_every_position(llava, run, by):
    hf_logits, _ = run
    att = tll.direct_logit_attribution(
        llava, IDS, pixel_values=PIXELS, answers=ANSWERS, wrong=WRONG, by=by, positions=None
    )
    assert att.values.shape[-1] == IDS.shape[1] and "image_embed" in att.labels
    assert att.residual_error() <= 1e-5
    rows = torch.arange(2)
    own = hf_logits[rows, :, ANSWERS] - hf_logits[rows, :, WRONG]  # [batch, pos]
    torch.testing.assert_close(att.model_value.double(), own, atol=1e-5, rtol=1e-5)
    image = att.values[att.labels.index("image_embed")]
    assert (image[:, IMAGE_POS].abs() > 0).all() and (image[:, [0, 1, 2, 7, 8, 9]] == 0).all()


@pytest.mark.parametrize("pos", [IMAGE_POS[1], -1])
def test_heads_and_image_match_the_reference_at_an_image_and_a_text_position(llava, run, pos):
    _, cache = run
    att = tll.direct_logit_attribution(
        llava, IDS, pixel_values=PIXELS, answers=ANSWERS, wrong=WRONG, by="head", positions=pos
    )
    with torch.no_grad():
        pieces = reference.head_pieces(llava, cache, pos)
        heads = reference.project_cached(llava, cache, torch.stack(list(pieces.values())), ANSWERS, WRONG, pos)
        at = pos % IDS.shape[1]
        vector = _image_features(llava)[:, at - IMAGE_POS[0]] if at in IMAGE_POS else torch.zeros(2, 32)
        image = reference.project_cached(llava, cache, vector[None], ANSWERS, WRONG, pos)[0]
    index = [att.labels.index(label) for label in pieces]
    torch.testing.assert_close(att.values[index], heads.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(att.values[att.labels.index("image_embed")], image.float(), atol=1e-5, rtol=1e-4)


def test_by_source_splits_heads_over_text_and_image_sources(llava):
    att = tll.direct_logit_attribution(
        llava, IDS, pixel_values=PIXELS, answers=ANSWERS, wrong=WRONG, by="head", by_source=True
    )
    sources = att.by_source()  # [layer, head, src, batch]
    torch.testing.assert_close(sources.sum(2), att.by_head(), atol=1e-6, rtol=1e-5)
    assert sources[:, :, IMAGE_POS].abs().sum() > 0  # the last token reads the image
    for row in att.source_tokens():
        assert row[3:7] == ["<image>"] * 4 and "<image>" not in row[:3] + row[7:]


def test_image_positions_are_labelled_in_results_tables_and_figures(llava, tmp_path):
    result = tll.logit_lens(llava, IDS, pixel_values=PIXELS, top_k=2)
    for row in result.input_tokens():
        assert [t == "<image>" for t in row] == [p in IMAGE_POS for p in range(IDS.shape[1])]
    frame = result.to_dataframe()
    assert set(frame.loc[frame["pos"].isin(IMAGE_POS), "input_token"]) == {"<image>"}
    assert "<image>" not in set(frame.loc[~frame["pos"].isin(IMAGE_POS), "input_token"])
    fig = result.plot()
    assert fig.tll_data[0]["input_tokens"] == result.input_tokens()[0]
    # Tick labels are the same text, elided ("<imag…") when a column is narrower than it.
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert all(("<image>".startswith(t.rstrip("…"))) == (j in IMAGE_POS) for j, t in enumerate(ticks)), ticks
    att = tll.direct_logit_attribution(llava, IDS, pixel_values=PIXELS, answers=ANSWERS, by="head", by_source=True)
    fig = tll.plots.plot_source_attribution(att, top=2)
    ticks = [t.get_text() for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels()]
    assert [t for t in ticks if "<image>" in t] == [f"{p} <image>" for p in IMAGE_POS], ticks
    pytest.importorskip("plotly")
    from tl_logitlens.plots import interactive

    page = interactive.lens_figure(result)  # what to_html writes (compressed there)
    ticks = list(page.layout.xaxis.ticktext)
    assert [t == "&lt;image&gt;" for t in ticks] == [p in IMAGE_POS for p in range(IDS.shape[1])], ticks
    # each cell's text is its top-1 token now; the hover (customdata) names the position and its input token
    assert page.data[0].customdata[0][IMAGE_POS[0]].startswith(f"0_pre · pos {IMAGE_POS[0]} · &lt;image&gt;")
    assert result.to_html(tmp_path / "lens.html").stat().st_size > 0


def test_a_processors_output_runs_as_is(llava):
    # The documented path: processor(text=..., images=...) expands each <image> and makes the pixels.
    pil = pytest.importorskip("PIL.Image")
    if getattr(llava, "processor", None) is None:
        pytest.skip("this transformer-lens did not attach the saved processor")
    picture = pil.fromarray((torch.rand(8, 8, 3) * 255).to(torch.uint8).numpy())
    inputs = llava.processor(text="w5 <image> w7 w9", images=picture, return_tensors="pt")
    assert int((inputs["input_ids"] == IMAGE).sum()) == builders.LLAVA_TOKENS_PER_IMAGE
    att = tll.direct_logit_attribution(
        llava, inputs["input_ids"], pixel_values=inputs["pixel_values"], answers=5, by="neuron"
    )
    assert att.residual_error() <= 1e-5


def test_cache_made_with_images_reads_the_same(llava, run):
    _, cache = run
    ran = tll.direct_logit_attribution(llava, IDS, pixel_values=PIXELS, answers=ANSWERS, by="component")
    read = tll.direct_logit_attribution(llava, IDS, cache=cache, answers=ANSWERS, by="component")
    torch.testing.assert_close(read.values, ran.values)
    assert read.source_values is None and read.input_ids is not None


def test_text_only_prompt_on_a_vision_language_model(llava):
    text = torch.where(IDS == IMAGE, 5, IDS)
    att = tll.direct_logit_attribution(llava, text, answers=ANSWERS, by="component", positions=None)
    assert att.residual_error() <= 1e-5
    assert (att.values[att.labels.index("image_embed")] == 0).all()


def test_bfloat16_llava_adds_up_with_its_rounding():
    try:
        model = builders.llava_bridge(dtype=torch.bfloat16)
    except Exception as e:
        pytest.skip(f"this transformer-lens cannot boot a LLaVA: {e}")
    att = tll.direct_logit_attribution(
        model, IDS, pixel_values=PIXELS, answers=ANSWERS, wrong=WRONG, by="head", positions=None
    )
    assert att.labels[-1] == "rounding" and "image_embed" in att.labels
    assert att.residual_error() <= 1e-4 * (1 + att.model_value.abs().max().item())
    result = tll.logit_lens(model, IDS, pixel_values=PIXELS)  # checks its final entry against the model's
    assert result.top_ids.shape[:3] == (3, 2, IDS.shape[1])


# -- Gemma 3: post-norms, scaled text embeddings, and an image's tokens that see each other -----------------
GEMMA_IDS = IDS.clone()
GEMMA_IDS[:, 2], GEMMA_IDS[:, 3:7], GEMMA_IDS[:, 7] = (
    builders.GEMMA3_BOI_ID,
    builders.GEMMA3_IMAGE_ID,
    builders.GEMMA3_EOI_ID,
)


@pytest.fixture(scope="module")
def gemma3():
    try:
        model = builders.gemma3_vl_bridge()
    except Exception as e:  # an older transformer-lens or transformers without Gemma 3's multimodal model
        pytest.skip(f"cannot boot a multimodal Gemma 3 here: {type(e).__name__}: {e}")
    # What its processor asks for: token_type_ids 1 at the image tokens (they attend to each other both ways).
    types = (GEMMA_IDS == builders.GEMMA3_IMAGE_ID).long()
    with torch.no_grad():
        logits = model.original_model(input_ids=GEMMA_IDS, pixel_values=PIXELS, token_type_ids=types).logits
        hf = model.original_model.model
        features = hf.multi_modal_projector(hf.vision_tower(pixel_values=PIXELS).last_hidden_state)
    return model, logits.double(), features


def test_gemma3_lens_is_the_models_own_prediction_at_text_and_image_positions(gemma3):
    model, logits, _ = gemma3
    assert tll.model_access.view(model).image_token_types
    result = tll.logit_lens(model, GEMMA_IDS, pixel_values=PIXELS, layers=[0, -1], top_k=3)
    own = torch.softmax(logits, -1).gather(-1, result.top_ids[-1])
    torch.testing.assert_close(result.top_probs[-1].double(), own, atol=1e-5, rtol=0)
    assert torch.equal(result.top_ids[-1, :, :, 0], logits.argmax(-1))


@pytest.mark.parametrize("by", ["component", "head", "neuron"])
def test_gemma3_attribution_adds_up_at_every_position(gemma3, by):
    model, logits, features = gemma3
    att = tll.direct_logit_attribution(
        model, GEMMA_IDS, pixel_values=PIXELS, answers=ANSWERS, wrong=WRONG, by=by, positions=None
    )
    assert att.residual_error() <= 1e-5
    rows = torch.arange(2)
    torch.testing.assert_close(
        att.model_value.double(), logits[rows, :, ANSWERS] - logits[rows, :, WRONG], atol=1e-5, rtol=1e-5
    )
    image = att.values[att.labels.index("image_embed")]
    assert (image[:, IMAGE_POS].abs() > 0).all() and (image[:, [0, 1, 2, 7, 8, 9]] == 0).all()


def test_gemma3_image_embed_is_the_projected_image_features(gemma3):
    model, _, features = gemma3
    with torch.no_grad():
        _, cache = model.run_with_cache(GEMMA_IDS, pixel_values=PIXELS)
    stack = tll.residual_stack(cache, by="component")
    image = stack.values[stack.labels.index("image_embed")]
    assert features.abs().min() > 1e-3  # a real image feature in every coordinate (else this proves nothing)
    torch.testing.assert_close(image[:, IMAGE_POS], features, atol=1e-6, rtol=1e-5)
    assert (stack.values[stack.labels.index("embed")][:, IMAGE_POS] == 0).all()


# -- refusals, all before any forward pass ---------------------------------------------------------
def test_image_tokens_without_pixel_values_are_refused(llava):
    builders.raises_before_forward(
        llava,
        tll.LensInputError,
        "holds 8 image tokens .*'<image>'.* no pixel_values",
        lambda: tll.logit_lens(llava, IDS),
    )


def test_an_unexpanded_image_token_is_refused(llava):
    ids = llava.to_tokens("w5 <image> w7")  # the text as typed: one <image>, where the model needs 4
    builders.raises_before_forward(
        llava,
        tll.LensInputError,
        r"holds 1 image tokens .* 1 image\(s\) of 4 tokens each .*processor",
        lambda: tll.direct_logit_attribution(llava, ids, pixel_values=PIXELS[:1], answers=5),
    )
    builders.raises_before_forward(
        llava,
        tll.LensInputError,
        r"8 image tokens .* 1 image\(s\) of 4 tokens",
        lambda: tll.logit_lens(llava, IDS, pixel_values=PIXELS[:1]),
    )


@pytest.mark.parametrize(
    "pixels, match",
    [
        (PIXELS.long(), "floating-point tensor"),
        (PIXELS.numpy(), "floating-point tensor .* got ndarray"),
        (PIXELS[0], r"\[images, channels, height, width\] .* pixel_values\[None\]"),
        (PIXELS.clone().index_fill_(0, torch.tensor([1]), float("nan")), "pixel_values hold 192 NaN"),
    ],
    ids=["int", "numpy", "no-image-axis", "nan"],
)
def test_bad_pixel_values_are_refused(llava, pixels, match):
    builders.raises_before_forward(
        llava, tll.LensInputError, match, lambda: tll.logit_lens(llava, IDS, pixel_values=pixels)
    )


def test_pixel_values_where_they_cannot_be_read_are_refused(llava, run):
    _, cache = run
    text = torch.where(IDS == IMAGE, 5, IDS)
    builders.raises_before_forward(
        llava, tll.LensInputError, "no image tokens", lambda: tll.logit_lens(llava, text, pixel_values=PIXELS)
    )
    builders.raises_before_forward(
        llava,
        tll.LensInputError,
        "cache= already holds the activations",
        lambda: tll.direct_logit_attribution(llava, IDS, cache=cache, pixel_values=PIXELS, answers=5),
    )
    text_model = builders.hf_bridge("llama")
    builders.raises_before_forward(
        text_model,
        tll.LensInputError,
        "this model takes no images",
        lambda: tll.logit_lens(text_model, builders.tokens(), pixel_values=PIXELS),
    )
