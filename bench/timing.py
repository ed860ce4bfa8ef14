"""How the benchmarks time and weigh: interleaved rounds, medians and spreads, peak memory, the machine.

A shared machine is noisy: other processes take cores and memory bandwidth for seconds at a time.
So no figure here is one lucky minimum, and no method is timed in a block of its own:

- :func:`interleaved` runs every method once per *round*, in turn (the order reversed every other
  round), so a burst of load falls on the methods of that round alike; a ratio is taken within
  each round (``method / floor`` of the same round), and what is reported is the median of those
  ratios and their spread (the lowest and highest quartile), beside the median seconds.
- :func:`machine` reads the processor, its caches, the threads and the load before a run; every
  printed ratio names the processor it was measured on.
- :class:`PeakMemory`: the resident-set peak *added* by a block over what was live before it,
  from the kernel's high-water mark (``VmHWM`` reset through ``/proc/self/clear_refs``) after
  ``malloc_trim``, or a 1 ms RSS-sampling thread where that reset is not allowed; on CUDA the
  allocator's peak over what was allocated before.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

MiB = 2**20
GiB = 2**30

#: The clock every method is timed with: wall time by default; ``--clock cpu`` uses this
#: process's CPU time, a steadier measure of work when other jobs share the machine (use it
#: with ``--threads 1``: with more threads, time spent waiting at thread barriers counts too).
CLOCK: Callable[[], float] = time.perf_counter
#: ``--device``: where the model, the vectors and the floor's product run.
DEVICE = torch.device("cpu")


def sync() -> None:
    """Wait for the device, so that a clock reading covers the work queued before it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def now() -> float:
    """``CLOCK()`` after the device's queued work has finished (CUDA runs asynchronously)."""
    sync()
    return CLOCK()


# -- memory -------------------------------------------------------------------------------------
_LIBC = None
try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:
    pass


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


HWM_RESET = _can_reset_hwm()


def settle() -> None:
    """Free what Python and malloc hold on to, so the RSS is what is live."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class PeakMemory:
    """Peak memory added while the block runs, in bytes (``.added``): the RSS on the CPU, the
    allocator's high-water mark on ``--device cuda`` (what lives on the GPU)."""

    def __enter__(self) -> PeakMemory:
        settle()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
            self.base = torch.cuda.memory_allocated(DEVICE)
            torch.cuda.reset_peak_memory_stats(DEVICE)
            return self
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        if HWM_RESET:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
            self.added = max(0, torch.cuda.max_memory_allocated(DEVICE) - self.base)
            return
        if HWM_RESET:
            self.peak = _status_kib("VmHWM") * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())
        self.added = max(0, self.peak - self.base)


# -- timing ---------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> float:
    """Seconds of one call of ``fn``; a method that returns a number reports its own seconds
    (the floor, which times only its products)."""
    sync()
    start = CLOCK()
    inner = fn()
    sync()
    wall = CLOCK() - start
    return float(inner) if isinstance(inner, (int, float)) and not isinstance(inner, bool) else wall


def spread(values: Sequence[float]) -> Dict[str, float]:
    """``{"median", "low", "high", "min", "max"}`` of ``values``: low and high are the quartiles
    (the middle half of the runs lies between them); with fewer than 4 values, the extremes."""
    xs = sorted(values)
    if len(xs) < 4:
        low, high = xs[0], xs[-1]
    else:
        q = statistics.quantiles(xs, n=4, method="inclusive")
        low, high = q[0], q[2]
    return {"median": statistics.median(xs), "low": low, "high": high, "min": xs[0], "max": xs[-1]}


def interleaved(
    methods: Dict[str, Callable[[], Any]],
    rounds: int,
    *,
    reference: Optional[str] = "floor",
    memory: bool = True,
    once: Sequence[str] = (),
    progress: Optional[Callable[[str], None]] = None,
) -> Dict[str, Dict[str, Any]]:
    """Time every method once per round for ``rounds`` rounds, in turn, after one warm-up call each.

    The warm-up call also measures the method's peak memory added (``memory``). Methods named in
    ``once`` (slow references) run once, in the first round, with no warm-up (that run measures their
    memory). Returns per method ``{"runs": [...],
    "seconds": spread(runs), "memory_mib": ...}`` and, for every method but ``reference``,
    ``"ratio"``: the spread of ``seconds / reference's seconds`` taken within each round.
    """
    out: Dict[str, Dict[str, Any]] = {name: {"runs": []} for name in methods}
    for name, fn in methods.items():
        if name in once:
            continue
        if progress:
            progress(f"warm-up {name}")
        if memory:
            with PeakMemory() as mem:
                fn()
            out[name]["memory_mib"] = mem.added / MiB
        else:
            fn()
    names = list(methods)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            if name in once and r > 0:
                continue
            settle()
            if name in once and memory:
                with PeakMemory() as mem:
                    out[name]["runs"].append(timed(methods[name]))
                out[name]["memory_mib"] = mem.added / MiB
            else:
                out[name]["runs"].append(timed(methods[name]))
        if progress:
            progress(f"round {r + 1}/{rounds}")
    for m in out.values():
        m["seconds"] = spread(m["runs"])
    if reference in out:
        ref = out[reference]["runs"]
        for name, m in out.items():
            if name != reference:  # a method run once is weighed against the same round's reference
                m["ratio"] = spread([t / ref[i] for i, t in enumerate(m["runs"])])
    return out


def ratio_text(m: Dict[str, Any], key: str = "ratio") -> str:
    """``"1.07 [1.03-1.12]"``: the median ratio and its quartiles (or extremes with few rounds)."""
    r = m.get(key)
    if r is None:
        return "1.00 (reference)"
    return f"{r['median']:.2f} [{r['low']:.2f}-{r['high']:.2f}]"


# -- the machine ----------------------------------------------------------------------------------
def machine() -> Dict[str, Any]:
    """The processor, its caches, threads, the load right now, and the kernel's fused path."""
    from tl_logitlens.kernel import native, tuning

    return {
        "processor": tuning.processor_name(DEVICE),
        "caches": tuning.cache_sizes(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "busy_other": busy_fraction(),
        "statistics_path": native.status() if DEVICE.type == "cpu" else "CUDA: torch.compile'd reductions",
        "torch": torch.__version__,
        # libgomp's idle threads spin 300,000 times by default: a busy neighbour then slows every
        # parallel region (README, "Under a noisy neighbour"); the setting is read once, at torch's import
        "openmp_waits": {k: os.environ.get(k, "unset") for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")},
    }


def busy_fraction(seconds: float = 1.0) -> float:
    """The fraction of all cores busy over ``seconds`` while this process sleeps: other work's share."""

    def read() -> List[int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return [sum(fields), fields[3] + fields[4]]  # total, idle + iowait

    try:
        (t0, i0) = read()
        time.sleep(seconds)
        (t1, i1) = read()
    except (OSError, ValueError):
        return float("nan")
    return round(1.0 - (i1 - i0) / max(1, t1 - t0), 3)


def header(meta: Dict[str, Any]) -> str:
    """The lines every benchmark prints first: where and under what load it ran."""
    caches = ", ".join(f"{k} {v}" for k, v in meta["caches"].items())
    return (
        f"processor: {meta['processor']} ({caches}); {meta['threads']} threads of {meta['cpu_count']} CPUs; "
        f"torch {meta['torch']}\n"
        f"load before: 1/5/15-min {meta['load_before']}, other work kept {100 * meta['busy_other']:.0f} % of "
        f"the CPUs busy in the second before the run\n"
        f"statistics: {meta['statistics_path']}; OpenMP waits: "
        + ", ".join(f"{k}={v}" for k, v in meta.get("openmp_waits", {}).items())
    )
