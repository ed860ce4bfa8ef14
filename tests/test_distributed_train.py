"""train_tuned_lens under torch.distributed: the ranks share each step exactly, rank 0 writes, faults end the job.

In-process tests (a one-rank gloo group over a FileStore) check detection, the refusals and the
ranks' data agreement check. The torchrun jobs (``@pytest.mark.distributed``, run by ``make
test-distributed``) train on 2 and 3 CPU processes with gloo and compare every rank's lens with
``train_tuned_lens`` in this process on the same data and settings: equal within 1e-5 (the
gradients differ only by float32 summation order). One job fails on purpose (rank 1 raises at
step 3) and must end fast with that error; its checkpoints are then resumed on 3 ranks.
"""

import sys
import warnings
from pathlib import Path

import pytest
import torch

import tl_logitlens as tll
from tl_logitlens.distributed import Group, resolve
from tl_logitlens.errors import LensInputError
from tl_logitlens.lenses.training import CHECKPOINT

JOBS = Path(__file__).resolve().parent / "torchrun"
sys.path.insert(0, str(JOBS))

import launch  # noqa: E402
from train_cases import CASES, FAIL_AT_STEP, RESUME  # noqa: E402

TOL = 1e-5  # the bound for a lens trained on N ranks against one process


def _reference(model, name_or_case, norms=None):
    """One process's lens for a case; ``norms`` collects each step's gradient norm before clipping."""
    make, kwargs = CASES[name_or_case] if isinstance(name_or_case, str) else name_or_case
    kwargs = {k: v for k, v in kwargs.items() if k != "checkpoint_every"}
    clip = torch.nn.utils.clip_grad_norm_

    def recording(params, max_norm, *args, **kw):
        norm = clip(params, max_norm, *args, **kw)
        if norms is not None:
            norms.append(float(norm))
        return norm

    torch.nn.utils.clip_grad_norm_ = recording
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tll.train_tuned_lens(model, make(model), distributed=False, **kwargs).state_dict()
    finally:
        torch.nn.utils.clip_grad_norm_ = clip


def _assert_lens_close(got, ref, what):
    assert set(got) == set(ref), what
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=TOL, rtol=0, msg=lambda m: f"{what} {k}: {m}")


# -- in-process ---------------------------------------------------------------------------
def test_distributed_true_without_a_group_is_refused():
    model = tll.demo_model()
    make, kwargs = CASES["ragged"]
    with pytest.raises(LensInputError, match="no torch.distributed process group is initialised"):
        tll.train_tuned_lens(model, make(model), distributed=True, **kwargs)


def test_one_rank_group_trains_exactly_like_one_process(one_rank_group, tmp_path):
    """A group of one runs every micro-batch and all-reduces with itself: the same lens, bit for bit;
    its checkpoint records the world size."""
    model = tll.demo_model()
    make, kwargs = CASES["ragged"]
    alone = tll.train_tuned_lens(model, make(model), distributed=False, **kwargs).state_dict()
    grouped = tll.train_tuned_lens(model, make(model), checkpoint_dir=tmp_path / "ck", **kwargs).state_dict()
    for k in alone:
        assert torch.equal(alone[k], grouped[k]), k
    assert torch.load(tmp_path / "ck" / CHECKPOINT, weights_only=True)["world"] == 1


def test_a_distributed_sampler_is_refused_under_a_group(one_rank_group):
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    model = tll.demo_model()
    rows = TensorDataset(CASES["ragged"][0](model))
    loader = DataLoader(rows, sampler=DistributedSampler(rows, num_replicas=1, rank=0, shuffle=False))
    with pytest.raises(LensInputError, match="pass the DataLoader without a DistributedSampler"):
        tll.train_tuned_lens(model, loader, steps=1, tokens_per_step=10, progress=False)


def test_ranks_that_read_different_data_are_stopped(one_rank_group, monkeypatch):
    """Each step the ranks compare a fingerprint of the tokens they cut; here a second rank is
    faked (all_gather_object answers with another fingerprint): every rank raises."""
    import torch.distributed as dist

    real = dist.all_gather_object

    def two_ranks_disagree(out, obj, group=None):
        mine = [None]
        real(mine, obj, group=group)
        msg, agree = mine[0]
        out[:] = [(msg, agree), (None, None if agree is None else (agree[0], agree[1] + 1))]

    model = tll.demo_model()
    make, kwargs = CASES["ragged"]
    group = resolve(None)
    assert isinstance(group, Group)
    group.world = 2  # as rank 0 of 2: the gathered list has a second (faked) rank
    monkeypatch.setattr(dist, "all_gather_object", two_ranks_disagree)
    monkeypatch.setattr("tl_logitlens.lenses.training.tuned.resolve", lambda distributed: group)
    with pytest.raises(LensInputError, match="the ranks disagree on the tokens of step 1"):
        tll.train_tuned_lens(model, make(model), **kwargs)


# -- torchrun jobs --------------------------------------------------------------------------
@pytest.mark.distributed
def test_fault_ends_the_job_then_three_ranks_resume_and_match_one_process(tmp_path):
    """Job 1 (2 ranks): the RESUME run, checkpointing every step; rank 1 raises at step 3, so rank 0
    raises 'rank 1 failed: ...' at that step's check instead of waiting; the job exits non-zero
    within 60 s, the checkpoint of step 2 (world 2) left by rank 0. Job 2 (3 ranks): the CASES
    (4 micro-batches a step dealt over 3 ranks, a cut last micro-batch, Adam, a partial last step)
    and the RESUME run resumed on 3 ranks; every rank's lens equals one uninterrupted process's,
    and so does each step's gradient norm before clipping (which the lens alone would not show)."""
    ckpt = tmp_path / "ckpt"
    proc, seconds = launch.run(2, str(JOBS / "train_job.py"), "fault", str(tmp_path), str(ckpt))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert seconds < 60, f"the failing job took {seconds:.0f} s"
    assert f"RuntimeError: injected failure at step {FAIL_AT_STEP}" in output, output  # rank 1's own error
    assert f"rank 1 failed: RuntimeError: injected failure at step {FAIL_AT_STEP}" in output, output  # rank 0's
    assert "did not end the job" not in output
    saved = torch.load(ckpt / CHECKPOINT, weights_only=True)
    assert (saved["step"], saved["world"]) == (FAIL_AT_STEP - 1, 2)
    # rank 0 wrote it atomically (no temp files), and recorded it as the folder's own
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([CHECKPOINT, tll.files.MANIFEST])

    proc, _ = launch.run(3, str(JOBS / "train_job.py"), "train", str(tmp_path), str(ckpt))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(3)]
    model = tll.demo_model()
    for name in [*CASES, "resumed"]:
        norms = []
        ref = _reference(model, RESUME if name == "resumed" else name, norms)
        for r in range(3):
            _assert_lens_close(ranks[r][name], ref, f"{name} rank {r}")
            # The summed gradient itself, before clipping to norm 1 hides its scale (resumed: steps 3, 4).
            want = norms[FAIL_AT_STEP - 1 :] if name == "resumed" else norms
            torch.testing.assert_close(torch.tensor(ranks[r][name + "_norms"]), torch.tensor(want), rtol=1e-5, atol=0)
    saved = torch.load(ckpt / CHECKPOINT, weights_only=True)
    assert (saved["step"], saved["world"]) == (RESUME[1]["steps"], 3)


def _cli_train(tmp_path, nproc, model_arg, data_path, *extra):
    out = tmp_path / "lens"
    args = [
        "-m",
        "tl_logitlens",
        "train-lens",
        "--model",
        model_arg,
        "--data",
        str(data_path),
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]
    proc, seconds = launch.run(nproc, *args)
    return proc, seconds, out


@pytest.mark.distributed
def test_cli_train_lens_two_ranks_demo(tmp_path):
    model = tll.demo_model()
    tokens = CASES["ragged"][0](model)
    torch.save(tokens, tmp_path / "tokens.pt")
    proc, _, out = _cli_train(
        tmp_path, 2, "demo", tmp_path / "tokens.pt", "--steps", "3", "--tokens-per-step", "40", "--batch-size", "1"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("Trained 2 translators for 3 steps on 120 tokens") == 1, proc.stdout  # rank 0 alone
    got = tll.TunedLens.load(out, model).state_dict()
    _assert_lens_close(got, _reference(model, "ragged"), "cli 2 ranks")


@pytest.mark.distributed
def test_cli_train_lens_bad_token_ends_the_job(tmp_path):
    model = tll.demo_model()
    tokens = CASES["ragged"][0](model)
    tokens[5, 3] = model.cfg.d_vocab + 7
    torch.save(tokens, tmp_path / "bad.pt")
    proc, seconds, out = _cli_train(tmp_path, 2, "demo", tmp_path / "bad.pt", "--steps", "3", "--tokens-per-step", "40")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert seconds < 60, f"the failing job took {seconds:.0f} s"
    assert f"token ids must lie in [0, {model.cfg.d_vocab})" in output and str(model.cfg.d_vocab + 7) in output, output
    assert not (out / CHECKPOINT).exists()


@pytest.mark.distributed
def test_cli_train_lens_two_ranks_stories260k(tmp_path, models_dir):
    from tl_logitlens.cli.arguments import load_model, read_data

    path, text = launch.stories260k(models_dir, tmp_path, lines=6)
    settings = dict(steps=3, tokens_per_step=30, batch_size=1)
    proc, _, out = _cli_train(
        tmp_path, 2, str(path), text, "--steps", "3", "--tokens-per-step", "30", "--batch-size", "1"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model = load_model(str(path))
    got = tll.TunedLens.load(out, model).state_dict()
    ref = tll.train_tuned_lens(model, read_data(str(text)), progress=False, **settings).state_dict()
    _assert_lens_close(got, ref, "stories260k 2 ranks")
    assert any(float((ref[k] - 0).abs().max()) > 1e-3 for k in ref)  # it did train: the comparison is not of zeros
