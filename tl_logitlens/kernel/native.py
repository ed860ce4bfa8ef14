"""The fused tile statistics: a small C kernel built with the machine's own C compiler at first use.

The tiled kernel (:mod:`tl_logitlens.kernel.tiles`) computes a tile of logits with one matrix
product and reads every statistic from it. Done as separate tensor operations (maxima, shifts,
exponentials, sums, top-k, comparisons), that is about a dozen passes over the tile, each going
back to memory, and memory is what a busy machine takes away first. ``tile_stats.c`` reads each
row of the tile twice while it is still in cache: once for its maximum and top-k, once for the
exponential sums, the KL term and the targets' ranks (:func:`fold_tile`); and for the training
loss it turns a tile into ``exp(l - max)`` in one pass (:func:`shift_exp`).

How it is chosen, once per process: where a C compiler answers (``$CC``, else ``cc``, ``gcc``
or ``clang`` on the ``PATH``), ``tile_stats.c`` is compiled with ``-O3 -march=native -fopenmp``
(and 512-bit vectors where the processor has them; fewer flags where those are refused) into a
shared library cached on disk (``$XDG_CACHE_HOME/tl_logitlens/native``, keyed by the source, the
compiler and the processor, so it is built once per machine, in about half a second), loaded
with :mod:`ctypes`, and checked against plain tensor arithmetic on a small tile before first
use. Where there is no compiler, or the build or that check fails (a one-line warning then),
the kernel computes the same statistics with tensor operations (the "eager" path): exact too,
only slower. The fused path reads float32 tiles on the CPU; float64 and CUDA tiles take the
eager path (on CUDA the ``"whole"`` strategy fuses its reductions with ``torch.compile``).
Measured against ``torch.compile`` of the same statistics on this project's 2-core Xeon: the
compiled reductions (with the top-k still eager) cost about 1.3 x the product and 8-13 s to
compile in each new process; this kernel about 1.1 x, and nothing after its first build.

The switch, one for both devices: ``TL_LOGITLENS_COMPILE=0`` keeps every statistic in eager
tensor operations (no C compiler, no ``torch.compile``); ``1`` or unset: fused where it works.
:func:`force` (or ``tuning.force(fused=...)``) does the same inside a ``with`` block, as the
tests do to run both paths.

Example::

    >>> import torch
    >>> from tl_logitlens.kernel import native
    >>> with native.force(False):
    ...     native.fused(torch.zeros(2, 3))
    False
    >>> native.fused(torch.zeros(2, 3, dtype=torch.float64))
    False
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Iterator, List, Optional

import torch

SOURCE = Path(__file__).with_name("tile_stats.c")
#: Flag sets tried in order; the first that compiles and passes the check is kept.
FLAG_SETS = (
    # 512-bit vectors where the processor has them (AVX-512: a third faster than 256-bit here)
    ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"),
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3", "-march=native"),
    ("-O3",),
)

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_state = "not built"  # "fused (...)" once loaded, else why not
_forced: List[Optional[bool]] = [None]


def compile_allowed() -> bool:
    """``TL_LOGITLENS_COMPILE``: ``0`` keeps every statistic eager (no C kernel, no ``torch.compile``)."""
    value = os.environ.get("TL_LOGITLENS_COMPILE", "").strip()
    if value in ("", "1"):
        return True
    if value == "0":
        return False
    raise ValueError(
        f"TL_LOGITLENS_COMPILE must be 0 (eager statistics) or 1 (fused where a compiler works), got {value!r}; "
        "unset it for the default (fused where it works)"
    )


@contextlib.contextmanager
def force(fused: Optional[bool]) -> Iterator[None]:
    """Inside the block, take the fused path (``True``: it must be available, else ``RuntimeError``)
    or the eager one (``False``); ``None`` keeps what holds outside the block."""
    if fused is not None and not isinstance(fused, bool):
        raise ValueError(f"fused must be True, False or None, got {fused!r}")
    if fused and library() is None:
        raise RuntimeError(f"the fused CPU kernel is not available here: {status()}")
    saved = _forced[0]
    _forced[0] = saved if fused is None else fused
    try:
        yield
    finally:
        _forced[0] = saved


def fused(x: torch.Tensor) -> bool:
    """Whether tiles of ``x``'s dtype and device take the fused path (float32 on the CPU, switched on, built)."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or _forced[0] is False:
        return False
    if _forced[0] is None and not compile_allowed():
        return False
    return library() is not None


def status() -> str:
    """What the fused path is in this process: ``"fused (compiler, flags)"`` or why it is not used."""
    if not compile_allowed():
        return "eager (TL_LOGITLENS_COMPILE=0)"
    library()
    return _state


def library() -> Optional[ctypes.CDLL]:
    """The loaded C kernel, built on first call (then cached on disk and in the process), or ``None``."""
    global _library, _state
    with _lock:
        if _library is None and _state == "not built":
            _library, _state = _build()
        return _library


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _machine() -> str:
    """What ``-march=native`` depends on: the processor's name and feature flags."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    parts.append(line.strip())
                if line.strip() == "":
                    break  # the first processor describes them all
    except OSError:
        pass
    return "\n".join(parts)


def _cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tl_logitlens" / "native"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"tl_logitlens-native-{os.getuid() if hasattr(os, 'getuid') else 0}"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _compile(cc: str, flags: tuple, target: Path) -> Optional[str]:
    """Compile ``SOURCE`` into ``target`` (atomically); returns the compiler's complaint, or ``None``."""
    tmp = target.with_name(f"{target.stem}.{os.getpid()}.{threading.get_ident()}.tmp.so")
    cmd = [cc, *flags, "-shared", "-fPIC", str(SOURCE), "-o", str(tmp)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as err:
        return str(err)
    if done.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        return (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[0]
    os.replace(tmp, target)  # a concurrent process sees the old file or the new one, never half of it
    return None


def _build() -> tuple:
    """``(library, state)``: compile (or find on disk), load, declare and check the kernel."""
    cc = _compiler()
    if cc is None:
        return None, "eager (no C compiler found: $CC, cc, gcc, clang)"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        source = SOURCE.read_bytes()
        folder = _cache_dir()
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"eager (compiler or cache unusable: {err})"
    complaint = "no flag set worked"
    for flags in FLAG_SETS:
        digest = hashlib.sha256(b"\0".join([source, cc.encode(), version.encode(), " ".join(flags).encode()]))
        digest.update(_machine().encode())
        target = folder / f"tile_stats-{digest.hexdigest()[:20]}.so"
        if not target.exists():
            complaint = _compile(cc, flags, target) or complaint
            if not target.exists():
                continue
        try:
            lib = _declare(ctypes.CDLL(str(target)))
            problem = _check(lib)
        except OSError as err:
            problem = str(err)
        if problem is None:
            return lib, f"fused ({Path(cc).name} {' '.join(flags)}; {target})"
        complaint = problem
    warnings.warn(
        f"tl_logitlens: the fused CPU kernel could not be built or failed its check ({complaint}); statistics "
        "run as separate tensor operations (exact, slower). TL_LOGITLENS_COMPILE=0 skips the attempt.",
        stacklevel=4,
    )
    return None, f"eager (build failed: {complaint})"


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    P, N = ctypes.c_void_p, ctypes.c_int64  # pointers, sizes
    lib.fold_tile.argtypes = [P, N, N, N, N, P, P, P, P, P, P, N, P, P, N, P, P, P, P, P, P, ctypes.c_int]
    lib.fold_tile.restype = ctypes.c_int
    lib.shift_exp.argtypes = [P, N, N, P, P, N, N, ctypes.c_int, ctypes.c_int]
    lib.shift_exp.restype = ctypes.c_int
    return lib


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def fold_tile(
    tile: torch.Tensor,
    n: int,
    col0: int,
    sums: List[Optional[torch.Tensor]],
    ref_exps: Optional[torch.Tensor],
    ref_prev: Optional[torch.Tensor],
    top: Optional[List[torch.Tensor]],
    targets: Optional[List[torch.Tensor]],
    next_pick: Optional[List[torch.Tensor]],
    lib: Optional[ctypes.CDLL] = None,
) -> None:
    """Fold one contiguous float32 tile ``[m, w]`` (``m = entries * n`` rows, column 0 being
    vocabulary column ``col0``) into running statistics, in place.

    ``sums``: ``[peak, total, spread, cross]`` each ``[m]`` (``cross`` ``None`` without a
    reference; with one, entry 0's rows are it, and ``ref_exps [n * w]``, ``ref_prev [n, 2]``
    are scratch). ``top``: ``[values [m, k], ids [m, k] int64]`` or ``None``. ``targets``:
    ``[thresholds [m, t], above [m, t], target_ids [n, t] int64, target_logits [m, t]]`` or
    ``None``. ``next_pick``: ``[next_tokens [n] int64, next_logit [m]]`` or ``None``.
    """
    lib = lib or library()
    m, w = tile.shape
    peak, total, spread, cross = sums
    k = 0 if top is None else top[0].shape[1]
    t = 0 if targets is None else targets[0].shape[1]
    thresholds, above, target_ids, target_logits = targets or (None, None, None, None)
    next_tokens, next_logit = next_pick or (None, None)
    lib.fold_tile(
        *(_ptr(tile), m, w, n, col0, _ptr(peak), _ptr(total), _ptr(spread), _ptr(cross), _ptr(ref_exps)),
        *(_ptr(ref_prev), k, _ptr(top[0]) if top else None, _ptr(top[1]) if top else None, t, _ptr(thresholds)),
        *(_ptr(above), _ptr(next_tokens), _ptr(next_logit), _ptr(target_ids), _ptr(target_logits)),
        torch.get_num_threads(),
    )


def shift_exp(tile: torch.Tensor, peak: torch.Tensor, acc: torch.Tensor, first: bool) -> None:
    """``tile [m, w]`` of raw float32 logits becomes ``exp(l - p')`` in place, ``peak [m]`` becomes
    ``p' = max(peak, row maximum)`` (the row maximum when ``first``), and each row of ``acc [m, c]``
    (row stride free, unit column stride) is multiplied by ``exp(peak - p')`` where the maximum rose."""
    m, w = tile.shape
    library().shift_exp(
        _ptr(tile), m, w, _ptr(peak), _ptr(acc), acc.shape[1], acc.stride(0), int(first), torch.get_num_threads()
    )


def _check(lib: ctypes.CDLL) -> Optional[str]:
    """Run both entry points on a small random tile against plain tensor arithmetic; ``None`` if they agree."""
    gen = torch.Generator().manual_seed(0)
    g, n, w, k = 2, 3, 200, 3
    logits = torch.randn(g * n, w, generator=gen) * 4
    sums = [torch.full((g * n,), float("-inf")), torch.zeros(g * n), torch.zeros(g * n), torch.zeros(g * n)]
    top = [torch.full((g * n, k), float("-inf")), torch.zeros(g * n, k, dtype=torch.long)]
    for a in range(0, w, 70):  # three tiles, the maximum rising in some
        tile = logits[:, a : a + 70].contiguous()
        fold_tile(tile, n, a, sums, torch.empty(n * 70), torch.empty(n, 2), top, None, None, lib=lib)
    peak, total, spread, cross = sums
    want_total = torch.exp(logits - peak[:, None]).sum(-1)
    logp = torch.log_softmax(logits.double(), -1)
    entropy = total.log() - spread / total
    ref_logp = logp[:n].repeat(g, 1)
    kl = spread[:n].repeat(g) / total[:n].repeat(g) - total[:n].log().repeat(g) - cross / total[:n].repeat(g)
    kl = kl + total.log()
    want_top = logits.topk(k, dim=-1)
    tile = logits.clone()
    acc = torch.ones(g * n, 2)
    peak2 = torch.empty(g * n)
    lib.shift_exp(_ptr(tile), g * n, w, _ptr(peak2), _ptr(acc), 2, 2, 1, 1)
    checks = {
        "sums": torch.allclose(total, want_total, rtol=1e-5),
        "entropy": torch.allclose(entropy.double(), -(logp.exp() * logp).sum(-1), atol=1e-4),
        "KL": torch.allclose(kl.double(), (ref_logp.exp() * (ref_logp - logp)).sum(-1), atol=1e-4),
        "top-k": torch.equal(top[1], want_top.indices) and torch.equal(top[0], want_top.values),
        "exp": torch.allclose(tile, torch.exp(logits - logits.amax(-1, keepdim=True)), rtol=1e-5, atol=1e-7),
    }
    bad = [name for name, ok in checks.items() if not ok]
    return f"the built kernel disagrees with tensor arithmetic on: {', '.join(bad)}" if bad else None
