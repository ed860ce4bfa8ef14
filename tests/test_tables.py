"""Tables and summaries of results: the vectorised ``to_dataframe`` equals a plain row loop written
here (the layout it replaced), ``repr`` summarises shapes, and importing the package stays cheap."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import tl_logitlens as tll

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return tll.demo_model()


@pytest.fixture(scope="module")
def prompts(model):
    """Two induction prompts as text of different lengths: the batch is right-padded."""
    long = tll.demo.induction_prompt(model, n=6, seed=1)[0, 1:]
    short = tll.demo.induction_prompt(model, n=3, seed=2)[0, 1:]
    return [" ".join(model.tokenizer.decode([int(t)]) for t in row) for row in (long, short)]


# -- reference tables: one Python loop per row, as simple as it gets -------------------------
def lens_rows(result):
    pos_axis = result.entropy.ndim == 3
    rows = []
    for li, label in enumerate(result.labels):
        for b in range(result.positions.shape[0]):
            for j in range(result.positions.shape[1]):
                pos = int(result.positions[b, j])
                if pos >= int(result.lengths[b]):
                    continue
                cell = (li, b, j) if pos_axis else (li, b)
                metrics = {
                    "entropy": float(result.entropy[cell]),
                    "kl_to_final": float(result.kl_to_final[cell]),
                    "next_token_loss": float(result.next_token_loss[cell]),
                }
                if result.target_ids is not None:
                    metrics["target_id"] = int(result.target_ids[cell][0])
                    metrics["target_prob"] = float(result.target_probs[cell][0])
                    metrics["target_rank"] = int(result.target_ranks[cell][0])
                for r in range(result.top_ids.shape[-1]):
                    token_id = int(result.top_ids[cell][r])
                    rows.append(
                        {
                            "layer": label,
                            "batch": b,
                            "pos": pos,
                            "input_token": None
                            if result.input_ids is None
                            else result.decode(int(result.input_ids[b, pos])),
                            "rank": r,
                            "token_id": token_id,
                            "token": result.decode(token_id),
                            "prob": float(result.top_probs[cell][r]),
                            "logit": float(result.top_logits[cell][r]),
                            **metrics,
                        }
                    )
    return pd.DataFrame.from_records(rows)


def attribution_rows(att):
    values = att.values if att.values.ndim == 3 else att.values.unsqueeze(-1)
    mv = att.model_value.reshape(values.shape[1], -1)
    const = att.constant.reshape(values.shape[1], -1)
    rows = []
    for c, label in enumerate(att.labels):
        for b in range(values.shape[1]):
            for j in range(values.shape[2]):
                rows.append(
                    {
                        "component": label,
                        "batch": b,
                        "pos": int(att.positions[b, j]),
                        "value": float(values[c, b, j]),
                        "model_value": float(mv[b, j]),
                        "constant": float(const[b, j]),
                    }
                )
    return pd.DataFrame.from_records(rows)


def same_table(ours, reference):
    assert list(ours.columns) == list(reference.columns)
    assert len(ours) == len(reference)
    pd.testing.assert_frame_equal(ours.reset_index(drop=True), reference, check_dtype=False, check_exact=True)
    for column in ours.columns:  # numbers stay numbers, text stays text
        assert (ours[column].dtype.kind in "if") == (reference[column].dtype.kind in "if"), column


def test_lens_table_padded_batch_with_targets(model, prompts):
    result = tll.logit_lens(model, prompts, top_k=3, targets=["red", "sun"])
    assert bool((result.lengths < result.positions.shape[1]).any())  # padding present, must be left out
    frame = result.to_dataframe()
    same_table(frame, lens_rows(result))
    assert len(frame) == len(result.labels) * int(result.lengths.sum()) * 3


def test_lens_table_one_position_next_targets_and_layers(model, prompts):
    result = tll.logit_lens(model, prompts, positions=-1, targets="next", layers=[0, -1])
    assert not result.has_pos_axis
    same_table(result.to_dataframe(), lens_rows(result))


def test_lens_table_from_a_cache_has_no_input_tokens(model):
    tokens = tll.demo.induction_prompt(model, n=4)
    _, cache = model.run_with_cache(tokens)
    result = tll.logit_lens(model, cache=cache, top_k=2)
    frame = result.to_dataframe()
    same_table(frame, lens_rows(result))
    assert frame["input_token"].isna().all()


@pytest.mark.parametrize("by, positions", [("neuron", None), ("head", -1), ("accumulated", [1, 3])])
def test_attribution_table(model, by, positions):
    tokens = torch.cat([tll.demo.induction_prompt(model, n=5, seed=s) for s in range(2)])
    att = tll.direct_logit_attribution(
        model,
        tokens,
        answers=[int(tokens[0, 1]), int(tokens[1, 2])],
        wrong=int(tokens[0, 3]),
        by=by,
        positions=positions,
    )
    same_table(att.to_dataframe(), attribution_rows(att))


def test_repr_summarises_shapes(model, prompts):
    result = tll.logit_lens(model, prompts, top_k=4, targets="next")
    text = repr(result)
    assert text.startswith("LensResult(labels=['0_pre', ..., 'final_post'] (3), batch=2, pos=")
    assert "top_k=4" in text and "targets=1" in text and "norm='recompute'" in text
    assert "tensor(" not in text and len(text) < 200
    att = tll.direct_logit_attribution(model, prompts, answers="red", by="head")
    text = repr(att)
    assert text.startswith("Attribution(by='head', labels=['embed', ..., ") and "batch=2" in text
    assert "tensor(" not in text and len(text) < 200
    assert "LensEvaluation(" in repr(tll.evaluate_lens(model, prompts, progress=False))


def test_top_after_by_head_ranks_heads_unless_asked(model):
    tokens = tll.demo.induction_prompt(model, n=8, seed=4)
    att = tll.direct_logit_attribution(model, tokens[:, :-1], answers=int(tokens[0, -1]), by="head")
    mean = att.values.mean(1)
    heads = [(label, float(v)) for label, v in zip(att.labels, mean.tolist()) if label.startswith("L") and "H" in label]
    expected = sorted(heads, key=lambda item: -abs(item[1]))
    assert att.top(len(att.labels)) == expected  # every head, no embedding or MLP among them
    everything = att.top(len(att.labels), include_other=True)
    assert len(everything) == len(att.labels)
    assert any(not label.startswith("L") for label, _ in everything)
    assert [abs(v) for _, v in everything] == sorted((abs(v) for _, v in everything), reverse=True)
    component = tll.direct_logit_attribution(model, tokens[:, :-1], answers=int(tokens[0, -1]))
    assert len(component.top(100)) == len(component.labels)  # by component: nothing is filtered


def _python(code):
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


HEAVY = ("torch", "transformer_lens", "matplotlib", "pandas")


def test_import_is_lazy():
    loaded = _python(
        f"import json, sys; import tl_logitlens as tll; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    assert loaded == []  # neither matplotlib nor pandas (nor torch) until an analysis is used


def test_every_public_name_resolves_without_plotting_imports():
    code = (
        "import json, sys, tl_logitlens as tll; from tl_logitlens import logit_lens, readout, demo, Attribution; "
        "names = {n: type(getattr(tll, n)).__name__ for n in tll.__all__}; "
        "print(json.dumps([callable(readout), type(tll.readout).__name__, names['demo'], "
        "sorted(set(tll.__all__) - set(dir(tll)))]))"
    )
    is_callable, readout_type, demo_type, missing = _python(code)
    assert is_callable and readout_type == "function" and demo_type == "module" and missing == []


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["lens", "--help"],
        ["dla", "--model", "./no/such/folder", "--prompt", "x", "--answer", "y"],
        ["lens", "--model", "demo", "--prompt", "x", "--metric", "colour"],
    ],
)
def test_help_and_usage_errors_import_nothing_heavy(argv):
    code = (
        "import contextlib, io, json, sys\nfrom tl_logitlens import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        f"    try:\n        code = cli.main({argv!r})\n    except SystemExit as e:\n        code = e.code\n"
        f"print(json.dumps([code, [m for m in {HEAVY!r} if m in sys.modules]]))"
    )
    code, loaded = _python(code)
    assert code in (0, 2) and loaded == []
