"""tll.report: the audit page of one prediction. Its numbers come from the analyses tested elsewhere; here:
the page holds every section, its identity checks are measured and pass, its provenance fingerprints the
weights, bad input is refused before any work, and the page draws offline in headless Chromium."""

from __future__ import annotations

import hashlib
import os
import re
import time

import builders
import pytest
import torch

import tl_logitlens as tll
from tl_logitlens.model_access.provenance import weights_sha256

PROMPT = "red cat sun red cat"


@pytest.fixture(scope="module")
def model():
    return tll.demo_model()


@pytest.fixture(scope="module")
def page(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.html"
    tll.report(model, PROMPT, answer="sun", wrong="red", path=path)
    return path


def test_page_holds_every_section(page, model):
    text = page.read_text()
    for needed in (
        "What a lens reading is not",
        "not a causal claim",
        "Top heads' source tokens",
        "Identity checks",
        "Provenance",
        "arxiv.org/abs/2303.08112",
        weights_sha256(model),
        torch.__version__,
        "float32",
    ):
        assert needed in text, needed
    assert text.count('class="tll-figure"') == 5  # lens heatmap, answer by layer, components, heads, neurons
    assert "FAIL" not in text


def test_identity_checks_are_measured_and_small(page):
    rows = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td><td class=(pass|fail)>", page.read_text())
    names = [r[0] for r in rows]
    assert any("DLA by component" in n for n in names) and any("DLA by neuron" in n for n in names)
    assert any("final_post" in n for n in names) and any("sources add up" in n for n in names)
    for name, residual, bound, verdict in rows:
        assert float(residual) <= float(bound) and verdict == "pass", name


def test_weights_hash_changes_with_one_weight():
    model = builders.word_model()
    first = weights_sha256(model)
    assert first == weights_sha256(model) and re.fullmatch(r"[0-9a-f]{64}", first)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1.0
    assert weights_sha256(model) != first
    # independent of the package: the same bytes hashed by hashlib give the same digest for one tensor
    t = torch.arange(6, dtype=torch.float32)
    assert (
        hashlib.sha256(t.numpy().tobytes()).hexdigest()
        == hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()
    )


def test_a_trained_lens_is_read_beside_the_logit_lens(model, tmp_path):
    lens = builders.randomise_lens(tll.TunedLens(model), seed=3)
    path = tll.report(model, PROMPT, answer="sun", lens={"tuned": lens}, path=tmp_path / "r.html")
    assert path.read_text().count('class="tll-figure"') == 6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"answer": "sun moon"}, "answer"),
        ({"answer": "sun", "wrong": "not a token at all"}, "wrong"),
        ({"answer": "sun", "prompt": ["red cat", "sun"]}, "one prompt"),
        ({"answer": "sun", "top_heads": 0}, "top_heads"),
        ({"answer": "sun", "lens": 3}, "lens"),
    ],
)
def test_bad_input_is_refused_before_any_forward_pass(model, tmp_path, kwargs, match):
    args = {"prompt": PROMPT, "path": tmp_path / "r.html", **kwargs}
    builders.raises_before_forward(model, tll.LensInputError, match, lambda: tll.report(model, **args))
    assert not (tmp_path / "r.html").exists()


def test_a_file_it_did_not_write_is_refused(model, tmp_path):
    foreign = tmp_path / "notes.html"
    foreign.write_text("<html>mine</html>")
    builders.raises_before_forward(
        model, tll.LensInputError, "notes.html", lambda: tll.report(model, PROMPT, answer="sun", path=foreign)
    )
    assert foreign.read_text() == "<html>mine</html>"


@pytest.mark.browser
def test_page_draws_offline_in_chromium(driver, page):
    driver.get(page.resolve().as_uri())
    deadline = time.time() + 30
    while time.time() < deadline and driver.execute_script("return document.body.dataset.ready") != "1":
        time.sleep(0.1)
    assert driver.execute_script("return document.body.dataset.ready") == "1", driver.get_log("browser")
    drawn = driver.execute_script(
        "return Array.from(document.querySelectorAll('[id^=tll-plot-]'), d => d.querySelectorAll('.main-svg').length)"
    )
    assert len(drawn) == 5 and all(n > 0 for n in drawn)
    assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    shot = os.environ.get("TLL_REPORT_SCREENSHOT")
    if shot:  # look at the page: TLL_REPORT_SCREENSHOT=/tmp/report.png
        driver.set_window_size(1300, driver.execute_script("return document.body.scrollHeight") + 50)
        driver.save_screenshot(shot)
        driver.set_window_size(1500, 1100)


def test_a_bfloat16_model_passes_its_identity_checks(tmp_path):
    cases = {c.name: c for c in builders.precision_cases((torch.bfloat16,))}
    model = builders.build(cases[next(n for n in cases if n.startswith("llama") or n.startswith("ht-rms"))])
    tokens = builders.tokens(batch=1, seq=8, seed=3)
    text = tll.report(model, tokens, answer=int(tokens[0, 3]), wrong=int(tokens[0, 2]), path=tmp_path / "r.html")
    page = text.read_text()
    assert "bfloat16" in page and "every identity check passed" in page


# -- the command line ----------------------------------------------------------------------------------
def test_cli_writes_the_page(tmp_path, capsys):
    from tl_logitlens.cli import main

    out = tmp_path / "audit.html"
    args = ["report", "--model", "demo", "--prompt", PROMPT, "--answer", "sun", "--wrong", "red", "--html", str(out)]
    assert main(args) == 0
    assert "Identity checks" in out.read_text() and str(out) in capsys.readouterr().out
    assert main(args) == 0  # its own page is replaced on a second run


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--prompt", "red cat"], "one prompt"),
        (["--position", "2"], "last token"),
        (["--top-heads", "0"], "--top-heads"),
        (["--lens", "/no/such/lens"], "no such folder"),
    ],
)
def test_cli_usage_errors(tmp_path, capsys, extra, match):
    from tl_logitlens.cli import main

    args = ["report", "--model", "demo", "--prompt", PROMPT, "--answer", "sun", "--html", str(tmp_path / "a.html")]
    assert main(args + extra) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "a.html").exists()


def test_cli_refuses_a_missing_folder_and_a_foreign_file(tmp_path, capsys):
    from tl_logitlens.cli import main

    base = ["report", "--model", "demo", "--prompt", PROMPT, "--answer", "sun", "--html"]
    assert main(base + [str(tmp_path / "missing" / "a.html")]) == 2
    assert "does not exist" in capsys.readouterr().err
    foreign = tmp_path / "mine.html"
    foreign.write_text("mine")
    assert main(base + [str(foreign)]) == 2
    assert "--overwrite" in capsys.readouterr().err and foreign.read_text() == "mine"
