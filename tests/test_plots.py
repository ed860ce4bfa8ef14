"""Figures show what the results hold: checked from the artists (arrays, texts, patches), not pixels.

Every figure is rendered to PNG, so drawing errors (mathtext in a token, a bad layout) fail here.
"""

from __future__ import annotations

import dataclasses
import io
import re

import matplotlib

matplotlib.use("Agg")

import builders  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import SymLogNorm  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

import tl_logitlens as tll  # noqa: E402
from tl_logitlens.attribution import Attribution  # noqa: E402
from tl_logitlens.errors import LensInputError  # noqa: E402
from tl_logitlens.kernel import Readout  # noqa: E402
from tl_logitlens.lens import LensResult  # noqa: E402
from tl_logitlens.plots import (  # noqa: E402
    LENS_METRICS,
    plot_attribution,
    plot_attribution_positions,
    plot_group_trajectory,
    plot_layer_curves,
    plot_lens,
    plot_lens_comparison,
    plot_lens_metrics,
    plot_source_attribution,
    plot_trajectory,
    save_figure,
)
from tl_logitlens.tokentext import display_token  # noqa: E402


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def model():
    """A small random model with the word tokenizer (``w0 .. w60``, one token per word)."""
    if builders.HookedTransformer is not None:
        return builders.hooked("LN", tokenizer=True)
    return builders.native_bridge("LN")


@pytest.fixture(scope="module")
def ids():
    return builders.tokens(batch=2, seq=7, seed=3)


@pytest.fixture(scope="module")
def lens(model, ids):
    return tll.logit_lens(model, ids, targets="next")


@pytest.fixture(scope="module")
def lens_targets(model, ids):
    return tll.logit_lens(model, ids, targets=["w5", "w7"])


@pytest.fixture(scope="module")
def padded(model):
    """Two prompts of 6 and 3 tokens, right-padded."""
    return tll.logit_lens(model, ["w5 w6 w7 w8 w9", "w3 w4"], targets="next")


@pytest.fixture(scope="module")
def atts(model, ids):
    return {
        by: tll.direct_logit_attribution(model, ids, answers="w5", wrong="w7", by=by)
        for by in ("component", "head", "neuron", "accumulated")
    }


@pytest.fixture(scope="module")
def att_positions(model, ids):
    return tll.direct_logit_attribution(model, ids, answers="w5", wrong="w7", positions=None)


def with_readout(result, **changes):
    """``result`` with some of its readout's statistics replaced."""
    return dataclasses.replace(result, readout=dataclasses.replace(result.readout, **changes))


def render(fig):
    """Draw the whole figure to PNG (raises on any drawing error) and return it."""
    fig.savefig(io.BytesIO(), format="png", dpi=30)
    return fig


def decode(tokenizer, token_id):
    return display_token(tokenizer.decode([int(token_id)]))


def tick_texts(axis):
    return [t.get_text() for t in axis.get_ticklabels()]


def cell_texts(ax):
    """``{(col, row): Text}`` of the top-1 annotations."""
    return {
        (int(round(t.get_position()[0])), int(round(t.get_position()[1]))): t
        for t in ax.texts
        if t.get_gid() == "tll-top1"
    }


def marked_cells(ax):
    return {
        (int(round(p.get_x() + p.get_width() / 2)), int(round(p.get_y() + p.get_height() / 2)))
        for p in ax.patches
        if isinstance(p, Rectangle) and p.get_gid() == "tll-next-marker"
    }


def filled(image):
    return np.ma.filled(np.ma.asarray(image.get_array(), dtype=float), np.nan)


# -- display_token ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, shown",
    [
        (" the", "\u2423the"),
        ("\n", "\u23ce"),
        ("$x$", "$x$"),
        ("a_b", "a_b"),
        ("\\alpha", "\\alpha"),
        ("the ", "the\u2423"),
        ("  ", "\u2423\u2423"),
        ("\tif", "\u21e5if"),
        ("New York", "New York"),
        ("\r\n", "\\r\u23ce"),
        ("\x00", "\\x00"),
        ("\u00a0x", "\u237dx"),
        ("", "\u2205"),
        ("{^}", "{^}"),
    ],
)
def test_display_token(text, shown):
    assert display_token(text) == shown


def test_display_token_is_one_line_and_rejects_non_strings():
    assert "\n" not in display_token("a\nb\n") and display_token("a\nb\n") == "a\u23ceb\u23ce"
    with pytest.raises(TypeError, match="str"):
        display_token(5)


# -- plot_lens --------------------------------------------------------------------------------
def test_lens_heatmap_shows_the_result(lens, model, ids):
    b = 1
    fig = render(plot_lens(lens, metric="prob", prompt=b))
    ax = fig.axes[0]
    (image,) = ax.images
    n_layer, _, n_pos, _ = lens.top_ids.shape
    # rows in the result's layer order with origin="lower": final_post drawn at the top
    np.testing.assert_allclose(filled(image), lens.top_probs[:, b, :, 0].numpy(), rtol=1e-6)
    assert image.origin == "lower"
    assert tick_texts(ax.yaxis) == lens.labels
    assert tick_texts(ax.xaxis) == [decode(model.tokenizer, t) for t in ids[b]]
    # one annotation per cell, reading the top-1 token
    cells = cell_texts(ax)
    assert len(cells) == len([t for t in ax.texts if t.get_gid() == "tll-top1"]) == n_layer * n_pos
    for (j, i), text in cells.items():
        assert text.get_text() == decode(model.tokenizer, lens.top_ids[i, b, j, 0])
        assert text.get_parse_math() is False
    # next-token markers exactly where top-1 == the true next token, and those texts are bold
    hits = (lens.top_ids[:, b, :, 0] == lens.next_ids[b].unsqueeze(0)) & (lens.next_ids[b] >= 0)
    expected = {(j, i) for i, j in hits.nonzero().tolist()}
    assert marked_cells(ax) == expected
    assert {c for c, t in cells.items() if t.get_fontweight() == "bold"} == expected
    # colour bar, labelled with the metric
    assert len(fig.axes) == 2 and image.colorbar is not None
    assert "probability" in image.colorbar.ax.get_ylabel()
    # the true next tokens along the top
    (top,) = ax.child_axes
    assert tick_texts(top.xaxis) == [decode(model.tokenizer, t) if t >= 0 else "" for t in lens.next_ids[b]]


def test_lens_markers_where_top1_is_next(lens):
    """Force hits: a result whose top-1 is the true next token in some cells."""
    top_ids = lens.top_ids.clone()
    top_ids[-1, 0, :-1, 0] = lens.next_ids[0, :-1]
    top_ids[0, 0, 2, 0] = lens.next_ids[0, 2]
    forced = with_readout(lens, top_ids=top_ids)
    ax = render(plot_lens(forced)).axes[0]
    n_layer, n_pos = top_ids.shape[0], top_ids.shape[2]
    hits = (top_ids[:, 0, :, 0] == lens.next_ids[0].unsqueeze(0)) & (lens.next_ids[0] >= 0)
    assert marked_cells(ax) == {(j, i) for i, j in hits.nonzero().tolist()}
    assert marked_cells(ax) >= {(j, n_layer - 1) for j in range(n_pos - 1)} | {(2, 0)}
    assert (n_pos - 1, n_layer - 1) not in marked_cells(ax)  # the last token has no next token


@pytest.mark.parametrize(
    "metric, field",
    [
        ("logit", lambda r: r.top_logits[..., 0]),
        ("entropy", lambda r: r.entropy),
        ("kl", lambda r: r.kl_to_final),
        ("loss", lambda r: r.next_token_loss),
    ],
)
def test_lens_metric_values(lens, metric, field):
    fig = render(plot_lens(lens, metric=metric, prompt=0, annotate=False))
    (image,) = fig.axes[0].images
    np.testing.assert_allclose(filled(image), field(lens)[:, 0].numpy(), rtol=1e-6, equal_nan=True)
    assert image.colorbar.ax.get_ylabel() == LENS_METRICS[metric][0]
    assert not [t for t in fig.axes[0].texts if t.get_gid() == "tll-top1"]


def test_lens_rank_is_0_based_log_scaled_and_needs_next_targets(lens, lens_targets):
    fig = render(plot_lens(lens, metric="rank"))
    (image,) = fig.axes[0].images
    assert isinstance(image.norm, SymLogNorm) and image.norm.vmin == 0  # rank 0 (top-1) has a colour
    # 0-based, as target_ranks: 0 = top, said on the colour bar and its first tick
    assert "0 = top" in image.colorbar.ax.get_ylabel()
    assert [t.get_text() for t in image.colorbar.ax.get_yticklabels()][:3] == ["0", "1", "10"]
    expected = lens.target_ranks[:, 0, :, 0].numpy().astype(float)
    expected[:, lens.next_ids[0].numpy() < 0] = np.nan  # the last token has no next token
    np.testing.assert_allclose(filled(image), expected, equal_nan=True)
    with pytest.raises(ValueError, match='targets="next"'):
        plot_lens(with_readout(lens, target_ids=None, target_ranks=None), metric="rank")
    with pytest.raises(ValueError, match='targets="next"'):
        plot_lens(lens_targets, metric="rank")


def test_lens_bad_arguments(lens):
    with pytest.raises(ValueError, match="'prob'.*'logit'.*'rank'.*'entropy'.*'kl'.*'loss'"):
        plot_lens(lens, metric="probability")
    with pytest.raises(ValueError, match="prompt=5 is out of range"):
        plot_lens(lens, prompt=5)
    with pytest.raises(ValueError, match="out of range"):
        plot_lens(lens, positions=[0, 40])


def test_lens_window_and_padding(lens, padded, model, ids):
    ax = render(plot_lens(lens, positions=slice(-3, None))).axes[0]
    assert tick_texts(ax.xaxis) == [decode(model.tokenizer, t) for t in ids[0, -3:]]
    np.testing.assert_allclose(filled(ax.images[0]), lens.top_probs[:, 0, -3:, 0].numpy())
    assert len(cell_texts(ax)) == lens.top_ids.shape[0] * 3
    ax = render(plot_lens(lens, positions=[0, 2])).axes[0]
    assert tick_texts(ax.xaxis) == [decode(model.tokenizer, ids[0, j]) for j in (0, 2)]
    # the short prompt's padding columns are left out
    ax = render(plot_lens(padded, prompt=1, metric="loss")).axes[0]
    assert tick_texts(ax.xaxis) == ["<bos>", "w3", "w4"]
    assert filled(ax.images[0]).shape == (len(padded.labels), 3)
    assert np.isnan(filled(ax.images[0])[:, -1]).all()
    with pytest.raises(ValueError, match="padding"):
        plot_lens(padded, prompt=1, positions=slice(4, None))


def test_lens_single_position_result(model, ids):
    result = tll.logit_lens(model, ids, positions=-1)
    assert not result.has_pos_axis
    ax = render(plot_lens(result, prompt=1)).axes[0]
    assert tick_texts(ax.xaxis) == [decode(model.tokenizer, ids[1, -1])]
    np.testing.assert_allclose(filled(ax.images[0])[:, 0], result.top_probs[:, 1, 0].numpy())
    assert len(cell_texts(ax)) == len(result.labels)


def test_lens_without_input_tokens_labels_positions(lens):
    ax = render(plot_lens(dataclasses.replace(lens, input_ids=None))).axes[0]
    assert tick_texts(ax.xaxis) == [str(p) for p in range(lens.top_ids.shape[2])]
    assert "position" in ax.get_xlabel()


def test_lens_draws_into_given_axes(lens):
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    out = lens.plot(metric="entropy", ax=right)
    assert out is fig and right.images and not left.images
    render(out)


# -- token text that matplotlib would otherwise parse ------------------------------------------
WEIRD = [" the", "\n", "$x$", "a_b", "\\alpha", "\t", "  ", "$\\frac{$", "x^2", "{y}", "%", "#"]


class FakeTokenizer:
    def decode(self, ids):
        return "".join(WEIRD[i] for i in ids)


def weird_lens():
    """A hand-made result whose tokens have spaces, newlines, ``$``, ``_`` and ``\\``."""
    n_layer, n_pos, k = 2, 6, 2
    input_ids = torch.tensor([[0, 1, 2, 3, 4, 5]])
    top_ids = torch.stack([torch.arange(n_pos) + 6, torch.arange(n_pos)], -1) % len(WEIRD)
    top_ids = top_ids.expand(n_layer, 1, n_pos, k).clone()
    top_ids[1, 0, :5, 0] = input_ids[0, 1:]  # the last layer gets the next token right
    cell = torch.rand(n_layer, 1, n_pos, generator=torch.Generator().manual_seed(0))
    readout = Readout(
        top_ids=top_ids,
        top_probs=torch.rand(n_layer, 1, n_pos, k).sort(-1, descending=True).values,
        top_logits=torch.randn(n_layer, 1, n_pos, k),
        entropy=cell,
        kl_to_reference=cell,
        next_token_loss=cell,
    )
    return LensResult(
        labels=["0_pre", "final_post"],
        input_ids=input_ids,
        lengths=torch.tensor([n_pos]),
        positions=torch.arange(n_pos).unsqueeze(0),
        readout=readout,
        next_ids=torch.tensor([[1, 2, 3, 4, 5, -1]]),
        tokenizer=FakeTokenizer(),
    )


def test_token_text_is_shown_literally():
    result = weird_lens()
    fig = render(plot_lens(result))
    ax = fig.axes[0]
    assert tick_texts(ax.xaxis) == [display_token(WEIRD[i]) for i in range(6)]
    assert tick_texts(ax.xaxis)[:3] == ["\u2423the", "\u23ce", "$x$"]
    cells = cell_texts(ax)
    for (j, i), text in cells.items():
        assert text.get_text() == display_token(WEIRD[int(result.top_ids[i, 0, j, 0])])
    assert cells[(1, 1)].get_text() == "$x$" and cells[(3, 1)].get_text() == "\\alpha"
    token_texts = list(cells.values()) + ax.xaxis.get_ticklabels() + ax.child_axes[0].xaxis.get_ticklabels()
    assert all(t.get_parse_math() is False and t.get_usetex() is False for t in token_texts)
    assert marked_cells(ax) == {(j, 1) for j in range(5)}


def test_attribution_title_shows_tokens_literally():
    att = Attribution(
        values=torch.randn(3, 2),
        labels=["embed", "0_attn_out", "0_mlp_out"],
        model_value=torch.tensor([1.0, 2.0]),
        constant=torch.zeros(2),
        by="component",
        answer_ids=torch.tensor([2, 2]),
        wrong_ids=torch.tensor([4, 4]),
        positions=torch.tensor([[5], [5]]),
        n_layers=1,
        n_heads=1,
        tokenizer=FakeTokenizer(),
    )
    ax = render(plot_attribution(att)).axes[0]
    assert "logit($x$) \u2212 logit(\\alpha)" in ax.get_title()
    assert ax.title.get_parse_math() is False
    no_tok = render(plot_attribution(dataclasses.replace(att, tokenizer=None, wrong_ids=None))).axes[0]
    assert "logit(#2)" in no_tok.get_title() and "\u2212" not in no_tok.get_title()


# -- plot_trajectory --------------------------------------------------------------------------
def test_trajectory_mean_band_and_labels(lens_targets):
    fig = render(plot_trajectory(lens_targets))
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == ["w5", "w7"]
    for t, line in enumerate(ax.lines):
        np.testing.assert_allclose(line.get_ydata(), lens_targets.target_probs[:, :, -1, t].mean(1).numpy(), rtol=1e-6)
    assert len(ax.collections) == 2  # one 25-75% band per target
    assert tick_texts(ax.xaxis) == lens_targets.labels
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["w5", "w7"]


def test_trajectory_target_selection(lens_targets):
    for n, target in enumerate(("w7", 1, -1, 7, [7])):
        fig = plot_trajectory(lens_targets, target=target, prompt=0)
        ax = (render(fig) if n == 0 else fig).axes[0]  # rendering once is enough here
        assert [line.get_label() for line in ax.lines] == ["w7"], target
        np.testing.assert_allclose(ax.lines[0].get_ydata(), lens_targets.target_probs[:, 0, -1, 1].numpy())
        assert not ax.collections  # one prompt: no band
    with pytest.raises(ValueError, match="not among this result's targets.*w5"):
        plot_trajectory(lens_targets, target="w9")
    with pytest.raises(ValueError, match="'prob', 'rank', 'logit'"):
        plot_trajectory(lens_targets, metric="entropy")


def test_trajectory_rank_0_based_log_scale(lens_targets):
    ax = render(plot_trajectory(lens_targets, metric="rank", position=2)).axes[0]
    assert ax.get_yscale() == "symlog" and "0 = top" in ax.get_ylabel()
    assert tick_texts(ax.yaxis)[:2] == ["0", "1"]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), lens_targets.target_ranks[:, :, 2, 0].float().mean(1).numpy())


def test_trajectory_next_targets_and_single_position(lens, model, ids):
    ax = render(plot_trajectory(lens, metric="logit")).axes[0]  # default: last position with a next token
    assert ax.lines[0].get_label().startswith("true next token")
    np.testing.assert_allclose(ax.lines[0].get_ydata(), lens.target_logits[:, :, -2, 0].mean(1).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="position=-2"):
        plot_trajectory(lens, position=-1)
    single = tll.logit_lens(model, ids, positions=-1, targets="w5")
    ax = render(plot_trajectory(single)).axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), single.target_probs[:, :, 0].mean(1).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="one position"):
        plot_trajectory(single, position=3)
    with pytest.raises(ValueError, match="no targets"):
        plot_trajectory(with_readout(lens, target_ids=None))
    fig, ax = plt.subplots()
    assert plot_trajectory(single, ax=ax) is fig and ax.lines


# -- plot_lens_metrics / plot_layer_curves -----------------------------------------------------
def test_lens_metrics_ignore_padding_and_nan(padded):
    ax = render(plot_lens_metrics(padded)).axes[0]
    names = [line.get_label() for line in ax.lines]
    assert names == ["entropy", "KL to final", "next-token loss"]
    real = padded.positions < padded.lengths.unsqueeze(1)  # 6 + 3 real positions
    for line, field in zip(ax.lines, (padded.entropy, padded.kl_to_final, padded.next_token_loss)):
        vals = field[:, real].numpy()  # [layer, 9]
        np.testing.assert_allclose(line.get_ydata(), np.nanmean(vals, 1), rtol=1e-5)
    assert len(ax.collections) == 3 and "10\u201390%" in ax.get_title()


def test_lens_metrics_skip_all_nan_loss(model, ids):
    last = tll.logit_lens(model, ids, positions=-1)  # no next token anywhere
    fig, ax = plt.subplots()
    out = render(plot_lens_metrics(last, ax=ax))
    assert out is fig
    assert [line.get_label() for line in ax.lines] == ["entropy", "KL to final"]


def test_layer_curves_public_helper():
    labels = ["0_pre", "1_pre", "final_post"]
    mean, low, high = np.array([3.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.2]), np.array([4.0, 3.0, 1.0])
    fig = render(
        plot_layer_curves(
            labels, {"loss": (mean, low, high), "acc": (torch.tensor([0.1, 0.5, 0.9]),)}, title="eval", ylabel="nats"
        )
    )
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), mean)
    assert len(ax.collections) == 1 and ax.get_title() == "eval" and tick_texts(ax.xaxis) == labels
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(0.2) and band.max() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="2 values but there are 3 labels"):
        plot_layer_curves(labels, {"x": ([1.0, 2.0], None, None)})
    with pytest.raises(ValueError, match="empty"):
        plot_layer_curves(labels, {})


# -- plot_attribution -------------------------------------------------------------------------
def bar_heights(ax):
    return np.array([p.get_height() for p in ax.patches if isinstance(p, Rectangle)])


def test_attribution_component_bars(atts):
    att = atts["component"]
    ax = render(plot_attribution(att)).axes[0]
    np.testing.assert_allclose(bar_heights(ax), att.mean().numpy(), rtol=1e-6)
    assert tick_texts(ax.xaxis) == att.labels
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    (errorbars,) = bars.errorbar.lines[2]  # the vertical error segments
    segments = errorbars.get_segments()
    np.testing.assert_allclose([s[1, 1] - s[0, 1] for s in segments], 2 * att.values.std(1).numpy(), rtol=1e-5)
    title = ax.get_title()
    assert "logit(w5) \u2212 logit(w7)" in title
    assert f"model value {float(att.model_value.mean()):.3g}" in title and "std" in title


def test_attribution_head_heatmap(atts):
    att = atts["head"]
    fig = render(plot_attribution(att))
    ax = fig.axes[0]
    (image,) = ax.images
    np.testing.assert_allclose(filled(image), att.by_head().mean(-1).numpy(), rtol=1e-6)
    assert image.origin == "lower"  # layers go up, as in the lens heatmap and the interactive page
    assert image.norm.vmin == -image.norm.vmax > -np.inf and image.norm.vmax > 0
    assert image.cmap.name.startswith("RdBu") and image.colorbar is not None and len(fig.axes) == 2
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("Head", "Layer")
    assert len([t for t in ax.texts if t.get_gid() == "tll-value"]) == att.n_layers * att.n_heads


def test_attribution_top_neurons(atts):
    att = atts["neuron"]
    ax = render(plot_attribution(att, top_k=5)).axes[0]
    widths = np.array([p.get_width() for p in ax.patches if isinstance(p, Rectangle)])
    mean = att.mean()
    neuron = [i for i, label in enumerate(att.labels) if re.fullmatch(r"L\d+N\d+", label)]
    best = sorted(neuron, key=lambda i: -abs(float(mean[i])))[:5]
    np.testing.assert_allclose(widths[::-1], mean[best].numpy(), rtol=1e-6)  # drawn bottom to top
    labels = [t.get_text() for t in ax.yaxis.get_ticklabels()]
    assert all(re.fullmatch(r"L\d+N\d+", label) for label in labels)
    assert labels[::-1] == [att.labels[i] for i in best]  # strongest at the top
    assert "top 5 of" in ax.get_title()


def test_attribution_accumulated_line(atts):
    att = atts["accumulated"]
    ax = render(plot_attribution(att)).axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), att.mean().numpy(), rtol=1e-6)
    assert tick_texts(ax.xaxis) == att.labels


def test_attribution_kinds_and_errors(atts):
    ax = render(plot_attribution(atts["head"], kind="bar")).axes[0]
    np.testing.assert_allclose(bar_heights(ax), atts["head"].mean().numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="by='head'"):
        plot_attribution(atts["component"], kind="heatmap")
    with pytest.raises(ValueError, match="'bar', 'line', 'heatmap', 'barh'"):
        plot_attribution(atts["component"], kind="pie")
    fig, ax = plt.subplots()
    assert render(atts["component"].plot(ax=ax)) is fig and ax.patches


def test_attribution_at_several_positions(att_positions, atts):
    att = att_positions
    assert att.values.ndim == 3
    ax = render(plot_attribution(att)).axes[0]  # the last column, said in the title
    np.testing.assert_allclose(bar_heights(ax), att.values[:, :, -1].mean(1).numpy(), rtol=1e-6)
    assert f"position {int(att.positions[0, -1])}" in ax.get_title()

    fig = render(plot_attribution_positions(att, prompt=1))
    ax = fig.axes[0]
    (image,) = ax.images
    np.testing.assert_allclose(filled(image), att.values[:, 1].numpy(), rtol=1e-6)
    assert image.norm.vmin == -image.norm.vmax and image.colorbar is not None
    assert tick_texts(ax.xaxis) == [str(int(p)) for p in att.positions[1]]
    assert tick_texts(ax.yaxis) == att.labels

    words = [" a", "$b$", "\n"] + ["c"] * (att.values.shape[2] - 3)
    ax = render(plot_attribution_positions(att, prompt=None, top_k=3, tokens=words)).axes[0]
    assert tick_texts(ax.xaxis) == [display_token(w) for w in words]
    assert len(tick_texts(ax.yaxis)) == 3
    np.testing.assert_allclose(filled(ax.images[0]).shape, (3, att.values.shape[2]))

    with pytest.raises(ValueError, match=r"positions=None"):
        plot_attribution_positions(atts["component"])
    with pytest.raises(ValueError, match="tokens has 2 entries"):
        plot_attribution_positions(att, tokens=["a", "b"])


# -- the demo model, when its weights are present ---------------------------------------------
def test_demo_model_figures():
    from tl_logitlens.demo import WEIGHTS_PATH

    if not WEIGHTS_PATH.exists():
        pytest.skip("the demo model's weights are not built yet")
    model = tll.demo_model()
    tokens = tll.demo.induction_prompt(model)
    result = tll.logit_lens(model, tokens, targets="next")
    windows = [ax for ax in render(plot_lens(result, metric="rank")).axes if ax.images]  # 25 positions: 3 windows
    assert len(windows) == 3
    assert sum((tick_texts(ax.xaxis) for ax in windows), []) == [decode(model.tokenizer, t) for t in tokens[0]]
    att = tll.direct_logit_attribution(model, tokens, answers=int(tokens[0, -11]), by="head")
    render(plot_attribution(att))


def test_every_plot_function_takes_ax_as_its_first_keyword():
    import inspect

    import tl_logitlens.plots as plots

    for name in [n for n in dir(plots) if n.startswith("plot_")]:
        params = list(inspect.signature(getattr(plots, name)).parameters.values())
        keyword_only = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        positional = [p for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        assert keyword_only and keyword_only[0].name == "ax", name
        assert len(positional) <= 2, (
            name,
            [p.name for p in positional],
        )  # the result (plot_layer_curves: labels, curves)


# -- bad arguments: LensInputError, named ------------------------------------------------------
@pytest.fixture(scope="module")
def comparison(model, ids):
    tuned = builders.randomise_lens(tll.TunedLens(model), seed=4)
    return tll.compare_lenses(model, ids, {"logit": None, "tuned": tuned}, progress=False)


@pytest.fixture(scope="module")
def sources(model, ids):
    return tll.direct_logit_attribution(model, ids, answers="w5", by="head", by_source=True)


#: (which drawer, a call with one bad argument, what the error says)
BAD_ARGUMENTS = [
    ("plot_lens-metric", lambda f: plot_lens(f["lens"], metric="nope"), "unknown metric 'nope'"),
    ("plot_lens-prompt", lambda f: plot_lens(f["lens"], prompt=5), "prompt=5 is out of range"),
    ("plot_lens-width", lambda f: plot_lens(f["lens"], width=0), "width must be 'page'"),
    ("plot_trajectory", lambda f: plot_trajectory(f["lens_targets"], metric="nope"), "unknown metric 'nope'"),
    ("plot_layer_curves", lambda f: plot_layer_curves(["a"], {}), "curves is empty"),
    ("plot_lens_metrics", lambda f: plot_lens_metrics(f["lens"], quantiles=(0.9, 0.1)), "quantiles must satisfy"),
    ("plot_group_trajectory", lambda f: plot_group_trajectory(f["lens"]), "needs token groups"),
    ("plot_attribution", lambda f: plot_attribution(f["atts"]["component"], kind="pie"), "unknown kind 'pie'"),
    ("plot_attribution_positions", lambda f: plot_attribution_positions(f["atts"]["component"]), "positions=None"),
    (
        "plot_source_attribution",
        lambda f: plot_source_attribution(f["sources"], top_k=0),
        "top_k must be a positive int",
    ),
    (
        "plot_lens_comparison-statistics",
        lambda f: plot_lens_comparison(f["comparison"], statistics=("perplexity",)),
        "statistics must be",
    ),
    (
        "plot_lens_comparison-band",
        lambda f: plot_lens_comparison(f["comparison"], band=(0.9, 0.1)),
        "band must be None or",
    ),
    ("save_figure", lambda f: save_figure(plt.figure(), io.BytesIO(), dpi=0), "dpi must be a positive finite number"),
    (
        "save_figure-nan",
        lambda f: save_figure(plt.figure(), io.BytesIO(), dpi=float("nan")),
        "dpi must be a positive finite number",
    ),
]


@pytest.mark.parametrize("draw, message", [case[1:] for case in BAD_ARGUMENTS], ids=[case[0] for case in BAD_ARGUMENTS])
def test_every_drawer_refuses_bad_arguments_with_lens_input_error(request, draw, message):
    fixtures = {
        name: request.getfixturevalue(name) for name in ("lens", "lens_targets", "atts", "comparison", "sources")
    }
    with pytest.raises(LensInputError, match=re.escape(message)):
        draw(fixtures)


def test_plots_raise_lens_input_error_not_bare_value_error():
    import ast
    import pathlib

    import tl_logitlens.plots as plots

    bare = []
    for path in sorted(pathlib.Path(plots.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                called = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(called, ast.Name) and called.id == "ValueError":
                    bare.append(f"{path.name}:{node.lineno}")
    assert not bare, f"raise LensInputError (a ValueError that names the bad argument) instead: {bare}"


# -- several lenses --------------------------------------------------------------------------------
def test_lens_comparison_styles_and_bands(comparison):
    from matplotlib.colors import to_hex, to_rgba

    from tl_logitlens.plots.style import LINE_STYLES, METRIC_STYLE

    fig = render(plot_lens_comparison(comparison, statistics=("entropy", "kl_to_final"), band=(0.25, 0.75)))
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == [
        "logit: entropy",
        "logit: kl_to_final",
        "tuned: entropy",
        "tuned: kl_to_final",
    ]
    assert [to_hex(line.get_color()) for line in ax.lines] == [
        to_hex(METRIC_STYLE[s].color) for s in ("entropy", "kl_to_final") * 2
    ]
    assert [line.get_marker() for line in ax.lines] == [LINE_STYLES[n].marker for n in (0, 0, 1, 1)]
    # One light band per lens and statistic in the statistic's colour, under the lines.
    faces = sorted(to_hex(band.get_facecolor()[0], keep_alpha=False) for band in ax.collections)
    assert faces == sorted(to_hex(METRIC_STYLE[s].color) for s in ("entropy", "kl_to_final") * 2)
    assert all(band.get_facecolor()[0][3] < 0.5 for band in ax.collections)
    assert all(band.get_zorder() < line.get_zorder() for band in ax.collections for line in ax.lines)
    tuned = comparison["tuned"]
    edges = np.concatenate([tuned.quantile("entropy", q).numpy() for q in (0.25, 0.75)])
    outlines = [band.get_paths()[0].vertices[:, 1] for band in ax.collections]
    assert any(all(np.isclose(y, v, rtol=1e-6).any() for v in edges) for y in outlines)
    assert to_rgba(ax.lines[0].get_color()) == to_rgba(comparison["logit"].plot().axes[0].lines[2].get_color())
