"""The command line, run as a user would: outputs written, numbers printed, usage errors in one line."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import builders
import pytest
import torch

import tl_logitlens as tll
from tl_logitlens.cli import UsageError, build_parser, main
from tl_logitlens.cli.arguments import check_common
from tl_logitlens.model_access import TransformerBridge


@pytest.fixture(scope="module")
def words():
    """An induction prompt of the demo model as text, and its last word."""
    model = tll.demo_model()
    tokens = tll.demo.induction_prompt(model, n=8, seed=3)
    text = [model.tokenizer.decode([int(t)]) for t in tokens[0, 1:]]
    return " ".join(text[:-1]), text[-1], text[0]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_demo_writes_every_figure_table_and_summary(tmp_path, capsys):
    code, out, err = run(capsys, "demo", "--out", str(tmp_path))
    assert code == 0, err
    for name in (
        "lens_heatmap.png",
        "trajectory.png",
        "lens_metrics.png",
        "attribution_components.png",
        "attribution_heads.png",
        "attribution_neurons.png",
        "lens.csv",
        "attribution_heads.csv",
        "summary.json",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["residual_error"] < 1e-4
    # The built-in model's mechanism shows: the head writing most of the answer sits in the
    # induction layer, and the final layer predicts the answer.
    assert next(iter(summary["top_heads"])).startswith("L1H")
    assert summary["answer"] != summary["wrong"]
    assert summary["lens_at_last_position"][-1]["top1"] == summary["answer"]
    assert "What each layer predicts" in out and "final_post" in out and "Top heads" in out


def test_lens_and_dla_on_the_demo_model(tmp_path, capsys, words):
    prompt, answer, first = words
    code, out, err = run(
        capsys,
        "lens",
        "--model",
        "demo",
        "--prompt",
        prompt,
        "--target",
        answer,
        "--metric",
        "rank",
        "--out",
        str(tmp_path / "lens"),
    )
    assert code == 0, err
    assert (tmp_path / "lens" / "trajectory.png").exists() and (tmp_path / "lens" / "lens.csv").exists()
    assert f"'{answer}': p=" in out
    code, out, err = run(
        capsys,
        "dla",
        "--model",
        "demo",
        "--prompt",
        prompt,
        "--answer",
        answer,
        "--wrong",
        first,
        "--by",
        "head",
        "--out",
        str(tmp_path / "dla"),
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "dla" / "summary.json").read_text())
    assert summary["residual_error"] < 1e-4 and "logit difference" in out


@pytest.mark.skipif(TransformerBridge is None, reason="local HF folders load through TransformerBridge (3.x/4.x)")
def test_local_hugging_face_folder(capsys):
    path = builders.hf_dir("gpt2")
    code, out, err = run(capsys, "dla", "--model", path, "--prompt", "w3 w4 w5", "--answer", "w6", "--by", "neuron")
    assert code == 0, err
    assert "residual error" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["lens", "--model", "./no/such/folder", "--prompt", "x"], "no model directory at './no/such/folder'"),
        (["lens", "--model", "demo", "--prompt", "red", "--metric", "colour"], "invalid choice: 'colour'"),
        (["dla", "--model", "demo", "--prompt", "red", "--answer", "red blue"], "is not a single token"),
        (["dla", "--model", "demo", "--prompt", "red"], "the following arguments are required: --answer"),
    ],
)
def test_usage_errors_exit_2_with_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_help_documents_every_option_with_an_example():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        text = sub.format_help()
        assert "example:" in text and f"tl-logitlens {name}" in text, name
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "tl_logitlens", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "tl-logitlens" in done.stdout


def test_real_model_folder(models_dir, capsys):
    if TransformerBridge is None:
        pytest.skip("needs TransformerBridge")
    code, out, err = run(capsys, "lens", "--model", str(models_dir / "stories260k"), "--prompt", "Once upon a time")
    assert code == 0, err
    assert "final_post" in out


def test_eval_on_a_text_file(tmp_path, capsys, words):
    prompt, _, _ = words
    data = tmp_path / "docs.txt"
    data.write_text("\n".join([prompt, prompt + " " + prompt.split()[0], ""]))
    code, out, err = run(
        capsys, "eval", "--model", "demo", "--data", str(data), "--quiet", "--out", str(tmp_path / "ev")
    )
    assert code == 0, err
    for name in ("lens_eval.csv", "lens_eval.json", "lens_eval.png"):
        assert (tmp_path / "ev" / name).stat().st_size > 0
    assert "final_post" in out and "tokens" in out
    code, out, err = run(capsys, "eval", "--model", "demo", "--data", str(tmp_path / "missing.txt"))
    assert code == 2 and "no data file" in err


# -- options added for issue 8/9: several prompts, token ids, devices, dtypes, formats, errors ------
@pytest.fixture(scope="module")
def demo_tokens():
    """An induction prompt of the demo model as ids (the last word dropped) and that word's id."""
    model = tll.demo_model()
    tokens = tll.demo.induction_prompt(model, n=6, seed=5)
    return model, tokens[:, :-1], int(tokens[0, -1])


def test_tokens_and_id_answers_match_the_models_own_logits(tmp_path, capsys, demo_tokens):
    model, tokens, answer = demo_tokens
    ids = ",".join(str(int(t)) for t in tokens[0])
    wrong = int(tokens[0, 1])
    code, out, err = run(
        capsys,
        "dla",
        "--model",
        "demo",
        "--tokens",
        ids,
        "--answer",
        f"id:{answer}",
        "--wrong",
        f"id:{wrong}",
        "--out",
        str(tmp_path),
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    logits = model(tokens)[0, -1].detach()
    assert abs(summary["model_value"] - float(logits[answer] - logits[wrong])) < 1e-4
    assert summary["answer"] == answer and summary["residual_error"] < 1e-4


def test_several_prompts_text_file_and_repeated_tokens(tmp_path, capsys, words, demo_tokens):
    prompt, answer, first = words
    code, out, err = run(capsys, "lens", "--model", "demo", "--prompt", prompt, "--prompt", "red cat sun red cat")
    assert code == 0, err
    assert out.count("What each layer predicts") == 2 and "(prompt 1, position" in out
    file = tmp_path / "prompts.txt"
    file.write_text(f"{prompt}\n\nred cat sun red cat\n")
    code, out, err = run(
        capsys,
        "dla",
        "--model",
        "demo",
        "--prompts",
        str(file),
        "--answer",
        answer,
        "--answer",
        "sun",
        "--out",
        str(tmp_path / "dla"),
    )
    assert code == 0, err
    assert len(json.loads((tmp_path / "dla" / "summary.json").read_text())["model_values"]) == 2
    _, tokens, _ = demo_tokens
    ids = ",".join(str(int(t)) for t in tokens[0])
    code, out, err = run(capsys, "lens", "--model", "demo", "--tokens", f"{ids};{ids}", "--tokens", ids)
    assert code == 0, err
    assert out.count("What each layer predicts") == 3


def test_position_layers_format_dpi_and_dtype(tmp_path, capsys, words):
    prompt, answer, _ = words
    code, out, err = run(
        capsys,
        "lens",
        "--model",
        "demo",
        "--prompt",
        prompt,
        "--position",
        "2",
        "--layers",
        "0,final_post",
        "--dtype",
        "float64",
        "--format",
        "svg",
        "--dpi",
        "40",
        "--target",
        answer,
        "--out",
        str(tmp_path),
    )
    assert code == 0, err
    assert "position 2)" in out and "0_pre" in out and "1_pre" not in out
    assert (tmp_path / "lens_heatmap.svg").read_text().lstrip().startswith("<?xml")
    assert (tmp_path / "trajectory.svg").exists() and not list(tmp_path.glob("*.png"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dtype"] == "float64" and [r["layer"] for r in summary["lens_at_position"][0]] == [
        "0_pre",
        "final_post",
    ]


def test_accumulated_prints_in_layer_order_and_head_lists_heads(capsys, words):
    prompt, answer, first = words
    code, out, err = run(
        capsys, "dla", "--model", "demo", "--prompt", prompt, "--answer", answer, "--by", "accumulated"
    )
    assert code == 0, err
    printed = [line.split()[0] for line in out.splitlines()[1:] if line.strip()]
    assert printed == ["0_pre", "1_pre", "final_post"]
    code, out, err = run(
        capsys, "dla", "--model", "demo", "--prompt", prompt, "--answer", answer, "--by", "head", "--top", "20"
    )
    assert code == 0, err
    rows, (total,) = out.splitlines()[1:-1], out.splitlines()[-1:]  # the last line says where the rest came from
    printed = [line.split()[0] for line in rows if line.strip()]
    assert printed and all(label.startswith("L") and "H" in label for label in printed)
    assert total.strip().startswith("sum:") and "the constant" in total


def test_dla_by_head_says_where_the_rest_of_the_value_came_from(capsys, words):
    """The heads printed, the heads not printed, the other components and the constant add up to the model's value,
    computed here from the attribution itself (not from the line)."""
    prompt, answer, first = words
    code, out, err = run(
        capsys,
        "dla",
        "--model",
        "demo",
        "--prompt",
        prompt,
        "--answer",
        answer,
        "--wrong",
        first,
        "--by",
        "head",
        "--top-k",
        "3",
    )
    assert code == 0, err
    last = out.splitlines()[-1]
    numbers = [float(x) for x in re.findall(r"[+-]\d+\.\d+", last)]
    shown, heads, others, constant, value = numbers
    att = tll.direct_logit_attribution(tll.demo_model(), prompt, answers=answer, wrong=first, by="head")
    is_head = [bool(re.fullmatch(r"L\d+H\d+", label)) for label in att.labels]
    mean = att.values[:, 0]
    assert shown + heads == pytest.approx(float(mean[torch.tensor(is_head)].sum()), abs=2e-3)
    assert others == pytest.approx(float(mean[~torch.tensor(is_head)].sum()), abs=2e-3)
    assert constant == pytest.approx(float(att.constant[0]), abs=1e-3)
    assert value == pytest.approx(float(att.model_value[0]), abs=1e-3)
    assert shown + heads + others + constant == pytest.approx(value, abs=5e-3)
    assert "the other 5 heads" in last and "the other components (embeddings, MLPs, biases)" in last


def test_eval_on_a_token_file(tmp_path, capsys, demo_tokens):
    _, tokens, _ = demo_tokens
    data = tmp_path / "tokens.pt"
    batch = tokens.repeat(3, 1)
    torch.save(batch, data)
    code, out, err = run(
        capsys, "eval", "--model", "demo", "--data", str(data), "--quiet", "--out", str(tmp_path / "ev")
    )
    assert code == 0, err
    n_tokens = batch.shape[0] * (batch.shape[1] - 1)
    assert out.startswith(f"{n_tokens} tokens")
    assert json.loads((tmp_path / "ev" / "lens_eval.json").read_text())["n_tokens"] == n_tokens


def test_errors_are_one_line_exit_2(tmp_path, capsys):
    existing = tmp_path / "a_file"
    existing.write_text("x")
    binary = tmp_path / "data.txt"
    binary.write_bytes(bytes(range(256)))
    garbage = tmp_path / "data.pt"
    garbage.write_bytes(b"not a torch file at all")
    floats = tmp_path / "floats.pt"
    torch.save(torch.rand(2, 3), floats)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = [
        (["eval", "--model", "demo", "--data", str(binary)], "looks binary"),
        (["eval", "--model", "demo", "--data", str(garbage)], "is not a readable torch file"),
        (["eval", "--model", "demo", "--data", str(floats)], "expected integer token ids"),
        (["lens", "--model", "demo", "--prompt", "red", "--out", str(existing)], "is an existing file, not a folder"),
        (["demo", "--n", "40"], "give 2 <= n <= 31"),
        (["lens", "--model", "demo", "--prompts", str(empty)], "holds no prompt"),
        (["lens", "--model", "demo", "--tokens", "1,2,x"], "'x' is not a token id"),
        (["lens", "--model", "demo", "--tokens", "1,2,3;1,2"], "different lengths [2, 3]"),
        (["dla", "--model", "demo", "--prompt", "red", "--answer", "id:x"], "after 'id:' give a token id"),
        (["lens", "--model", "demo", "--prompt", "red", "--dtype", "float8"], "invalid choice: 'float8'"),
        (["lens", "--model", "demo", "--prompt", "red", "--device", "gpu0"], "is not a device"),
        (["lens", "--model", "demo", "--tokens", "1,2,999"], "must lie in [0, 83)"),
        (["lens", "--model", "demo", "--prompt", "red", "--bogus"], "unrecognized arguments: --bogus"),
    ]
    if not torch.cuda.is_available():
        cases.append((["lens", "--model", "demo", "--prompt", "red", "--device", "cuda"], "CUDA is not available"))
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert existing.read_text() == "x"


@pytest.mark.skipif(TransformerBridge is None, reason="local HF folders load through TransformerBridge (3.x/4.x)")
def test_quiet_unless_verbose(capsys):
    path = builders.hf_dir("gpt2")
    capsys.readouterr()  # building the folder has its own progress bar
    code, out, err = run(capsys, "lens", "--model", path, "--prompt", "w3 w4 w5")
    assert code == 0, err
    assert err == "" and "Loading" not in out  # no progress bar, log line or warning from the libraries


def test_real_model_tokens(models_dir, capsys):
    if TransformerBridge is None:
        pytest.skip("needs TransformerBridge")
    # capp-gpt2 splits text on '|': a space-separated prompt would not mean these tokens.
    code, out, err = run(
        capsys,
        "dla",
        "--model",
        str(models_dir / "capp-gpt2"),
        "--tokens",
        "49,12,7,50",
        "--answer",
        "id:14",
        "--by",
        "accumulated",
    )
    assert code == 0, err
    assert [line.split()[0] for line in out.splitlines()[1:]][-1] == "final_post"


# -- issue 20: every argument checked before torch; writers own their files ---------------------------
_HEAVY = ("torch", "transformer_lens", "transformers", "matplotlib", "pandas")


def _in_fresh_process(argv):
    """``main(argv)`` in a new interpreter: ``(exit status, stderr, the heavy modules it imported)``."""
    code = (
        "import sys, json\n"
        "from tl_logitlens.cli import main\n"
        f"status = main({list(argv)!r})\n"
        f"print(json.dumps([status, [m for m in {_HEAVY!r} if m in sys.modules]]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    status, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    return status, done.stderr, heavy


def test_usage_errors_import_nothing_heavy_and_say_one_line(tmp_path):
    data = tmp_path / "docs.txt"
    data.write_text("w3 w4 w5\n")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    page = tmp_path / "page.html"
    page.write_text("<html>mine</html>")
    cases = [
        (["lens", "--model", "demo", "--tokens", "1,,5"], "--tokens '1,,5' has an empty entry"),
        (["lens", "--model", "demo", "--tokens", "1,5,"], "has an empty entry"),
        (["lens", "--model", "demo", "--tokens", "1," + "9" * 30], "is too large to be a token id"),
        (["lens", "--model", "demo", "--prompt", "red", "--dpi", "nan"], "--dpi nan: give a resolution between"),
        (["lens", "--model", "demo", "--prompt", "red", "--dpi", "100000"], "--dpi 100000: give a resolution"),
        (["lens", "--model", "demo", "--prompt", "red", "--dpi", "inf"], "--dpi inf"),
        (["lens", "--model", "demo", "--prompt", "red", "--top-k", "0"], "--top-k 0: give a positive number"),
        (["lens", "--model", "demo", "--prompt", "red", "--layers", "0,foo"], "'foo' is neither an index nor"),
        (["lens", "--model", "demo", "--prompt", "red", "--position", str(10**30)], "--position 1000000"),
        (["lens", "--model", "demo", "--prompt", "red", "--out", str(foreign)], "holds a file tl_logitlens did not"),
        (["lens", "--model", "demo", "--prompt", "red", "--html", str(page)], "--html: .*was not written|not written"),
        (["eval", "--model", "demo", "--data", str(data), "--max-tokens", str(2**62)], "--max-tokens"),
        (["eval", "--model", "demo", "--data", str(data), "--batch-size", "0"], "--batch-size 0"),
        (["demo", "--seed", str(10**30)], "--seed 1000000"),
        (["train-lens", "--model", "demo", "--data", str(data), "--steps", "0"], "--steps 0: give a positive number"),
        (["train-lens", "--model", "demo", "--data", str(data), "--tokens-per-step", str(2**70)], "--tokens-per-step"),
        (["train-lens", "--model", "demo", "--data", str(data), "--dpi", "-1"], "--dpi -1"),
        (["train-lens", "--model", "demo", "--data", str(data), "--out", str(foreign)], "did not write"),
    ]
    for argv, message in cases:
        status, err, heavy = _in_fresh_process(argv)
        assert status == 2 and len(err.strip().splitlines()) == 1, (argv, err)
        assert __import__("re").search(message, err), (argv, err)
        assert heavy == [], (argv, heavy)
    assert (foreign / "config.json").read_text() == "{}" and page.read_text() == "<html>mine</html>"


def test_out_folders_are_the_commands_own(tmp_path, capsys, words):
    prompt, _, _ = words
    out = tmp_path / "out"
    argv = ["lens", "--model", "demo", "--prompt", prompt, "--out", str(out), "--dpi", "40"]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    code, _, err = run(capsys, *argv)  # its own folder: written again
    assert code == 0, err
    (out / "notes.txt").write_text("mine")
    code, _, err = run(capsys, *argv)
    assert code == 2 and "holds a file tl_logitlens did not write (notes.txt)" in err and "--overwrite" in err
    code, _, err = run(capsys, *argv, "--overwrite")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine" and (out / "lens.csv").is_file()
    if importlib.util.find_spec("plotly") is not None:  # a page inside the folder is the command's own too
        (tmp_path / "o2").mkdir()  # --html's folder must exist
        again = ["lens", "--model", "demo", "--prompt", prompt, "--out", str(tmp_path / "o2"), "--dpi", "40"]
        for _ in range(2):
            code, _, err = run(capsys, *again, "--html", str(tmp_path / "o2" / "lens.html"))
            assert code == 0, err


def test_train_lens_with_nothing_to_train_on_exits_2_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "ones.pt"
    torch.save(torch.tensor([[1], [5], [7]]), data)
    code, out, err = run(capsys, "train-lens", "--model", "demo", "--data", str(data), "--out", str(tmp_path / "lens"))
    assert code == 2 and "no token was scored" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "lens").exists()


# -- a model name that is neither a folder nor reachable -------------------------------------------
def test_a_model_name_that_cannot_be_had_fails_at_once_in_one_line(tmp_path, monkeypatch):
    """``--model stories260k`` (meant: ./stories260k) with the hub out of reach: one line naming the way out, at
    once (the loader would retry for about 30 s, printing log lines), before torch is imported."""
    import time

    env = {
        **__import__("os").environ,
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens there: the connection is refused at once
        "HF_HUB_CACHE": str(tmp_path / "empty-cache"),
        "HF_HUB_OFFLINE": "0",
    }
    script = (
        "import sys\nfrom tl_logitlens.cli import main\ncode = main(sys.argv[1:])\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr)\nsys.exit(code)"
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", script, "lens", "--model", "stories260k", "--prompt", "Once upon"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.perf_counter() - start
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 2 and lines[1] == "no torch", done.stderr
    assert "'stories260k'" in lines[0] and "./stories260k" in lines[0] and "cannot be reached" in lines[0]
    assert elapsed < 10, f"took {elapsed:.1f} s"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UsageError, match="set offline"):
        check_common(build_parser().parse_args(["lens", "--model", "org/some-model", "--prompt", "x"]))
    (tmp_path / "empty-cache" / "models--org--some-model").mkdir(parents=True)  # cached: it loads offline
    check_common(build_parser().parse_args(["lens", "--model", "org/some-model", "--prompt", "x"]))


@pytest.mark.parametrize(
    "preset, expected",
    [({}, "10000"), ({"GOMP_SPINCOUNT": "5"}, "5"), ({"OMP_WAIT_POLICY": "ACTIVE"}, None)],
)
def test_the_command_shortens_openmp_spinning_unless_the_user_chose(monkeypatch, preset, expected):
    # libgomp reads GOMP_SPINCOUNT once, when torch loads it: the command must set it first, and
    # never over the user's own setting.
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = (
        "import os, sys, json\n"
        "from tl_logitlens.cli import main\n"
        "main(['demo', '--n', '0'])\n"
        "print(json.dumps([os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**env, **preset}
    )
    spins, torch_loaded = json.loads(done.stdout.strip().splitlines()[-1])
    # a usage error: main returned before importing torch, the setting already made
    assert (spins, torch_loaded) == (expected, False), done.stderr[-2000:]


def test_the_spin_setting_is_left_alone_once_torch_is_loaded(monkeypatch):
    from tl_logitlens import cli

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cli._short_openmp_spins()  # torch is loaded in this process: setting it now would only mislead
    assert "GOMP_SPINCOUNT" not in os.environ
