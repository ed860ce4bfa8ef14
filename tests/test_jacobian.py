"""The Jacobian lens: TransformerLens 4.3's estimator (agreement with its own fit), an independent
autograd reference for the entries it does not fit, its files read both ways, the lens-identity
check, the vectors, kill-and-resume, and the error paths."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import builders
import pytest
import torch
from test_lens_check import _other_unembedding

import tl_logitlens as tll
from tl_logitlens.errors import LensInputError, ModelStateError
from tl_logitlens.lenses.training import JACOBIAN_CHECKPOINT

ROOT = Path(__file__).resolve().parent.parent


def _tl_jacobian():
    if builders.TransformerBridge is None:
        pytest.skip("TransformerBridge is not in this transformer-lens")
    try:
        from transformer_lens.tools.analysis.jacobian_lens import JacobianLens as TLJacobianLens
    except ImportError:
        pytest.skip("this transformer-lens has no JacobianLens (4.3+)")
    return TLJacobianLens


def _prompts(model, n=3, length=14, seed=0):
    """Token id rows ``[n, length]`` plus a too-short one (skipped by both fits)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.cfg.d_vocab, (n, length), generator=g)
    ids[:, 0] = 1
    return [row for row in ids] + [ids[0, :4]]


def _texts(model, rows):
    return [model.to_string(row[1:]) for row in rows]


def test_agrees_with_transformer_lens_fit():
    TLJ = _tl_jacobian()
    model = builders.hf_bridge("llama", seed=3)
    texts = _texts(model, _prompts(model, n=3, length=14))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = TLJ.fit(model, texts, corpus="test", skip_first_positions=4, max_seq_len=12, show_progress=False)
        ours = tll.fit_jacobian_lens(model, texts, skip_first_positions=4, max_seq_len=12, progress=False)
    assert ours.n_prompts == theirs.n_prompts == 3
    assert set(theirs.jacobians) == {0}
    torch.testing.assert_close(ours.matrices["1_pre"], theirs.jacobians[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours.matrices["1_pre"], torch.eye(32), atol=1e-2)  # a real map, not the identity


def test_agrees_with_transformer_lens_on_a_trained_model(models_dir):
    TLJ = _tl_jacobian()
    model = builders.boot_offline(str(models_dir / "stories260k"))
    texts = ["Once upon a time, there was a little girl named Lily. She loved to play outside in the park."] * 1
    texts.append("The cat sat on the mat and looked at the big red ball. Then it ran away to find its mother.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = TLJ.fit(model, texts, corpus="t", skip_first_positions=8, max_seq_len=24, show_progress=False)
        ours = tll.fit_jacobian_lens(model, texts, skip_first_positions=8, max_seq_len=24, progress=False)
    assert set(theirs.jacobians) == {0, 1, 2, 3}
    for layer, matrix in theirs.jacobians.items():
        torch.testing.assert_close(ours.matrices[f"{layer + 1}_pre"], matrix, atol=1e-5, rtol=1e-4)


def _reference(model, rows, hook, skip):
    """Independent: the derivative of the summed final stream wrt one shared shift of the entry at
    every valid position (= the mean over source positions of TransformerLens's rows), by
    torch.autograd.functional.jacobian through plain hooks, averaged over prompts."""
    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    total = 0
    for row in rows:
        seq = row.shape[0]
        valid = list(range(skip, seq - 1))

        def f(delta, row=row, valid=valid):
            out = {}

            def add(act, hook):
                # in place: a bridge's residual connection reads the tensor its hook saw, not a returned copy
                act[:, valid] += delta

            def keep(act, hook):
                out["h"] = act

            model.run_with_hooks(row[None], fwd_hooks=[(hook, add), (final, keep)])
            return out["h"][0, valid].sum(0)

        jac = torch.autograd.functional.jacobian(f, torch.zeros(model.cfg.d_model))
        total = total + jac / len(valid)
    return total / len(rows)


def test_every_entry_matches_an_independent_autograd_reference():
    model = tll.demo_model()
    rows = [tll.demo.induction_prompt(model, n=5, seed=s)[0] for s in range(2)]
    lens = tll.fit_jacobian_lens(model, rows, incl_mid=True, skip_first_positions=3, progress=False, dims_per_pass=5)
    assert lens.labels == ["0_pre", "0_mid", "1_pre", "1_mid"]
    for label, hook in [
        ("0_pre", "blocks.0.hook_resid_pre"),
        ("0_mid", "blocks.0.hook_resid_mid"),
        ("1_pre", "blocks.1.hook_resid_pre"),
        ("1_mid", "blocks.1.hook_resid_mid"),
    ]:
        torch.testing.assert_close(lens.matrices[label], _reference(model, rows, hook, 3), atol=2e-5, rtol=1e-4)


def test_the_lens_reads_final_norm_of_J_h():
    model = tll.demo_model()
    g = torch.Generator().manual_seed(0)
    lens = tll.JacobianLens(model, {"1_pre": torch.randn(64, 64, generator=g) / 8}, n_prompts=1)
    tokens = tll.demo.induction_prompt(model)
    result = tll.logit_lens(model, tokens, lens=lens, layers=["1_pre"], top_k=3)
    _, cache = model.run_with_cache(tokens)
    h = cache["blocks.1.hook_resid_pre"][0, -1].double()
    moved = h @ lens.matrices["1_pre"].double().T
    ln = model.ln_final
    x = moved - moved.mean()
    normed = x / (x.pow(2).mean() + model.cfg.eps).sqrt() * ln.w.double() + ln.b.double()
    logits = normed @ model.W_U.double() + model.b_U.double()
    assert result.top_ids[0, 0, -1].tolist() == logits.topk(3).indices.tolist()


def test_files_both_ways_with_transformer_lens(tmp_path):
    TLJ = _tl_jacobian()
    model = builders.hf_bridge("llama", seed=3)
    rows = _prompts(model, n=2, length=12)
    lens = tll.fit_jacobian_lens(model, rows[:2], skip_first_positions=3, progress=False)
    path = tmp_path / "ours.pt"
    lens.save(path)
    theirs = TLJ.load(str(path))
    theirs.validate_model(model)
    assert theirs.source_layers == [0] and theirs.n_prompts == 2
    torch.testing.assert_close(theirs.jacobians[0], lens.matrices["1_pre"].half().float())
    back = tll.JacobianLens.load(path, model)
    assert back.labels == ["0_pre", "1_pre"]  # 0_pre rides along in our key, ignored by TransformerLens
    assert torch.equal(back.matrices["0_pre"], lens.matrices["0_pre"])
    # TransformerLens's artifact, read by us
    g = torch.Generator().manual_seed(1)
    artifact = TLJ({0: torch.randn(32, 32, generator=g)}, n_prompts=5, d_model=32)
    artifact.save(str(tmp_path / "theirs.pt"))
    read = tll.JacobianLens.load(tmp_path / "theirs.pt", model)
    assert read.labels == ["1_pre"] and read.n_prompts == 5
    torch.testing.assert_close(read.matrices["1_pre"], artifact.jacobians[0].half().float())
    # TransformerLens's fit-checkpoint schema: sums, divided by n_done
    sums = {0: torch.randn(32, 32, generator=g)}
    torch.save(
        {"jacobian_sum": sums, "n_done": 4, "next_idx": 4, "source_layers": [0], "target_layer": 1, "skip_first": 16},
        tmp_path / "ckpt.pt",
    )
    from_ckpt = tll.JacobianLens.load(tmp_path / "ckpt.pt", model)
    torch.testing.assert_close(from_ckpt.matrices["1_pre"], sums[0] / 4)
    assert TLJ.load(str(tmp_path / "ckpt.pt")).n_prompts == 4


def test_load_refuses_a_lens_for_another_model(tmp_path):
    model = tll.demo_model()
    torch.save({"J": {0: torch.eye(32)}, "n_prompts": 1, "source_layers": [0], "d_model": 32}, tmp_path / "w.pt")
    with pytest.raises(LensInputError, match="d_model=64"):
        tll.JacobianLens.load(tmp_path / "w.pt", model)
    torch.save({"J": {5: torch.eye(64)}, "n_prompts": 1, "source_layers": [5], "d_model": 64}, tmp_path / "l.pt")
    with pytest.raises(LensInputError, match=r"layer 5, outside this model's source layers 0\.\.0"):
        tll.JacobianLens.load(tmp_path / "l.pt", model)
    torch.save(
        {"J": {0: torch.eye(64)}, "n_prompts": 1, "d_model": 64, "metadata": {"target_layer": 3}}, tmp_path / "t.pt"
    )
    with pytest.raises(LensInputError, match="maps to layer 3"):
        tll.JacobianLens.load(tmp_path / "t.pt", model)
    torch.save({"weights": 1}, tmp_path / "x.pt")
    with pytest.raises(LensInputError, match="not a Jacobian lens"):
        tll.JacobianLens.load(tmp_path / "x.pt", model)
    (tmp_path / "bad.pt").write_bytes(b"not a file")
    with pytest.raises(LensInputError, match="cannot be read"):
        tll.JacobianLens.load(tmp_path / "bad.pt", model)


def test_a_lens_for_another_model_is_refused_by_the_shared_check():
    model = tll.demo_model()
    other = _other_unembedding(model)
    lens = tll.JacobianLens(model, {"1_pre": torch.eye(64)}, n_prompts=1)
    tll.logit_lens(model, "red cat sun", lens=lens, layers=["1_pre", "final_post"])
    with pytest.raises(LensInputError, match="JacobianLens for another model"):
        tll.logit_lens(other, "red cat sun", lens=lens, layers=["1_pre", "final_post"])
    with pytest.raises(LensInputError, match="no translator for stack entry '0_pre'"):
        tll.logit_lens(model, "red cat sun", lens=lens, layers=["0_pre"])


def test_vectors_are_rows_of_W_U_J():
    model = tll.demo_model()
    g = torch.Generator().manual_seed(2)
    J = torch.randn(64, 64, generator=g)
    lens = tll.JacobianLens(model, {"1_pre": J}, n_prompts=1)
    ids = [model.to_single_token("cat"), model.to_single_token("sun")]
    expected = (model.W_U.double().T @ J.double())[ids]  # rows of W_U J, W_U as [d_vocab, d_model]
    torch.testing.assert_close(lens.vectors(model, ["cat", "sun"], "1_pre").double(), expected, atol=1e-4, rtol=1e-5)
    assert torch.equal(lens.vectors(model, ids, "final_post"), model.W_U[:, ids].T.float())


def test_compatibility_mode_fits_and_refuses_the_transformer_lens_file(tmp_path):
    if builders.TransformerBridge is None:
        pytest.skip("no TransformerBridge")
    model = builders.hf_bridge("gpt2", compat=True, seed=1)
    lens = tll.fit_jacobian_lens(model, _prompts(model, n=1, length=10)[:1], skip_first_positions=2, progress=False)
    assert lens.labels == ["0_pre", "1_pre"] and bool(torch.isfinite(lens.matrices["1_pre"]).all())
    tll.logit_lens(model, "w3 w4 w5", lens=lens)
    with pytest.raises(ModelStateError, match="residual stream differs"):
        lens.save(tmp_path / "x.pt")


def test_fit_error_paths():
    model = tll.demo_model()
    rows = [tll.demo.induction_prompt(model)[0]]
    with pytest.raises(LensInputError, match="final_post is the lens's target"):
        tll.fit_jacobian_lens(model, rows, source_layers=["final_post"], progress=False)
    with pytest.raises(LensInputError, match="max_seq_len must be an int >= 2"):
        tll.fit_jacobian_lens(model, rows, max_seq_len=1, progress=False)
    with pytest.raises(LensInputError, match="data must be a non-empty list"):
        tll.fit_jacobian_lens(model, [], progress=False)
    with pytest.raises(LensInputError, match="checkpoint_every needs checkpoint_dir"):
        tll.fit_jacobian_lens(model, rows, checkpoint_every=2, progress=False)
    with pytest.warns(UserWarning, match="skipped 1 prompt"):
        with pytest.raises(LensInputError, match="every prompt was too short"):
            tll.fit_jacobian_lens(model, [rows[0][:5]], skip_first_positions=4, progress=False)


def test_source_layers_pick_entries():
    model = tll.demo_model()
    rows = [tll.demo.induction_prompt(model)[0]]
    whole = tll.fit_jacobian_lens(model, rows, skip_first_positions=4, progress=False)
    part = tll.fit_jacobian_lens(model, rows, source_layers=["1_pre"], skip_first_positions=4, progress=False)
    assert part.labels == ["1_pre"]
    torch.testing.assert_close(part.matrices["1_pre"], whole.matrices["1_pre"], atol=1e-6, rtol=0)


_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    import tl_logitlens as tll
    import tl_logitlens.lenses.training.jacobian as fit
    sys.path.insert(0, {tests!r})
    from test_jacobian import kill_data
    inner = fit._prompt_jacobians
    def slow(*a, **k):
        time.sleep(0.3)  # room for the test to kill the fit between checkpoints
        return inner(*a, **k)
    fit._prompt_jacobians = slow
    tll.fit_jacobian_lens(tll.demo_model(), kill_data(), skip_first_positions=3, checkpoint_dir={folder!r},
                          checkpoint_every=2, progress=False)
    print("finished")
""")


def kill_data():
    model = tll.demo_model()
    return [tll.demo.induction_prompt(model, n=5, seed=s)[0] for s in range(12)]


def test_a_killed_fit_resumes_to_the_uninterrupted_lens(tmp_path):
    folder = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT.format(tests=str(ROOT / "tests"), folder=str(folder))],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    killed_at = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (folder / JACOBIAN_CHECKPOINT).is_file():
                done = torch.load(folder / JACOBIAN_CHECKPOINT, weights_only=True)["next_idx"]
                if done >= 4:
                    proc.send_signal(signal.SIGKILL)
                    killed_at = done
                    break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate()
    assert killed_at is not None, f"the fit was not killed mid-way: {out.decode()[-300:]} {err.decode()[-2000:]}"
    assert b"finished" not in out
    model = tll.demo_model()
    with builders.CountForwards(model) as counter:
        resumed = tll.fit_jacobian_lens(
            model, kill_data(), skip_first_positions=3, checkpoint_dir=folder, checkpoint_every=2, progress=False
        )
    with builders.CountForwards(model) as full:
        whole = tll.fit_jacobian_lens(model, kill_data(), skip_first_positions=3, progress=False)
    assert 0 < counter.calls < full.calls  # it continued, it did not start again
    assert resumed.n_prompts == whole.n_prompts == 12
    for label in whole.labels:
        torch.testing.assert_close(resumed.matrices[label], whole.matrices[label], atol=1e-6, rtol=0)
    with pytest.raises(LensInputError, match="other settings"):
        tll.fit_jacobian_lens(
            model, kill_data(), skip_first_positions=2, checkpoint_dir=folder, checkpoint_every=2, progress=False
        )


def test_one_rank_group_fits_like_one_process(one_rank_group):
    model = tll.demo_model()
    rows = [tll.demo.induction_prompt(model, n=5, seed=s)[0] for s in range(2)]
    grouped = tll.fit_jacobian_lens(model, rows, skip_first_positions=3, progress=False, distributed=True)
    alone = tll.fit_jacobian_lens(model, rows, skip_first_positions=3, progress=False, distributed=False)
    for label in alone.labels:
        assert torch.equal(grouped.matrices[label], alone.matrices[label])


@pytest.mark.distributed
def test_two_ranks_fit_the_one_process_lens(tmp_path):
    sys.path.insert(0, str(ROOT / "tests" / "torchrun"))
    import launch

    out = tmp_path / "lens.pt"
    proc, _ = launch.run(2, str(ROOT / "tests" / "torchrun" / "jacobian_job.py"), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    model = tll.demo_model()
    prompts = [tll.demo.induction_prompt(model, n=5, seed=s)[0] for s in range(5)] + [torch.tensor([1, 5, 6])]
    with pytest.warns(UserWarning, match="skipped 1 prompt"):
        alone = tll.fit_jacobian_lens(model, prompts, skip_first_positions=3, incl_mid=True, progress=False)
    assert got["world"] == 2 and got["n_prompts"] == alone.n_prompts == 5
    for label in alone.labels:
        torch.testing.assert_close(got["matrices"][label], alone.matrices[label], atol=1e-6, rtol=0)


def test_cli_fit_lens_then_read_through_it(tmp_path, capsys):
    from tl_logitlens.cli import main

    data = tmp_path / "data.txt"
    data.write_text("red cat sun moon red cat sun moon red cat sun moon\nsun moon red cat sun moon red cat sun\n")
    out = tmp_path / "j.pt"
    code = main(
        [
            "fit-lens",
            "--kind",
            "jacobian",
            "--model",
            "demo",
            "--data",
            str(data),
            "--out",
            str(out),
            "--skip-first-positions",
            "3",
            "--quiet",
        ]
    )
    assert code == 0 and "on 2 prompts" in capsys.readouterr().out
    lens = tll.JacobianLens.load(out, tll.demo_model())
    reference = tll.fit_jacobian_lens(
        tll.demo_model(), data.read_text().splitlines(), skip_first_positions=3, progress=False
    )
    torch.testing.assert_close(lens.matrices["1_pre"], reference.matrices["1_pre"].half().float())
    assert main(["lens", "--model", "demo", "--prompt", "red cat sun", "--lens", str(out)]) == 0
    assert "jacobian lens" in capsys.readouterr().out
    junk = tmp_path / "junk.pt"
    torch.save({"x": 1}, junk)
    assert main(["lens", "--model", "demo", "--prompt", "red cat sun", "--lens", str(junk)]) != 0
    assert "not a Jacobian lens" in capsys.readouterr().err
