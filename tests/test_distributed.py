"""torch.distributed evaluation: the shard rule, the exact merge, and real torchrun jobs against one process.

In-process tests (no process group, or a one-rank gloo group over a FileStore) check the shard
rule, the budget split and the merge of running statistics. The torchrun jobs
(``@pytest.mark.distributed``) start 2 or 3 CPU processes with gloo and compare every rank's
result with ``evaluate_lens`` in this process on the same data: token and sequence counts
exactly, means within 1e-6 relative (plus 1e-6 absolute for values that are zero up to float32
rounding, such as the final entry's KL), and, where the forward passes are bitwise alike
(batch size 1), histograms, minima and maxima exactly.
"""

import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

import tl_logitlens as tll
from tl_logitlens.distributed import EMPTY, Group, resolve, shard_data, shard_for, split_budget, tensor_budget
from tl_logitlens.errors import LensInputError
from tl_logitlens.evaluate import HIST_BINS_PER_DECADE, STATISTICS, LensEvaluation, evaluate_lens
from tl_logitlens.evaluate.running import RunningStats

DIST = Path(__file__).resolve().parent / "torchrun"  # not "dist": .gitignore ignores dist/
sys.path.insert(0, str(DIST))

import launch  # noqa: E402
from cases import CASES  # noqa: E402

BIN = 10 ** (1 / HIST_BINS_PER_DECADE)  # one histogram bin's ratio: the quantiles' stated error


# -- the shard rule -----------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 2, 5, 6, 7, 11])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_every_item_once(n, world):
    """Tensor rows, list items and iterator items: the shards are disjoint and together the data."""
    rows = torch.arange(n).unsqueeze(1).repeat(1, 3)
    items = [f"doc {i}" for i in range(n)]
    seen_rows, seen_items, seen_iter = [], [], []
    for rank in range(world):
        part = shard_data(rows, rank, world) if n else EMPTY
        if part is not EMPTY:
            assert part.shape[1] == 3
            seen_rows += part[:, 0].tolist()
        part = shard_data(items, rank, world)
        if part is not EMPTY:
            seen_items += list(part)
        part = shard_data(iter(items), rank, world)
        if part is not EMPTY:
            seen_iter += list(part)
    assert sorted(seen_rows) == list(range(n))
    assert sorted(seen_items) == sorted(items) and sorted(seen_iter) == sorted(items)
    # The rule is the documented one: rank r holds the items i with i % world == r.
    for rank in range(world):
        part = shard_data(rows, rank, world) if n else EMPTY
        assert (part[:, 0].tolist() if part is not EMPTY else []) == list(range(rank, n, world))


def test_a_single_batch_goes_to_rank_0():
    assert shard_data("one text", 0, 2) == "one text" and shard_data("one text", 1, 2) is EMPTY
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    assert shard_data(batch, 0, 3) is batch and shard_data(batch, 2, 3) is EMPTY


def test_a_loader_with_a_distributed_sampler_is_not_sharded_again():
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    data = TensorDataset(torch.arange(10).view(5, 2))
    loader = DataLoader(data, sampler=DistributedSampler(data, num_replicas=2, rank=1, shuffle=False))
    with pytest.warns(UserWarning, match="1 sample\\(s\\) are repeated"):  # 5 samples on 2 ranks: padded
        assert shard_data(loader, 1, 2) is loader
    even = DataLoader(data, sampler=DistributedSampler(data, num_replicas=5, rank=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert shard_data(even, 1, 5) is even
    with pytest.raises(LensInputError, match="num_replicas=2, rank=1, but this process is rank 0 of 2"):
        shard_data(loader, 0, 2)


@pytest.mark.parametrize(
    "n_rows,seq,max_tokens,world", [(7, 12, 25, 3), (7, 12, 77, 2), (7, 12, 500, 3), (4, 2, 3, 4), (5, 9, 8, 2)]
)
def test_tensor_budget_scores_the_tokens_one_process_would(n_rows, seq, max_tokens, world):
    """Each rank's budget is its rows' share of the first max_tokens scored tokens (seq - 1 per row)."""
    per_row = seq - 1
    first = [(i, j) for i in range(n_rows) for j in range(per_row)][:max_tokens]  # one process's tokens
    total = 0
    for rank in range(world):
        rows, budget = tensor_budget(n_rows, seq, max_tokens, rank, world)
        mine = [t for t in first if t[0] % world == rank]
        assert budget == len(mine)
        assert all(t[0] < rows for t in first) and rows <= n_rows
        total += budget
    assert total == len(first)


@pytest.mark.parametrize("max_tokens,world", [(10, 3), (3, 4), (1, 2), (100, 7)])
def test_split_budget_adds_up(max_tokens, world):
    parts = [split_budget(max_tokens, r, world) for r in range(world)]
    assert sum(parts) == max_tokens and max(parts) - min(parts) <= 1


# -- the merge ------------------------------------------------------------------------------
def _random_running(n_layer, n, seed):
    g = torch.Generator().manual_seed(seed)
    values = {
        s: torch.rand(n_layer, n, generator=g, dtype=torch.float64) ** 8
        * 10 ** float(torch.randint(-7, 5, (1,), generator=g))
        for s in STATISTICS
    }
    top1 = torch.randint(0, 4, (n_layer, n), generator=g)
    nxt = torch.randint(0, 4, (n,), generator=g)
    return values, top1, nxt


def _assert_same_running(a, b, sums_rtol=1e-12):
    assert (a.n_tokens, a.n_sequences) == (b.n_tokens, b.n_sequences)
    assert torch.equal(a.agree, b.agree) and torch.equal(a.correct, b.correct)
    for s in STATISTICS:
        assert torch.equal(a.hists[s], b.hists[s]), s
        assert torch.equal(a.minima[s], b.minima[s]) and torch.equal(a.maxima[s], b.maxima[s]), s
        torch.testing.assert_close(a.sums[s], b.sums[s], rtol=sums_rtol, atol=0)


def test_merge_of_shards_equals_one_pass():
    """Tokens folded in one RunningStats, or split over three and merged: identical statistics."""
    n_layer = 3
    values, top1, nxt = _random_running(n_layer, 50, 0)
    whole = RunningStats(n_layer)
    whole.add(values, top1, nxt)
    whole.n_sequences = 9
    parts = [RunningStats(n_layer) for _ in range(3)]
    cuts = [0, 7, 7, 50]  # one shard empty: its minima (+inf) and maxima (-inf) must not leak
    for k, part in enumerate(parts):
        lo, hi = cuts[k], cuts[k + 1]
        if hi > lo:
            part.add({s: v[:, lo:hi] for s, v in values.items()}, top1[:, lo:hi], nxt[lo:hi])
        part.n_sequences = [4, 0, 5][k]
    merged = parts[0]
    merged.merge(parts[1])
    merged.merge(parts[2])
    _assert_same_running(merged, whole)


def test_all_reduce_with_a_fake_reducer_equals_one_pass():
    """all_reduce calls reduce(tensor, op) in one fixed order; a reducer combining the other shards' packs
    merges exactly."""
    n_layer = 2
    values, top1, nxt = _random_running(n_layer, 40, 1)
    whole = RunningStats(n_layer)
    whole.add(values, top1, nxt)
    shards = []
    for lo, hi in ((0, 13), (13, 40)):
        r = RunningStats(n_layer)
        r.add({s: v[:, lo:hi] for s, v in values.items()}, top1[:, lo:hi], nxt[lo:hi])
        shards.append(r)
    packs = [r._packed() for r in shards]
    calls = []

    def reduce(tensor, op):  # what dist.all_reduce returns on every rank, from every rank's tensors
        i = len(calls)
        calls.append(op)
        assert torch.equal(tensor, packs[0][i][0])
        fold = {"sum": torch.add, "min": torch.minimum, "max": torch.maximum}[op]
        out = packs[0][i][0]
        for pack in packs[1:]:
            out = fold(out, pack[i][0])
        return out

    shards[0].all_reduce(reduce)
    assert calls == ["sum", "sum", "min", "max"]
    _assert_same_running(shards[0], whole)


# -- in-process group ---------------------------------------------------------------------
def test_no_group_changes_nothing_and_true_requires_one():
    model = tll.demo_model()
    tokens = torch.cat([tll.demo.induction_prompt(model, seed=s) for s in range(2)])
    assert resolve(None) is None and resolve(False) is None
    with pytest.raises(LensInputError, match="no torch.distributed process group is initialised"):
        evaluate_lens(model, tokens, progress=False, distributed=True)
    with pytest.raises(LensInputError, match="distributed must be None"):
        evaluate_lens(model, tokens, progress=False, distributed="yes")
    assert "ranks" not in evaluate_lens(model, tokens, progress=False).meta


def test_one_rank_group_is_detected_and_agrees(one_rank_group):
    model = tll.demo_model()
    tokens = torch.cat([tll.demo.induction_prompt(model, seed=s) for s in range(3)])
    alone = evaluate_lens(model, tokens, progress=False, distributed=False)
    grouped = evaluate_lens(model, tokens, progress=False)  # auto: the group is found
    assert grouped.meta["ranks"] == 1 and "ranks" not in alone.meta
    assert grouped.n_tokens == alone.n_tokens
    for s in STATISTICS:
        assert torch.equal(grouped.sums[s], alone.sums[s]) and torch.equal(grouped.histograms[s], alone.histograms[s])
    group = resolve(None)
    assert isinstance(group, Group) and (group.rank, group.world) == (0, 1)
    assert shard_for(group, tokens, 5) == (tokens, 5)


# -- torchrun jobs --------------------------------------------------------------------------
def _assert_matches_one_process(got: LensEvaluation, ref: LensEvaluation, exact: bool):
    assert got.labels == ref.labels
    assert (got.n_tokens, got.n_sequences) == (ref.n_tokens, ref.n_sequences)  # exactly
    assert torch.equal(got.top1_agree, ref.top1_agree) and torch.equal(got.top1_correct, ref.top1_correct)
    for s in STATISTICS:
        # 1e-6 relative; values that are 0 up to float32 rounding (the final entry's KL) get 1e-6 absolute.
        torch.testing.assert_close(got.mean(s), ref.mean(s), rtol=1e-6, atol=1e-6)
        assert torch.equal(got.histograms[s].sum(1), ref.histograms[s].sum(1))
        if exact:  # the same per-token values: the merge loses nothing
            assert torch.equal(got.histograms[s], ref.histograms[s]), s
            assert torch.equal(got.minima[s], ref.minima[s]) and torch.equal(got.maxima[s], ref.maxima[s]), s
        for q in (0.05, 0.5, 0.95):
            a, b = got.quantile(s, q), ref.quantile(s, q)
            # A token whose value moved by float32 rounding across a bin edge moves a quantile by at most a bin.
            assert bool(((a - b).abs() <= (BIN - 1) * b.abs() + 1e-6).all()), (s, q, a, b)
    if "split_sequences" in ref.meta:
        assert {k: got.meta[k] for k in ("split_sequences", "windows")} == {
            k: ref.meta[k] for k in ("split_sequences", "windows")
        }


@pytest.mark.distributed
def test_three_ranks_equal_one_process_on_every_kind_of_data(tmp_path):
    """A 3-rank gloo job over tensors (ragged row counts, max_tokens, fewer rows than ranks, long
    rows split into windows), strings, an iterator, and DataLoaders with and without a
    DistributedSampler: every rank returns the same result, equal to this process's."""
    proc, _ = launch.run(3, str(DIST / "eval_job.py"), str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    model = tll.demo_model()
    for name, (make, kwargs) in CASES.items():
        dicts = [dict(r[name], seconds=0.0) for r in ranks]
        assert dicts[0] == dicts[1] == dicts[2], f"{name}: the ranks disagree"
        got = LensEvaluation.from_dict(ranks[0][name])
        assert got.meta["ranks"] == 3
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = evaluate_lens(model, make(model, False), progress=False, **kwargs)
        _assert_matches_one_process(got, ref, exact=kwargs.get("batch_size") == 1)
    # compare_lenses: every lens's statistics merged over the ranks equal one process's.
    from cases import compare_case

    from tl_logitlens.evaluate import LensComparison

    assert [dict(r["compare_lenses"], seconds=0.0) for r in ranks[1:]] == [
        dict(ranks[0]["compare_lenses"], seconds=0.0)
    ] * 2
    got = LensComparison.from_dict(ranks[0]["compare_lenses"])
    data, lenses = compare_case(model, False)
    ref = tll.compare_lenses(model, data, lenses, progress=False)
    assert got.lenses == ref.lenses == ["logit", "tuned"]
    for name in ref.lenses:
        assert got[name].meta["ranks"] == 3
        _assert_matches_one_process(got[name], ref[name], exact=False)


def _cli_eval_two_ranks(tmp_path, model_arg, data_path, *extra):
    out = tmp_path / "out"
    proc, seconds = launch.run(
        2,
        "-m",
        "tl_logitlens",
        "eval",
        "--model",
        model_arg,
        "--data",
        str(data_path),
        "--out",
        str(out),
        "--quiet",
        *extra,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Rank 0 alone prints: the report's header line appears once.
    assert proc.stdout.count(" tokens\n") == 1, proc.stdout
    return LensEvaluation.load(out / "lens_eval.json")


@pytest.mark.distributed
def test_cli_under_torchrun_two_ranks_demo(tmp_path):
    model = tll.demo_model()
    tokens = torch.randint(5, model.cfg.d_vocab, (9, 20), generator=torch.Generator().manual_seed(11))
    torch.save(tokens, tmp_path / "tokens.pt")
    got = _cli_eval_two_ranks(tmp_path, "demo", tmp_path / "tokens.pt", "--batch-size", "4")
    ref = evaluate_lens(model, tokens, batch_size=4, progress=False)
    _assert_matches_one_process(got, ref, exact=False)
    assert got.meta["ranks"] == 2


@pytest.mark.distributed
def test_cli_under_torchrun_two_ranks_stories260k(tmp_path, models_dir):
    from tl_logitlens.cli.arguments import load_model, read_data

    path, text = launch.stories260k(models_dir, tmp_path, lines=5)
    got = _cli_eval_two_ranks(tmp_path, str(path), text, "--batch-size", "2")
    ref = evaluate_lens(load_model(str(path)), read_data(str(text)), batch_size=2, progress=False)
    _assert_matches_one_process(got, ref, exact=False)
    assert math.isfinite(float(got.perplexity[-1])) and got.n_sequences == 5


@pytest.mark.distributed
def test_a_failing_rank_ends_the_job_naming_rank_and_error(tmp_path):
    """Row 3 (rank 1 of 2) holds a token id outside the vocabulary: rank 1 raises the package's
    range error, rank 0 raises 'rank 1 failed: ...' instead of waiting, the job exits non-zero, fast."""
    model = tll.demo_model()
    tokens = torch.randint(5, model.cfg.d_vocab, (5, 10), generator=torch.Generator().manual_seed(12))
    tokens[3, 4] = model.cfg.d_vocab + 7
    torch.save(tokens, tmp_path / "bad.pt")
    proc, seconds = launch.run(
        2, "-m", "tl_logitlens", "eval", "--model", "demo", "--data", str(tmp_path / "bad.pt"), "--quiet"
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert seconds < 60, f"the failing job took {seconds:.0f} s"
    assert f"rank 1: token ids must lie in [0, {model.cfg.d_vocab})" in output, output  # the failing rank's own error
    assert "rank 1 failed: LensInputError" in output, output  # rank 0 names it instead of waiting
    assert str(model.cfg.d_vocab + 7) in output


@pytest.mark.distributed
def test_the_exit_handler_frees_the_group_and_joins_its_threads(tmp_path):
    """A module that binds ``group.WORLD`` as a default argument (torch.distributed.nn.functional,
    imported by torch.distributed.fsdp while transformers loads a model) must not pin the group:
    pinned, its gloo workers outlived atexit, and one releasing a tensor during interpreter
    shutdown aborted the rank (CI saw 'terminate called without an active exception')."""
    proc, _ = launch.run(2, str(DIST / "shutdown_job.py"), str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["sum"] == [2.0] * 4
        assert not got["group_alive"], got
        if got["threads"] is not None:  # Linux: torch names its gloo threads pt_gloo_runloop, gloo_tcp_loop
            assert not [name for name in got["threads"] if "gloo" in name], got["threads"]
