"""Figures that scale: measured with the renderer's own text extents, not by eye.

A 4 x 128 lens heatmap must stay within a page, draw no text under 6 pt, put no cell text wider than
its cell, label only what fits (and say so), keep the full text of what it elides, and keep every
label inside the figure. One metric has one name and one colour in every figure.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

import tl_logitlens as tll  # noqa: E402
from tl_logitlens.kernel import Readout  # noqa: E402
from tl_logitlens.lens import LensResult  # noqa: E402
from tl_logitlens.plots import METRIC_STYLE, WIDTHS, plot_attribution, plot_lens, plot_lens_metrics, save_figure  # noqa: E402

PAGE, COLUMN = 6.9, 3.3  # inches: a two-column paper's text width and column (independent of WIDTHS)
LONG = [
    "High Pressure Die Casting",
    "5-axis Milling Secondary",
    "Special Finishing",
    "Turning",
    "Tap",
    "geometry_prismatic_with_axisymmetric_features",
    "holes_normal_threaded",
    "<EOC>",
]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


class LongTokenizer:
    """Token ``i`` reads ``LONG[i % len(LONG)]``: process names as long as capp-gpt2's."""

    def decode(self, ids):
        return "".join(LONG[i % len(LONG)] for i in ids)


def long_lens(n_layer=4, n_pos=128, n_batch=1, seed=0):
    """A hand-made ``[n_layer, n_batch, n_pos]`` lens result whose tokens have long names."""
    g = torch.Generator().manual_seed(seed)
    k = 2
    input_ids = torch.randint(0, len(LONG), (n_batch, n_pos), generator=g)
    top_ids = torch.randint(0, len(LONG), (n_layer, n_batch, n_pos, k), generator=g)
    top_ids[-1, :, :-1, 0] = input_ids[:, 1:]  # the last layer gets the next token right
    cell = torch.rand(n_layer, n_batch, n_pos, generator=g)
    readout = Readout(
        top_ids=top_ids,
        top_probs=torch.rand(n_layer, n_batch, n_pos, k, generator=g).sort(-1, descending=True).values,
        top_logits=torch.randn(n_layer, n_batch, n_pos, k, generator=g),
        entropy=cell,
        kl_to_reference=cell,
        next_token_loss=cell,
    )
    next_ids = torch.cat([input_ids[:, 1:], torch.full((n_batch, 1), -1)], 1)
    return LensResult(
        labels=[f"{i}_pre" for i in range(n_layer - 1)] + ["final_post"],
        input_ids=input_ids,
        lengths=torch.full((n_batch,), n_pos),
        positions=torch.arange(n_pos).expand(n_batch, n_pos).clone(),
        readout=readout,
        next_ids=next_ids,
        tokenizer=LongTokenizer(),
    )


def drawn(fig):
    """Draw the figure (as a PNG would be) and return its renderer."""
    fig.savefig(io.BytesIO(), format="png", dpi=fig.dpi)
    return fig.canvas.get_renderer()


def cell_texts(ax):
    return [t for t in ax.texts if t.get_gid() == "tll-top1"]


def visible_ticklabels(axis):
    return [t for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]


def every_text(fig):
    return [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text()]


def check_inside(fig, renderer):
    """Every drawn text lies inside the figure (nothing clipped at an edge)."""
    box = fig.bbox
    for t in every_text(fig):
        ext = t.get_window_extent(renderer)
        assert ext.x0 >= box.x0 - 1 and ext.x1 <= box.x1 + 1 and ext.y0 >= box.y0 - 1 and ext.y1 <= box.y1 + 1, (
            t.get_text(),
            ext,
            box,
        )


def check_cells_fit(ax, renderer, n_cols):
    cell_px = ax.get_window_extent(renderer).width / n_cols
    for t in cell_texts(ax):
        assert t.get_window_extent(renderer).width <= cell_px, (t.get_text(), cell_px)


def check_labels_do_not_overlap(labels, renderer):
    boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
    for a, b in zip(boxes, boxes[1:]):
        assert a.x1 + 2 <= b.x0, (a, b)  # a visible gap (2 px at 100 dpi)


# -- a long sequence ------------------------------------------------------------------------------
def test_4_by_128_heatmap_is_readable():
    """One strip (windows=1): the cells narrow, and the figure says what it left out."""
    result = long_lens()
    fig = plot_lens(result, windows=1)
    renderer = drawn(fig)
    ax = fig.axes[0]
    assert fig.get_figwidth() <= PAGE + 1e-9
    fonts = [t.get_fontsize() for t in every_text(fig)]
    assert min(fonts) >= 6.0
    check_cells_fit(ax, renderer, 128)
    # only what fits is labelled: a thinned set of input tokens, none overlapping, and the figure says so
    labels = visible_ticklabels(ax.xaxis)
    assert 1 < len(labels) < 128
    check_labels_do_not_overlap(labels, renderer)
    check_labels_do_not_overlap(visible_ticklabels(ax.child_axes[0].xaxis), renderer)
    title = ax.get_title()
    step = ax.get_xticks()[1] - ax.get_xticks()[0]
    assert f"labels thinned: one per {int(step)} positions" in title
    assert "too narrow" in title or cell_texts(ax)  # cells either carry text that fits or the title says why
    check_inside(fig, renderer)
    # the image is still the whole result
    np.testing.assert_allclose(np.ma.filled(ax.images[0].get_array(), np.nan), result.top_probs[:, 0, :, 0].numpy())


def test_window_of_a_long_sequence_shows_text():
    result = long_lens()
    fig = plot_lens(result, positions=slice(0, 16))
    renderer = drawn(fig)
    windows = [ax for ax in fig.axes if ax.images]  # the window's 16 positions, in strips as wide as the page
    cells = [t for ax in windows for t in cell_texts(ax)]
    assert len(cells) == 4 * 16 and all(t.get_fontsize() >= 6.0 for t in cells)
    for ax in windows:
        check_cells_fit(ax, renderer, ax.images[0].get_array().shape[1])
    check_inside(fig, renderer)


def test_elided_text_keeps_the_full_text_in_the_data():
    result = long_lens(n_pos=12)
    fig = plot_lens(result, windows=1)
    renderer = drawn(fig)
    ax = fig.axes[0]
    (data,) = fig.tll_data
    full = data["cell_text"]  # [layer][col], in the result's layer order
    assert full[0][0] == LONG[int(result.top_ids[0, 0, 0, 0])]
    assert data["input_tokens"] == [LONG[int(i)] for i in result.input_ids[0]]
    elided = 0
    for t in cell_texts(ax):
        j, i = (int(round(v)) for v in t.get_position())
        shown = t.get_text()
        if shown != full[i][j]:
            elided += 1
            assert shown.endswith("\u2026") and full[i][j].startswith(shown[:-1])
    assert elided > 0 and "elided" in ax.get_title()
    for t in visible_ticklabels(ax.xaxis):
        j = int(round(t.get_position()[0]))
        assert t.get_text() == data["input_tokens"][j] or data["input_tokens"][j].startswith(t.get_text()[:-1])
    check_cells_fit(ax, renderer, 12)
    check_inside(fig, renderer)


# -- size follows the grid -------------------------------------------------------------------------
def test_size_follows_the_grid_within_the_page():
    widths = [plot_lens(long_lens(n_pos=n)).get_figwidth() for n in (2, 6, 40, 128)]
    assert widths[0] < widths[1] < widths[2] == pytest.approx(PAGE)
    assert widths[3] == pytest.approx(PAGE)
    assert plot_lens(long_lens(n_pos=40), width="column").get_figwidth() <= COLUMN + 1e-9
    assert plot_lens(long_lens(n_pos=40), width=5.0).get_figwidth() <= 5.0 + 1e-9
    assert WIDTHS == {"column": COLUMN, "page": PAGE}
    with pytest.raises(ValueError, match="'page'.*'column'"):
        plot_lens(long_lens(n_pos=4), width="a4")


def test_demo_heatmap_fits_a_page_at_print_resolution(tmp_path):
    model = tll.demo_model()
    fig = plot_lens(tll.logit_lens(model, tll.demo.induction_prompt(model), targets="next"))
    path = tmp_path / "lens.png"
    save_figure(fig, path, dpi=200)
    from PIL import Image

    with Image.open(path) as image:
        w, _ = image.size
        dpi = image.info["dpi"]
    assert w <= PAGE * 200 + 2 and round(dpi[0]) == 200
    with pytest.raises(ValueError, match="dpi"):
        save_figure(fig, tmp_path / "x.png", dpi=0)


# -- small multiples -------------------------------------------------------------------------------
def test_several_prompts_as_small_multiples():
    result = long_lens(n_pos=10, n_batch=3)
    fig = plot_lens(result, prompt=[0, 2], windows=1)
    renderer = drawn(fig)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2 and len(fig.tll_data) == 2
    for ax, b in zip(panels, (0, 2)):
        np.testing.assert_allclose(np.ma.filled(ax.images[0].get_array(), np.nan), result.top_probs[:, b, :, 0].numpy())
        assert f"prompt {b}" in ax.get_title(loc="left")
    assert panels[0].images[0].norm is panels[1].images[0].norm  # one colour scale
    assert [d["prompt"] for d in fig.tll_data] == [0, 2]
    assert len(plot_lens(result, prompt=None).tll_data) == 3
    check_inside(fig, renderer)
    with pytest.raises(ValueError, match="new figure"):
        plot_lens(result, prompt=[0, 1], ax=plt.subplots()[1])


# -- one style ------------------------------------------------------------------------------------
def test_same_metric_same_name_and_colour_in_every_figure():
    model = tll.demo_model()
    tokens = tll.demo.induction_prompt(model)
    lens_fig = plot_lens_metrics(tll.logit_lens(model, tokens))
    evaluation = tll.evaluate_lens(model, torch.cat([tokens, tokens.flip(1)]), progress=False)
    eval_fig = evaluation.plot()

    def styles(fig):
        return {
            line.get_label(): to_hex(line.get_color())
            for line in fig.axes[0].lines
            if not line.get_label().startswith("_")
        }

    in_lens, in_eval = styles(lens_fig), styles(eval_fig)
    assert set(in_lens) == set(in_eval) == {"entropy", "KL to final", "next-token loss"}
    assert in_lens == in_eval
    assert len(set(in_lens.values())) == 3
    assert in_lens["KL to final"] == to_hex(METRIC_STYLE["kl_to_final"].color)


def test_captions_explain_stack_labels_and_the_constant():
    model = tll.demo_model()
    tokens = tll.demo.induction_prompt(model)
    fig = plot_lens(tll.logit_lens(model, tokens))
    assert any("0_pre" in c and "final_post" in c and "output" in c for c in fig.tll_captions)
    assert "before block 0" in fig._supxlabel.get_text()
    answer = int(tokens[0, -11])
    comp = plot_attribution(tll.direct_logit_attribution(model, tokens, answers=answer))
    assert "constant" in comp.axes[0].get_title() and any("constant =" in c for c in comp.tll_captions)
    acc = plot_attribution(tll.direct_logit_attribution(model, tokens, answers=answer, by="accumulated"))
    ylabel = acc.axes[0].get_ylabel()
    assert "direct effect" not in ylabel and "accumulated" in ylabel


# -- a real model with long token names ------------------------------------------------------------
def test_capp_gpt2_long_process_names(models_dir):
    from tl_logitlens.model_access import TransformerBridge

    if TransformerBridge is None:
        pytest.skip("local HF models boot through TransformerBridge (3.x/4.x)")
    capp = TransformerBridge.boot_transformers(str(models_dir / "capp-gpt2"), device="cpu").eval()
    # <SOS> prismatic part, normal holes, no external threads, normal finish, <EOC>, repeated to 48 tokens
    tokens = torch.tensor([[49, 2, 8, 15, 17, 50] * 8])
    result = tll.logit_lens(capp, tokens, targets="next")
    fig = plot_lens(result, metric="rank")
    renderer = drawn(fig)
    windows = [ax for ax in fig.axes if ax.images]  # 48 positions in windows as wide as the page
    assert fig.get_figwidth() <= PAGE + 1e-9 and min(t.get_fontsize() for t in every_text(fig)) >= 6.0
    assert sum(ax.images[0].get_array().shape[1] for ax in windows) == tokens.shape[1]
    for ax in windows:
        check_cells_fit(ax, renderer, ax.images[0].get_array().shape[1])
        check_labels_do_not_overlap(visible_ticklabels(ax.xaxis), renderer)
    check_inside(fig, renderer)
    assert any(len(t) > 15 for row in fig.tll_data[0]["cell_text"] for t in row)  # long names were there


# -- the size rule: cells sized for their text, windows, then narrower cells ------------------------
def _windows(fig):
    return [ax for ax in fig.axes if ax.images]


def _shown_enough(fig):
    """Every cell shows its whole top-1 token, or at least its first 4 characters and ``…``."""
    (data,) = fig.tll_data
    for ax, (a, _) in zip(_windows(fig), data["windows"]):
        for t in cell_texts(ax):
            j, i = (int(round(v)) for v in t.get_position())
            full, shown = data["cell_text"][i][a + j], t.get_text()
            assert shown == full or (shown.endswith("\u2026") and len(shown) >= 5 and full.startswith(shown[:-1])), (
                shown,
                full,
            )


def test_a_long_prompt_is_split_into_windows_of_readable_cells():
    """40 positions of long process names at page width: windows of consecutive positions, every cell carrying
    at least 4 characters of its token, every window as wide as the page, within two page heights."""
    from tl_logitlens.plots.lens import MAX_TALL

    result = long_lens(n_pos=40)
    fig = plot_lens(result)
    renderer = drawn(fig)
    windows = _windows(fig)
    (data,) = fig.tll_data
    assert len(windows) == len(data["windows"]) > 1
    assert [a for a, _ in data["windows"]] == list(range(0, 40, data["windows"][0][1]))  # consecutive, no gaps
    assert data["windows"][-1][1] == 40
    assert fig.get_figwidth() == pytest.approx(PAGE) and fig.get_figheight() <= MAX_TALL + 1e-9
    for ax, (a, z) in zip(windows, data["windows"]):
        np.testing.assert_allclose(np.ma.filled(ax.images[0].get_array(), np.nan), result.top_probs[:, 0, a:z, 0])
        check_cells_fit(ax, renderer, data["windows"][0][1])  # every window's cells as wide as the first's
        check_labels_do_not_overlap(visible_ticklabels(ax.xaxis), renderer)
        assert ax.get_title(loc="left") == f"positions {a}\u2013{z - 1}"
    _shown_enough(fig)
    assert "too narrow" not in fig._suptitle.get_text() and "thinned" not in fig._suptitle.get_text()
    check_inside(fig, renderer)


def test_a_wider_figure_takes_longer_strips_and_a_short_prompt_one():
    many = len(plot_lens(long_lens(n_pos=40)).tll_data[0]["windows"])
    wide = plot_lens(long_lens(n_pos=40), width=14.0)
    assert len(wide.tll_data[0]["windows"]) < many and wide.get_figwidth() == pytest.approx(14.0)
    assert plot_lens(long_lens(n_pos=5)).tll_data[0]["windows"] == [(0, 5)]
    assert len(_windows(plot_lens(long_lens(n_pos=40), windows=2))) == 2
    with pytest.raises(ValueError, match="windows must be None"):
        plot_lens(long_lens(n_pos=4), windows=0)


def test_past_two_pages_the_cells_narrow_and_the_title_names_the_way_out():
    """512 positions cannot all be readable within two page heights: the figure stops growing, and says what to
    pass (positions= for fewer positions, width= for wider cells)."""
    from tl_logitlens.plots.lens import MAX_TALL

    fig = plot_lens(long_lens(n_pos=512))
    drawn(fig)
    assert fig.get_figheight() <= MAX_TALL + 1e-9
    title = fig._suptitle.get_text().replace("\n", " ")
    assert "positions=slice(a, b)" in title and "width=" in title
    assert sum(ax.images[0].get_array().shape[1] for ax in _windows(fig)) == 512  # nothing left out


def test_stories260k_story_reads_in_windows(models_dir):
    """A 45-token story on a real model (the issue's case): every cell shows at least 4 characters of its token."""
    from tl_logitlens.model_access import TransformerBridge

    if TransformerBridge is None:
        pytest.skip("local HF models boot through TransformerBridge (3.x/4.x)")
    model = TransformerBridge.boot_transformers(str(models_dir / "stories260k"), device="cpu").eval()
    story = (
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
        "friends. One day, she saw a big dog"
    )
    result = tll.logit_lens(model, story, targets="next")
    fig = plot_lens(result)
    renderer = drawn(fig)
    assert len(_windows(fig)) > 1 and fig.get_figwidth() <= PAGE + 1e-9
    for ax in _windows(fig):
        check_cells_fit(ax, renderer, fig.tll_data[0]["windows"][0][1])
        assert len(cell_texts(ax)) == len(result.labels) * ax.images[0].get_array().shape[1]
    _shown_enough(fig)
    check_inside(fig, renderer)


def test_one_position_per_prompt_draws_every_prompt_side_by_side():
    """positions=-1 over three prompts: one column per prompt (not prompt 0 alone)."""
    model = tll.demo_model()
    tokens = torch.cat([tll.demo.induction_prompt(model, seed=s) for s in range(3)])
    result = tll.logit_lens(model, tokens, positions=-1, targets="next")
    fig = plot_lens(result)
    (ax,) = _windows(fig)
    np.testing.assert_allclose(ax.images[0].get_array(), result.top_probs[:, :, 0].numpy())
    last = [model.tokenizer.decode([int(t)]) for t in tokens[:, -1]]
    assert [t.get_text() for t in ax.get_xticklabels()] == last
    assert fig.tll_data[0]["prompt"] == [0, 1, 2] and "prompts 0\u20132" in ax.get_xlabel()
    (one,) = _windows(plot_lens(result, prompt=[2, 0]))
    np.testing.assert_allclose(one.images[0].get_array(), result.top_probs[:, [2, 0], 0].numpy())


def test_every_prompt_by_default_and_the_old_spelling():
    import warnings

    result = long_lens(n_pos=6, n_batch=3)
    assert [d["prompt"] for d in plot_lens(result).tll_data] == [0, 1, 2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = plot_lens(result, batch=1)
    assert [d["prompt"] for d in old.tll_data] == [1]
    assert any(issubclass(w.category, DeprecationWarning) and "prompt=" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="both batch= and prompt="):
        plot_lens(result, batch=1, prompt=1)
