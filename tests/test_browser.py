"""Interactive pages opened in a real headless Chromium: hovered, switched, and read back from the DOM.

The expected tooltip lines are formatted here from the result's tensors (the display format
is documented in tl_logitlens.interactive); the browser runs offline (network emulated off),
so a page that fetched anything would not draw. Skips with the reason when Chromium,
chromedriver, selenium or plotly is missing (the ``driver`` fixture, in conftest.py: the
real-model tier opens its pages with it too).
"""

from __future__ import annotations

import time

import pytest
import torch

import tl_logitlens as tll
from tl_logitlens.tokentext import display_token, token_text

pytestmark = pytest.mark.browser


def open_page(drv, path):
    drv.get(path.resolve().as_uri())
    deadline = time.time() + 20
    while time.time() < deadline:
        if drv.execute_script("const g = document.getElementById('tll-plot'); return g && g.dataset.ready === '1';"):
            return
        time.sleep(0.05)
    raise AssertionError(
        f"the page never drew: {drv.find_element('id', 'tll-plot').text!r}, log {drv.get_log('browser')}"
    )


def hover(drv, xval, yval, trace_axes=("xaxis", "yaxis")):
    """Move the real mouse pointer over data coordinates (xval, yval) and return the tooltip's lines."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    x, y = drv.execute_script(
        "const gd = document.getElementById('tll-plot'), fl = gd._fullLayout, r = gd.getBoundingClientRect();"
        "const xa = fl[arguments[2]], ya = fl[arguments[3]];"
        "return [r.left + xa._offset + xa.l2p(arguments[0]), r.top + ya._offset + ya.l2p(arguments[1])];",
        xval,
        yval,
        *trace_axes,
    )
    drv.execute_script("Plotly.Fx.unhover(document.getElementById('tll-plot'));")  # no stale tooltip to read
    action = ActionBuilder(drv, duration=10)  # ms per move (the default 250 only slows the test)
    action.pointer_action.move_to_location(1, 1)  # leave first so the same cell hovers anew
    action.pointer_action.move_to_location(int(round(x)), int(round(y)))
    action.perform()
    deadline = time.time() + 5
    while time.time() < deadline:
        lines = drv.execute_script(
            "const t = document.querySelector('.hoverlayer .hovertext text.nums');"
            "if (!t) return null;"
            "const spans = t.querySelectorAll('tspan.line');"
            "return spans.length ? Array.from(spans, s => s.textContent) : [t.textContent];"
        )
        if lines:
            return lines
        time.sleep(0.05)
    raise AssertionError("no tooltip appeared")


def click_menu(drv, menu_index, label):
    """Open the menu ``menu_index`` with a real click and click its entry ``label``."""
    from selenium.webdriver.common.by import By

    headers = drv.find_elements(By.CSS_SELECTOR, ".updatemenu-header")
    headers[menu_index].click()
    for button in drv.find_elements(By.CSS_SELECTOR, ".updatemenu-dropdown-button"):
        if button.text == label:
            button.click()
            return
    raise AssertionError(f"no menu entry {label!r}")


def console_errors(drv):
    return [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]


def tok(result, i):
    # Token text as the package spells it in figures, with plotly's HTML entities decoded by the browser.
    return display_token(token_text(result.tokenizer, int(i)))


def g4(x):
    return f"{float(x):.4g}"


def expected_lens_lines(result, layer, b, j, k):
    pos = int(result.positions[b, j])
    lines = [f"{result.labels[layer]} · pos {pos} · {tok(result, result.input_ids[b, pos])}"]
    for i in range(k):
        lines.append(f"{tok(result, result.top_ids[layer, b, j, i])}  {g4(result.top_probs[layer, b, j, i])}")
    tid = int(result.target_ids[layer, b, j, 0])
    if tid < 0:
        lines.append("next: none")
    else:
        lines.append(
            f"next {tok(result, tid)}  p {g4(result.target_probs[layer, b, j, 0])}"
            f"  rank {int(result.target_ranks[layer, b, j, 0])}"
        )
    lines.append(f"entropy {g4(result.entropy[layer, b, j])} · KL {g4(result.kl_to_final[layer, b, j])} nats")
    return lines


@pytest.fixture(scope="module")
def lens_page(tmp_path_factory):
    model = tll.demo_model()
    tokens = torch.cat([tll.demo.induction_prompt(model, seed=s) for s in range(2)])
    result = tll.logit_lens(model, tokens, targets="next", top_k=3)
    path = tmp_path_factory.mktemp("pages") / "lens.html"
    result.to_html(path)
    return result, path


def test_lens_tooltips_menus_and_console(driver, lens_page):
    result, path = lens_page
    open_page(driver, path)
    # Cells chosen to cover: the <bos> input (an HTML-special token), the induction half, the last
    # position (no next token), the first and final layers.
    for layer, j in ((0, 0), (1, 5), (len(result.labels) - 1, 17), (2, result.positions.shape[1] - 1)):
        assert hover(driver, j, layer) == expected_lens_lines(result, layer, 0, j, 3), (layer, j)

    def z():
        return driver.execute_script("const gd = document.getElementById('tll-plot');return gd.data.map(t => t.z);")

    def image():
        return driver.execute_script(
            "return Array.from(document.querySelectorAll('.hm image'), i => i.getAttribute('href'));"
        )

    z_prob, img_prob = z(), image()
    assert z_prob[0][2][7] == float(g4(result.top_probs[2, 0, 7, 0]))
    click_menu(driver, 0, "entropy")
    z_ent, img_ent = z(), image()
    assert z_ent != z_prob and img_ent != img_prob, "the metric menu did not change the heatmap"
    for b in range(2):
        for layer in (0, 2):
            for j in (2, 11):
                assert z_ent[b][layer][j] == float(g4(result.entropy[layer, b, j]))
    bar = driver.execute_script("return document.querySelector('.colorbar .cbtitle').textContent;")
    assert bar == "entropy (nats)"
    click_menu(driver, 0, "next-token rank")
    assert z()[0][1][j] == float(result.target_ranks[1, 0, j, 0])
    # The last position has no next token: a gap in the rank colours, not rank -1.
    assert z()[0][0][result.positions.shape[1] - 1] is None

    click_menu(driver, 1, "prompt 1")
    assert hover(driver, 9, 2) == expected_lens_lines(result, 2, 1, 9, 3)
    assert console_errors(driver) == []


def test_page_is_self_contained(lens_page):
    _, path = lens_page
    text = path.read_text(encoding="utf-8")
    assert "<script src" not in text and "<link" not in text and "http://" not in text and "https://" not in text
    # The network is off in the driver fixture: test_lens_tooltips_menus_and_console drew the page offline.


def test_attribution_heads_and_evaluation_curves(driver, tmp_path):
    model = tll.demo_model()
    tokens = torch.cat([tll.demo.induction_prompt(model, seed=s) for s in range(3)])
    att = tll.direct_logit_attribution(model, tokens[:, :-1], answers=tokens[:, -1].tolist(), by="head")
    att.to_html(tmp_path / "heads.html")
    open_page(driver, tmp_path / "heads.html")
    heads = att.by_head()  # [layer, head, batch]
    for layer, head in ((0, 0), (att.n_layers - 1, att.n_heads - 1), (1, 2)):
        mean = heads[layer, head].double().mean()
        assert hover(driver, head, layer) == [f"L{layer}H{head}: {float(mean):+.4g}", "mean over 3 cells"]
    click_menu(driver, 0, f"prompt 2 pos {int(att.positions[2, 0])}")
    b = 2
    assert hover(driver, 1, 1) == [
        f"L1H1: {float(heads[1, 1, b]):+.4g}",
        f"model {float(att.model_value[b]):+.4g} · constant {float(att.constant[b]):+.4g}",
        f"logit({display_token(token_text(model.tokenizer, int(tokens[b, -1])))})",  # prompts differ: its own answer
    ]

    from tl_logitlens.evaluate import evaluate_lens

    ev = evaluate_lens(model, tokens, progress=False)
    ev.to_html(tmp_path / "eval.html")
    open_page(driver, tmp_path / "eval.html")
    layer = 1
    mean = float(ev.mean("entropy")[layer])
    lines = hover(driver, layer, mean)
    assert lines == [
        f"entropy · {ev.labels[layer]}",
        f"mean {mean:.4g}",
        f"q25 {float(ev.quantile('entropy', 0.25)[layer]):.4g} · q75 {float(ev.quantile('entropy', 0.75)[layer]):.4g}",
    ]
    assert console_errors(driver) == []
