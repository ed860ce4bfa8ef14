"""Interactive views without a browser: what the figures hold, the page's payload, size, guards.

The page's compressed payloads are decoded here with Python's own base-85 and gzip (not the
package's loader), and the hover texts are compared with strings formatted here from the
result's tensors. test_browser.py checks the same pages drawn and hovered in Chromium.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import sys

import builders
import pytest
import torch

import tl_logitlens as tll
from tl_logitlens.errors import LensInputError
from tl_logitlens.tokentext import display_token, token_text

plotly = pytest.importorskip("plotly", reason="plotly is not installed (pip install tl-logitlens[interactive])")
from tl_logitlens import files  # noqa: E402
from tl_logitlens.plots import interactive  # noqa: E402

PAGE_LIMIT = 2_000_000  # bytes: a 12-layer x 128-position lens page must stay under it


def payload(page: str, name: str) -> bytes:
    """One inlined payload, decoded independently: RFC 1924 base 85 with '.' standing for '<', then gzip."""
    text = re.search(rf'<script id="{name}" type="application/octet-stream">([^<]*)</script>', page).group(1)
    return gzip.decompress(base64.b85decode(text.replace(".", "<")))


def figure_json(page: str) -> dict:
    return json.loads(payload(page, "tll-figure"))


@pytest.fixture(scope="module")
def demo():
    model = tll.demo_model()
    tokens = torch.cat([tll.demo.induction_prompt(model, seed=s) for s in range(2)])
    return model, tokens


def test_page_carries_plotlyjs_and_the_figure(demo, tmp_path):
    model, tokens = demo
    result = tll.logit_lens(model, tokens, targets="next", top_k=2)
    path = result.to_html(tmp_path / "lens.html")
    page = path.read_text(encoding="utf-8")
    from plotly.offline import get_plotlyjs

    assert payload(page, "tll-plotlyjs").decode("utf-8") == get_plotlyjs()
    fig = figure_json(page)
    assert len(fig["data"]) == 2 and [t["visible"] for t in fig["data"]] == [True, False]
    # Hover text of one cell, formatted here: tokens as display_token spells them, HTML-escaped.
    layer, b, j = 1, 1, 14

    def tok(i):
        return (
            display_token(token_text(result.tokenizer, int(i)))
            .replace("&", "&amp;")
            .replace("<", "&lt;")
            .replace(">", "&gt;")
        )

    want = [f"{result.labels[layer]} · pos {j} · {tok(tokens[b, j])}"]
    want += [f"{tok(result.top_ids[layer, b, j, i])}  {float(result.top_probs[layer, b, j, i]):.4g}" for i in range(2)]
    want.append(
        f"next {tok(tokens[b, j + 1])}  p {float(result.target_probs[layer, b, j, 0]):.4g}  "
        f"rank {int(result.target_ranks[layer, b, j, 0])}"
    )
    want.append(
        f"entropy {float(result.entropy[layer, b, j]):.4g} · KL {float(result.kl_to_final[layer, b, j]):.4g} nats"
    )
    assert fig["data"][b]["customdata"][layer][j].split("<br>") == want  # the hover; the cell shows its top-1 token
    top1 = tok(result.top_ids[layer, b, j, 0])
    assert fig["data"][b]["text"][layer][j] in (top1, f"<b>{top1}</b>")
    assert tok(tokens[0, 0]) == "&lt;bos&gt;" and fig["layout"]["xaxis"]["ticktext"][0] == "&lt;bos&gt;"
    # Colours: 4 significant digits of the metric; the last position has no next token.
    assert fig["data"][0]["z"][2][3] == float(f"{float(result.top_probs[2, 0, 3, 0]):.4g}")
    ranks = next(btn for btn in fig["layout"]["updatemenus"][0]["buttons"] if btn["label"] == "next-token rank")
    assert ranks["args"][0]["z"][0][1][-1] is None and ranks["args"][0]["z"][0][1][0] == float(
        result.target_ranks[1, 0, 0, 0]
    )
    assert not list(tmp_path.glob(".*tmp")), "the atomic write left its temporary file"


def test_lens_without_targets_or_position_axis(demo):
    model, tokens = demo
    result = tll.logit_lens(model, tokens, positions=-1)
    fig = interactive.lens_figure(result)
    assert [b["label"] for b in fig.layout.updatemenus[0].buttons] == [
        "top-1 probability",  # the static heatmap's word (plots.style.LENS_METRIC_STYLE)
        "entropy",
        "KL to final",
    ]
    assert len(fig.data[0].z[0]) == 1 and "next" not in fig.data[0].customdata[0][0]
    with pytest.raises(LensInputError, match="target metrics need logit_lens"):
        interactive.lens_figure(result, metric="rank")
    with pytest.raises(LensInputError, match="prompt must index the batch of 2"):
        interactive.lens_figure(result, prompt=2)
    with pytest.raises(LensInputError, match="top_k must be a positive int"):
        interactive.lens_figure(result, top_k=0)


def test_padding_cells_are_gaps():
    model = builders.word_model()
    result = tll.logit_lens(model, ["w5 w6 w5 w6", "w5"], targets="next")
    fig = interactive.lens_figure(result)
    short = int(result.lengths[1])
    assert short < result.positions.shape[1]
    assert all(row[short] is None for row in fig.data[1].z) and fig.data[1].customdata[0][short] == "padding"
    assert fig.data[1].text[0][short] == ""  # no token shown in a padding cell
    assert all(row[short] is not None for row in fig.data[0].z)


def test_attribution_views(demo):
    model, tokens = demo
    heads = tll.direct_logit_attribution(model, tokens[:, :-1], answers=tokens[:, -1].tolist(), by="head")
    fig = interactive.attribution_figure(heads)
    by_head = heads.by_head().double()  # [layer, head, batch]
    assert fig.data[0].z[1][2] == float(f"{float(by_head[1, 2].mean()):.4g}")
    assert fig.data[2].customdata[1][2].split("<br>")[0] == f"L1H2: {float(by_head[1, 2, 1]):+.4g}"
    assert [b.label for b in fig.layout.updatemenus[0].buttons] == [
        "mean over prompts",
        "prompt 0 pos 23",
        "prompt 1 pos 23",
    ]
    neurons = tll.direct_logit_attribution(model, tokens[:, :-1], answers=tokens[:, -1].tolist(), by="neuron")
    fig = interactive.attribution_figure(neurons, top=7)
    mean = neurons.values.double().mean(1)
    order = mean.abs().argsort(descending=True)[:7].tolist()
    assert list(fig.data[0].y) == [neurons.labels[i] for i in order]
    assert list(fig.data[0].x) == [float(f"{float(mean[i]):.4g}") for i in order]


class _Comparison:
    """The interface the comparison view reads: ``.lenses`` and ``[name] -> LensEvaluation``."""

    def __init__(self, evaluations):
        self.lenses, self._ev = list(evaluations), evaluations

    def __getitem__(self, name):
        return self._ev[name]


def test_evaluation_and_comparison_curves(demo):
    from tl_logitlens.evaluate import evaluate_lens

    model, tokens = demo
    ev = evaluate_lens(model, tokens, progress=False)
    fig = interactive.evaluation_figure(ev)
    line = next(t for t in fig.data if t.name == "KL to final")
    assert list(line.y) == [float(f"{v:.4g}") for v in ev.mean("kl_to_final").tolist()]
    half = evaluate_lens(model, tokens[:1], progress=False)
    fig = interactive.comparison_figure(_Comparison({"logit": ev, "one prompt": half}))
    shown = [t.name for t in fig.data if t.visible and t.name]
    assert shown == ["logit", "one prompt"]
    entropy = fig.layout.updatemenus[0].buttons[2]
    assert entropy.label == "entropy" and sum(entropy.args[0]["visible"]) == 6
    assert list(fig.data[5].y) == [float(f"{v:.4g}") for v in half.mean("kl_to_final").tolist()]


def test_names_and_colours_are_the_static_figures(demo):
    """One style table: the interactive views name and colour every metric as the static figures do."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    from tl_logitlens.evaluate import evaluate_lens
    from tl_logitlens.plots import LENS_METRICS as STATIC
    from tl_logitlens.plots.style import LINE_STYLES, METRIC_STYLE, NEG_COLOR, POS_COLOR

    model, tokens = demo
    fig = interactive.lens_figure(tll.logit_lens(model, tokens, targets="next"))
    buttons = {b.label: b.args[0] for b in fig.layout.updatemenus[0].buttons}
    shown = {"prob": "top-1 probability", "entropy": "entropy", "kl": "KL to final", "rank": "next-token rank"}
    for key, name in shown.items():
        label, cmap = STATIC[key]
        assert buttons[name]["colorbar.title.text"] == label
        assert all(scale == buttons[name]["colorscale"][0] for scale in buttons[name]["colorscale"])
        assert [colour for _, colour in buttons[name]["colorscale"][0]] == [
            to_hex(colormaps[cmap](position)) for position, _ in buttons[name]["colorscale"][0]
        ]
    assert fig.data[0].colorbar.title.text == STATIC["prob"][0]

    ev = evaluate_lens(model, tokens, progress=False)
    curves = {t.name: t for t in interactive.evaluation_figure(ev).data if t.name}
    assert {name: t.line.color for name, t in curves.items()} == {
        METRIC_STYLE[s].name: METRIC_STYLE[s].color for s in ("kl_to_final", "next_token_loss", "entropy")
    }
    half = evaluate_lens(model, tokens[:1], progress=False)
    fig = interactive.comparison_figure(_Comparison({"logit": ev, "one prompt": half}))
    means = [t for t in fig.data if t.name]
    assert [t.line.color for t in means] == [
        METRIC_STYLE[s].color for s in ("kl_to_final",) * 2 + ("next_token_loss",) * 2 + ("entropy",) * 2
    ]
    assert [t.line.dash for t in means[:2]] == [LINE_STYLES[0].dash, LINE_STYLES[1].dash]
    with pytest.raises(LensInputError, match="statistics must be"):
        interactive.evaluation_figure(ev, statistics=("top1_accuracy",))

    neurons = tll.direct_logit_attribution(model, tokens[:, :-1], answers=tokens[:, -1].tolist(), by="neuron")
    bars = interactive.attribution_figure(neurons, top_k=7).data[0]
    assert list(bars.marker.color) == [NEG_COLOR if x < 0 else POS_COLOR for x in bars.x]
    with pytest.raises(LensInputError, match="top_k must be a positive int"):
        interactive.attribution_figure(neurons, top_k=0)
    heads = tll.direct_logit_attribution(model, tokens[:, :-1], answers=tokens[:, -1].tolist(), by="head")
    scale = interactive.attribution_figure(heads).data[0].colorscale
    assert [colour for _, colour in scale] == [to_hex(colormaps["RdBu"](float(position))) for position, _ in scale]


def test_missing_plotly_names_the_extra(demo, monkeypatch, tmp_path):
    model, tokens = demo
    result = tll.logit_lens(model, tokens[:1])
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"pip install tl-logitlens\[interactive\]"):
        result.to_html(tmp_path / "x.html")
    with pytest.raises(ImportError, match=r"pip install tl-logitlens\[interactive\]"):
        result.show()
    assert not list(tmp_path.iterdir())


def test_failed_write_keeps_the_old_page(demo, monkeypatch, tmp_path):
    model, tokens = demo
    result = tll.logit_lens(model, tokens[:1])
    path = tmp_path / "page.html"
    path.write_text("old")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(files.os, "replace", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        result.to_html(path, overwrite=True)  # "old" is not a page of ours: replacing it is asked for
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["page.html"]


def test_show_returns_the_figure_outside_notebooks(demo):
    model, tokens = demo
    fig = tll.logit_lens(model, tokens[:1]).show()
    assert fig.layout.meta["view"] == "lens"


def _twelve_layers(n_ctx: int, d_vocab: int):
    if builders.TransformerBridge is not None:
        from transformer_lens.config import TransformerBridgeConfig

        cfg = TransformerBridgeConfig(
            d_model=16,
            n_layers=12,
            n_heads=2,
            d_head=8,
            d_mlp=32,
            d_vocab=d_vocab,
            n_ctx=n_ctx,
            act_fn="gelu",
            normalization_type="LN",
            seed=0,
        )
        return builders.TransformerBridge.boot_native(cfg).eval()
    cfg = builders.HookedTransformerConfig(
        d_model=16,
        n_layers=12,
        n_heads=2,
        d_head=8,
        d_mlp=32,
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
    )
    return builders.HookedTransformer(cfg).eval()


def test_page_size_12_layers_by_128_positions(tmp_path):
    # A random model over 5000 tokens is the hard case for compression: near-uniform top-k
    # tokens and probabilities in every cell.
    model = _twelve_layers(n_ctx=128, d_vocab=5000)
    tokens = torch.randint(0, 5000, (1, 128), generator=torch.Generator().manual_seed(0))
    result = tll.logit_lens(model, tokens, targets="next", top_k=5)
    assert tuple(result.entropy.shape) == (13, 1, 128)
    size = result.to_html(tmp_path / "big.html").stat().st_size
    assert size < PAGE_LIMIT, f"a 12 x 128 lens page is {size:,} bytes"


# -- the command line: --html and the demo's index.html ----------------------------------------
def _cli(capsys, *argv):
    from tl_logitlens.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_html_pages(demo, tmp_path, capsys):
    model, tokens = demo
    words = [model.tokenizer.decode([int(t)]) for t in tokens[0, 1:9]]
    prompt = " ".join(words)
    code, out, err = _cli(capsys, "lens", "--model", "demo", "--prompt", prompt, "--html", str(tmp_path / "lens.html"))
    assert code == 0, err
    fig = figure_json((tmp_path / "lens.html").read_text(encoding="utf-8"))
    direct = tll.logit_lens(model, prompt, targets="next")
    assert fig["data"][0]["customdata"][-1][3].split("<br>")[-1] == (
        f"entropy {float(direct.entropy[-1, 0, 3]):.4g} · KL {float(direct.kl_to_final[-1, 0, 3]):.4g} nats"
    )
    assert f"rank {int(direct.target_ranks[0, 0, 3, 0])}" in fig["data"][0]["customdata"][0][3]
    code, out, err = _cli(
        capsys,
        "dla",
        "--model",
        "demo",
        "--prompt",
        prompt,
        "--answer",
        words[0],
        "--by",
        "head",
        "--html",
        str(tmp_path / "dla.html"),
    )
    assert code == 0, err
    assert figure_json((tmp_path / "dla.html").read_text(encoding="utf-8"))["layout"]["meta"]["by"] == "head"
    data = tmp_path / "docs.txt"
    data.write_text(prompt + "\n" + prompt)
    code, out, err = _cli(
        capsys, "eval", "--model", "demo", "--data", str(data), "--quiet", "--html", str(tmp_path / "ev.html")
    )
    assert code == 0, err
    assert figure_json((tmp_path / "ev.html").read_text(encoding="utf-8"))["layout"]["meta"]["view"] == "evaluation"


@pytest.mark.parametrize(
    "where, message",
    [
        ("", "is a folder; name the page's file"),
        ("a_file/page.html", "is a file, not a folder"),
    ],
)
def test_cli_html_refused_before_any_work(tmp_path, capsys, monkeypatch, where, message):
    import tl_logitlens.cli.commands as commands

    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setattr(commands, "load_model", lambda *a: pytest.fail("loaded the model before checking --html"))
    code, out, err = _cli(capsys, "lens", "--model", "demo", "--prompt", "red", "--html", str(tmp_path / where))
    assert code == 2 and message in err


def test_demo_index_links_every_file(tmp_path, capsys):
    code, out, err = _cli(capsys, "demo", "--out", str(tmp_path))
    assert code == 0, err
    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    files = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("index.html", tll.files.MANIFEST))
    assert {"lens.html", "attribution_heads.html", "attribution_components.html", "summary.json"} <= set(files)
    for name in files:
        assert f'href="{name}"' in index, name
    for name in files:
        if name.endswith(".png"):
            assert f'<img src="{name}"' in index
    hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert hidden == [tll.files.MANIFEST], "temporary files left behind"  # the folder's record of what it wrote


def test_lens_from_a_cache_names_positions(demo):
    model, tokens = demo
    _, cache = model.run_with_cache(tokens[:1])
    result = tll.logit_lens(model, cache=cache)
    assert result.input_ids is None
    fig = interactive.lens_figure(result)
    assert fig.data[0].customdata[1][3].split("<br>")[0] == f"{result.labels[1]} · pos 3"
    assert list(fig.layout.xaxis.ticktext[:3]) == ["0", "1", "2"]


def test_lens_comparison_page(demo, tmp_path):
    """``LensComparison.to_html`` writes the comparison view: each lens's KL curve, values from its evaluation."""
    model, tokens = demo
    tuned = builders.randomise_lens(tll.TunedLens(model), seed=1, scale=0.05)
    comparison = tll.compare_lenses(model, tokens, {"logit": None, "tuned": tuned}, progress=False)
    comparison.to_html(tmp_path / "cmp.html")
    data = figure_json((tmp_path / "cmp.html").read_text())["data"]
    for name in ("logit", "tuned"):
        line = next(t for t in data if t.get("name") == name and t.get("visible", True) is True)
        expected = [float(f"{v:.4g}") for v in comparison[name].mean("kl_to_final").tolist()]
        assert line["y"] == expected
    assert comparison["logit"].mean("kl_to_final")[0] != comparison["tuned"].mean("kl_to_final")[0]


# -- pages that read well: cell text, colour scales, names, one plotly.js ----------------------------
def test_head_page_colour_scale_spans_the_heads_and_names_the_tokens(demo):
    """The head page draws heads only, so its colour scale spans them (not the MLPs), and it names what it
    attributes: logit(answer) − logit(wrong), as the static figure does."""
    model, _ = demo
    tokens = tll.demo.induction_prompt(model, seed=1)  # a prompt whose MLP writes far more than any head
    answer, wrong = int(tokens[0, -1]), int(tokens[0, 1])
    att = tll.direct_logit_attribution(model, tokens[:, :-1], answers=answer, wrong=wrong, by="head")
    fig = interactive.attribution_figure(att)
    heads = att.by_head()  # [layer, head, batch]: the cells of every menu option (mean and each prompt)
    largest = max(float(heads.double().mean(-1).abs().max()), float(heads.abs().max()))
    everything = float(att.values.abs().max())
    assert everything > 1.5 * largest  # a scale over every component would wash the heads out
    assert fig.data[0].zmax == pytest.approx(largest, rel=1e-6) and fig.data[0].zmin == -fig.data[0].zmax
    name = lambda i: display_token(token_text(model.tokenizer, i))  # noqa: E731
    assert f"logit({name(answer)}) \u2212 logit({name(wrong)})" in fig.layout.title.text
    assert fig.data[0].text[1][2] == format(float(heads[1, 2].double().mean()), ".2f")  # each cell shows its value
    rest = fig.layout.title.text.split("<br>")[1]
    is_head = torch.tensor([bool(re.fullmatch(r"L\d+H\d+", label)) for label in att.labels])
    assert f"other components (embeddings, MLPs, biases) {float(att.values[~is_head].mean(-1).sum()):+.3g}" in rest


def test_lens_page_cells_show_the_top_token_and_pan_when_wide():
    model = _twelve_layers(n_ctx=128, d_vocab=5000)
    tokens = torch.randint(0, 5000, (1, 128), generator=torch.Generator().manual_seed(0))
    result = tll.logit_lens(model, tokens, targets="next", top_k=2)
    fig = interactive.lens_figure(result)
    assert fig.data[0].text[3][7] == f"#{int(result.top_ids[3, 0, 7, 0])}"  # no tokenizer: #id, as everywhere
    shown = fig.layout.xaxis.range
    assert shown is not None and shown[0] == -0.5 and shown[1] < 127  # the first positions; the page pans
    assert fig.layout.width <= 2600 and "drag sideways" in fig.layout.title.text
    assert fig.layout.dragmode == "pan"


def _px_above_plot(fig, menu):
    """How many px a menu's bottom sits above the plot area (its paper y is relative to the plot area)."""
    plot = fig.layout.height - fig.layout.margin.t - fig.layout.margin.b
    return (menu.y - 1) * plot


def test_menus_sit_just_above_the_plot_on_short_and_tall_pages(demo):
    # A fixed paper y (1.1) put a 40-neuron page's menu over its title, and a 25-entry lens page's off the top.
    demo, tokens = demo
    tall = tll.logit_lens(_twelve_layers(n_ctx=16, d_vocab=50), torch.arange(16)[None], incl_mid=True)
    figures = [
        interactive.lens_figure(tll.logit_lens(demo, tokens)),
        interactive.lens_figure(tall),
        interactive.attribution_figure(tll.direct_logit_attribution(demo, tokens, answers=3, by="neuron"), top_k=40),
        interactive.attribution_figure(tll.direct_logit_attribution(demo, tokens, answers=3, by="head")),
    ]
    assert len(tall.labels) == 25 and figures[1].layout.height > 700 and figures[2].layout.height > 900
    for fig in figures:
        for menu in fig.layout.updatemenus:
            assert 8 <= _px_above_plot(fig, menu) <= 20, (fig.layout.meta, fig.layout.height)


def test_plotly_directory_pages_share_one_plotly_js(demo, tmp_path):
    model, tokens = demo
    lens = tll.logit_lens(model, tokens, targets="next")
    heads = tll.direct_logit_attribution(model, tokens[:, :-1], answers=tokens[:, -1].tolist(), by="head")
    lens.to_html(tmp_path / "lens.html", plotly="directory")
    library = tmp_path / "plotly.min.js"
    first = library.stat().st_mtime_ns
    heads.to_html(tmp_path / "heads.html", plotly="directory")
    assert library.stat().st_mtime_ns == first  # the same text is not written again
    from plotly.offline import get_plotlyjs

    text = library.read_text(encoding="utf-8")
    assert text.startswith(files.JS_MARK.decode()) and text.endswith(get_plotlyjs())
    for page in ("lens.html", "heads.html"):
        html = (tmp_path / page).read_text(encoding="utf-8")
        assert '<script src="plotly.min.js"' in html and 'id="tll-plotlyjs"' not in html
        assert len(html) < 200_000  # the figure only
    assert figure_json((tmp_path / "lens.html").read_text())["data"][0]["z"] == lens_json(lens)
    inline = lens.to_html(tmp_path / "inline.html").stat().st_size
    assert inline > 10 * (tmp_path / "lens.html").stat().st_size
    cdn = lens.to_html(tmp_path / "cdn.html", plotly="cdn").read_text()
    assert re.search(r'<script src="https://cdn\.plot\.ly/plotly-[\d.]+\.min\.js"', cdn)
    with pytest.raises(LensInputError, match="plotly must be 'inline'"):
        lens.to_html(tmp_path / "x.html", plotly="local")


def lens_json(lens):
    return interactive.lens_figure(lens).to_plotly_json()["data"][0]["z"]


def test_a_plotly_js_the_package_did_not_write_is_kept(demo, tmp_path):
    model, tokens = demo
    lens = tll.logit_lens(model, tokens[:1])
    (tmp_path / "plotly.min.js").write_text("/* my own build */")
    with pytest.raises(LensInputError, match="plotly.min.js.*not written by tl_logitlens"):
        lens.to_html(tmp_path / "lens.html", plotly="directory")
    assert (tmp_path / "plotly.min.js").read_text() == "/* my own build */" and not (tmp_path / "lens.html").exists()
    lens.to_html(tmp_path / "lens.html", plotly="directory", overwrite=True)
    assert (tmp_path / "plotly.min.js").read_text().startswith(files.JS_MARK.decode())


def test_cli_html_inside_out_and_in_a_new_folder(demo, tmp_path, capsys):
    """--out DIR --html DIR/lens.html works (the folder is made, the page and its plotly.min.js are recorded as the
    folder's own, so a rerun is not refused); --html into a folder that does not exist yet creates it."""
    out = tmp_path / "run"
    argv = ["lens", "--model", "demo", "--prompt", "red cat sun", "--out", str(out), "--html", str(out / "lens.html")]
    for _ in range(2):
        code, _, err = _cli(capsys, *argv)
        assert code == 0, err
    assert {"lens.html", "plotly.min.js", "lens_heatmap.png"} <= {p.name for p in out.iterdir()}
    recorded = json.loads((out / files.MANIFEST).read_text())["files"]
    assert {"lens.html", "plotly.min.js"} <= set(recorded)
    scope = tmp_path / "scope"  # patchscope writes its page the same way
    argv = ["patchscope", "--model", "demo", "--prompt", "red cat sun", "--layers", "0", "--quiet"]
    for _ in range(2):
        code, _, err = _cli(capsys, *argv, "--out", str(scope), "--html", str(scope / "scope.html"))
        assert code == 0, err
    assert {"scope.html", "plotly.min.js"} <= set(json.loads((scope / files.MANIFEST).read_text())["files"])
    code, _, err = _cli(
        capsys,
        "dla",
        "--model",
        "demo",
        "--prompt",
        "red cat sun",
        "--answer",
        "sun",
        "--html",
        str(tmp_path / "new" / "deeper" / "dla.html"),
        "--plotly",
        "inline",
    )
    assert code == 0, err
    page = (tmp_path / "new" / "deeper" / "dla.html").read_text()
    assert 'id="tll-plotlyjs"' in page and not (tmp_path / "new" / "deeper" / "plotly.min.js").exists()


def test_demo_pages_share_one_plotly_js_and_include_neurons(tmp_path, capsys):
    code, out, err = _cli(capsys, "demo", "--out", str(tmp_path), "--dpi", "50")
    assert code == 0, err
    pages = sorted(p.name for p in tmp_path.glob("*.html") if p.name != "index.html")
    assert pages == [
        "attribution_components.html",
        "attribution_heads.html",
        "attribution_neurons.html",
        "lens.html",
    ]
    assert [p.name for p in tmp_path.glob("*.js")] == ["plotly.min.js"]
    for name in pages:
        assert '<script src="plotly.min.js"' in (tmp_path / name).read_text()
    total = sum((tmp_path / name).stat().st_size for name in pages) + (tmp_path / "plotly.min.js").stat().st_size
    assert total < 5_000_000 and sum((tmp_path / name).stat().st_size for name in pages) < 500_000
    assert (tmp_path / "attribution_heads.png").is_file()  # the CLI's dla --by head writes this name too
    assert 'href="attribution_neurons.html"' in (tmp_path / "index.html").read_text()
