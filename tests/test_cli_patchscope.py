"""``tl-logitlens patchscope``: a Patchscope from the terminal, its files, and its one-line errors."""

import json

import tl_logitlens as tll
from tl_logitlens.cli import main

PROMPT = "red cat sun moon red cat"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_patchscope_prints_each_layer_and_writes_its_files(tmp_path, capsys):
    code, out, err = run(
        capsys,
        "patchscope",
        "--model",
        "demo",
        "--prompt",
        PROMPT,
        "--target",
        PROMPT,
        "--quiet",
        "--out",
        str(tmp_path / "scope"),
    )
    assert code == 0, err
    model = tll.demo_model()
    own = tll.patchscope(model, PROMPT, target=PROMPT, progress=False)
    top = [own.decode(int(i)) for i in own.top_ids[:, 0, 0]]
    assert "What the target prompt reads from each layer's state of 'cat'" in out
    for label, token in zip(own.labels, top):
        assert any(line.split()[:2] == [label, repr(token)] for line in out.splitlines()), (label, token)
    summary = json.loads((tmp_path / "scope" / "summary.json").read_text())
    assert summary["target"] == PROMPT and [r["top1"] for r in summary["patchscope_at_position"][0]] == top
    assert (tmp_path / "scope" / "patchscope_heatmap.png").stat().st_size > 0
    assert (tmp_path / "scope" / "patchscope.csv").read_text().startswith("layer,batch,pos,input_token")


def test_patchscope_takes_layers_tokens_and_the_identity_prompt(capsys):
    ids = tll.demo_model().to_tokens(PROMPT)[0].tolist()
    code, out, err = run(
        capsys,
        "patchscope",
        "--model",
        "demo",
        "--tokens",
        ",".join(map(str, ids)),
        "--layers",
        "0,final_post",
        "--position",
        "-2",
        "--quiet",
    )
    assert code == 0, err
    assert "0_pre" in out and "final_post" in out and "1_pre" not in out
    assert "position 5" in out


def test_patchscope_errors_are_one_line_exit_2(tmp_path, capsys):
    scope = ["patchscope", "--model", "demo", "--prompt", PROMPT]
    for argv, message in [
        ([*scope, "--target", " "], "--target is empty"),
        ([*scope, "--layers", "0,,1"], "has an empty entry"),
        ([*scope, "--target", PROMPT, "--layers", "9"], "layer 9 is out of range"),
        ([*scope, "--html", str(tmp_path)], "is a folder"),
        (scope[:3], "one of the arguments --prompt --prompts --tokens is required"),
    ]:
        code, out, err = run(capsys, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
