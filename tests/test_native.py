"""The fused C kernel's life cycle: built once per machine, switched off by one variable, and never a
failure the user sees (no compiler: silent; a failed build or a wrong kernel: one warning, then eager).

Its numbers are tested with everything else's, against float64 references on both paths
(tests/test_kernel.py, test_lens_exact.py, test_groups.py, test_train_kernel.py: ``stats_path``).
"""

import warnings

import pytest
import torch
from conftest import FUSED_AVAILABLE

from tl_logitlens.kernel import native, tiles, tuning

needs_compiler = pytest.mark.skipif(not FUSED_AVAILABLE, reason="no fused kernel here (no working C compiler)")


@pytest.fixture(autouse=True)
def default_switch(monkeypatch):
    """These tests are about the default and what the switch changes: a user's TL_LOGITLENS_COMPILE
    (e.g. a whole suite run with 0, to test the eager path everywhere) must not decide them."""
    monkeypatch.delenv("TL_LOGITLENS_COMPILE", raising=False)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A process that has not built the kernel yet, with an empty cache directory of its own."""
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_state", "not built")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "tl_logitlens" / "native"


def _read(fused=None):
    """A small product read with top-k, KL, targets and next tokens; ``fused`` as read_product takes it."""
    gen = torch.Generator().manual_seed(0)
    x, W = torch.randn(12, 16, generator=gen), torch.randn(16, 300, generator=gen)
    bufs = [torch.empty(12 * 64) for _ in range(tiles.BUFFERS)]
    targets, nxt = torch.randint(0, 300, (4, 2), generator=gen), torch.randint(-1, 300, (4,), generator=gen)
    kw = dict(top_k=3, with_reference=True, target_ids=targets, next_tokens=nxt, width=64, fused=fused)
    return tiles.read_product(x, 3, W, None, None, bufs, **kw)


def _same(a, b):
    assert torch.equal(a.top_ids, b.top_ids) and torch.equal(a.target_ranks, b.target_ranks)
    for name in ("log_z", "entropy", "kl_to_reference", "next_logit", "target_logits"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5)


def test_one_variable_switches_the_fused_paths_off(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.setenv("TL_LOGITLENS_COMPILE", "0")
    assert not native.fused(x) and native.status() == "eager (TL_LOGITLENS_COMPILE=0)"
    assert tuning._path(x.device, x.dtype) == "eager"
    if FUSED_AVAILABLE:
        with tuning.force(fused=True):  # an explicit force beats the environment (as the tests need)
            assert native.fused(x)
    monkeypatch.setenv("TL_LOGITLENS_COMPILE", "yes")
    with pytest.raises(ValueError, match="TL_LOGITLENS_COMPILE must be 0 .* got 'yes'"):
        native.fused(x)
    monkeypatch.setenv("TL_LOGITLENS_COMPILE", "1")
    assert native.fused(x) == FUSED_AVAILABLE
    assert not native.fused(x.double()), "float64 always takes the eager path"
    with pytest.raises(ValueError, match="fused must be True, False or None"):
        with tuning.force(fused="yes"):
            pass


@needs_compiler
def test_each_path_runs_where_it_is_asked_to(monkeypatch):
    calls = []
    real = native.fold_tile
    monkeypatch.setattr(native, "fold_tile", lambda *a, **k: calls.append(1) or real(*a, **k))
    with tuning.force(fused=False):
        eager = _read()
    assert calls == []
    with tuning.force(fused=False):
        with tuning.force(width=64):  # an inner force leaves the outer path alone
            _read()
    assert calls == []
    fused = _read()
    assert len(calls) == 5  # one call per tile of 64 columns over 300
    _same(fused, eager)
    assert tuning._key(torch.zeros(4, 8), torch.float32, False) != _key_eager()


def _key_eager():
    with tuning.force(fused=False):
        return tuning._key(torch.zeros(4, 8), torch.float32, False)


@needs_compiler
def test_built_once_per_machine_then_loaded_from_disk(fresh_build, monkeypatch):
    assert native.library() is not None
    built = list(fresh_build.glob("tile_stats-*.so"))
    assert len(built) == 1 and native.status().startswith("fused") and str(built[0]) in native.status()
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_state", "not built")

    def no_compiling(*args):
        raise AssertionError("compiled again although the library was on disk")

    monkeypatch.setattr(native, "_compile", no_compiling)
    assert native.library() is not None
    _same(_read(fused=True), _read(fused=False))


def test_no_compiler_is_silent_and_eager(fresh_build, monkeypatch):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is None
        stats = _read()
    assert "no C compiler" in native.status()
    with pytest.raises(RuntimeError, match="fused CPU kernel is not available here: eager \\(no C compiler"):
        with tuning.force(fused=True):
            pass
    _same(stats, _read(fused=False))


@needs_compiler
def test_a_failed_build_warns_once_and_falls_back(fresh_build, monkeypatch, tmp_path):
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C;\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    with pytest.warns(UserWarning, match="fused CPU kernel could not be built or failed its check"):
        assert native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call stays quiet
        assert native.library() is None
        stats = _read()
    assert native.status().startswith("eager (build failed")
    _same(stats, _read(fused=False))


@needs_compiler
def test_a_kernel_that_computes_wrong_numbers_is_refused(fresh_build, monkeypatch, tmp_path):
    """The check before first use: a kernel whose exponentials are 0.1 % off (a miscompile, a bad
    flag) is not used; the statistics stay exact, on the eager path."""
    wrong = tmp_path / "wrong.c"
    source = native.SOURCE.read_text()
    assert "return p * scale;" in source
    wrong.write_text(source.replace("return p * scale;", "return p * scale * 1.001f;"))
    monkeypatch.setattr(native, "SOURCE", wrong)
    with pytest.warns(UserWarning, match="disagrees with tensor arithmetic on: sums, entropy"):
        assert native.library() is None
    _same(_read(), _read(fused=False))


def test_the_fused_kernel_builds_wherever_a_compiler_answers():
    """A kernel that fails to build or its check here is a defect, not a skip: the exactness tests of
    the fused path would otherwise skip quietly."""
    if native._compiler() is None:
        pytest.skip("no C compiler here: the eager path is the kernel")
    assert native.library() is not None, native.status()
    assert native.status().startswith("fused (")
