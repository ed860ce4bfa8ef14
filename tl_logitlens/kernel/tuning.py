"""Tile shapes for the machine at hand, chosen by a short measurement at first use.

The kernel reads ``[rows, d_model] @ W_U`` a tile of vocabulary columns at a time
(:mod:`tl_logitlens.kernel.tiles`). Which shape is fastest depends on the processor (its BLAS,
its vector width, its caches), the dtype, ``d_model`` and the layout of ``W_U``: a shape
tuned on one processor cost another three quarters of the product. So the shape is not a
constant: the first read with a new ``(device, processor, threads, dtype, d_model, d_vocab,
layout, statistics path)`` times the kernel itself on a few candidate shapes over a slice of
the real unembedding (min of repeats, about a second at most, since the trial rows shrink as
``d_model`` grows), and the fastest is kept for the process, and on disk when
``TL_LOGITLENS_TILE_CACHE`` names a file (or is ``1``, for the user cache directory). With the
fused statistics (:mod:`tl_logitlens.kernel.native`) each tile is read once while in cache
whatever its size, so only widths are timed, the widest within 5 % of the fastest is kept, and
the rows fill the budget: fewer, larger products, which a busy machine slows least. On the
eager path, whose dozen passes want the tile in cache, rows are timed too. A vocabulary of
262,144 tokens and a tied ``W_U`` that is a transposed view of ``W_E`` (``stride(0) == 1``:
Gemma, SmolLM2) are measured on their own slice, in their own layout.

Strategies:

- ``"tiled"`` (CPU default): tiles of ``width`` columns, each overwritten by the next, so the
  statistics read what the product just wrote while it is still in cache.
- ``"whole"`` (CUDA default): one product over the whole vocabulary for as many rows as the
  memory budget allows, the statistics as vectorised reductions over it
  (:func:`tl_logitlens.kernel.tiles.read_whole`). It runs on any device, so the tests run it on CPU.

Overrides, in order: ``chunk_size=`` (rows per product) on every entry point; :func:`force`
(a context manager, also for tests); :func:`set_chunk_budget` (bytes of working buffers,
from which rows follow); ``TL_LOGITLENS_AUTOTUNE=0`` (no measurement: 1024 columns, rows from
the budget).

Precision of the products (:func:`half_products`): on CUDA a bfloat16 or float16 unembedding
is read in its own dtype by the tensor cores, the normalised vectors rounded to it, with
float32 accumulation, float32 logits and float32 statistics (what the model's own unembedding
does, less the rounding of its output); a float32 product of a half-precision matrix would
run at a tenth of that speed. ``force(half_products=False)`` or
``TL_LOGITLENS_HALF_PRODUCTS=0`` reads in float32 instead (the vectors exactly); on the CPU
products are float32 unless ``half_products=True`` is forced, which rounds the vectors the
same way (the tests run the CUDA path's numbers so).

Example::

    >>> import torch
    >>> from tl_logitlens import tuning
    >>> W = torch.randn(64, 3000)
    >>> shape = tuning.tile_shape(W, torch.float32)
    >>> shape.strategy, 1 <= shape.width <= 3000, shape.rows >= 1
    ('tiled', True, True)
    >>> with tuning.force(width=7, rows=5):
    ...     tuning.tile_shape(W, torch.float32)[:3]
    (5, 7, 'tiled')
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import threading
import time
import warnings
from numbers import Integral
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

from ..errors import LensInputError
from ..files import write_json
from . import native
from . import workers as _workers
from .precision import HALF_DTYPES
from .tiles import BUFFERS, read_product

#: The working-buffer memory a measured CPU shape may use: :data:`~.tiles.BUFFERS` tiles, of which
#: the fused path touches only the first and a slice of the second (32 MiB at most by default).
#: Rows beyond what BLAS needs for full speed push tiles out of cache on the eager path, so it
#: measures its rows; the fused path reads each tile once and takes as many rows as fit: fewer,
#: larger products, so fewer passes over ``W_U`` and fewer waits at the threads' barriers when
#: other processes share the cores (on a loaded 2-core Xeon, 1365-row products cost 1.17 x one
#: whole product, 3328-row ones 1.08 x), while a 32 MiB tile still comes back from the cache
#: (a 64 MiB one cost 3 % more on the same Xeon).
CPU_BUDGET_BYTES = 96 * 2**20
#: Default working memory of the ``"whole"`` strategy on CUDA (capped at an eighth of the free memory).
CUDA_BUDGET_BYTES = 2 * 2**30
#: Shape used when measurement is switched off (``TL_LOGITLENS_AUTOTUNE=0``).
FALLBACK_WIDTH = 1024
STRATEGIES = ("tiled", "whole")
# Candidate tile widths and rows per product (rows scaled by 768 / d_model, so that every
# trial does about the same work whatever the model); the slice of the vocabulary timed.
# The slice holds at least two tiles of every width, so the timed loop runs its steady state
# (tiles after the first), not only the first tile's whole-tile top-k.
_WIDTHS = (1024, 4096, 2048, 512)
_ROWS = (384, 96)
_SLICE_COLUMNS = 16384
# The fused path: one trial row count; the widest width within this fraction of the fastest
# wins (the fewest calls: the steadiest under load). On the 2-core Xeon, Gemma-3-270m's lens
# with 8192-column tiles cost 1.07 x the product quietly (4096: 1.06) and 1.30 x beside a
# busy neighbour (4096: 1.39); 16384 cost 1.14 x quietly, too much to take unmeasured.
_FUSED_WIDTHS = (8192, 4096, 2048, 1024)
_FUSED_TOLERANCE = 0.05
# A candidate whose slowest round took this much longer than its fastest says other work shared
# the cores while measuring: the timings cannot rank the widths, and the widest is taken (beside
# a busy neighbour the tuner otherwise picked tiles that gave Gemma 1.85-1.99 x the product,
# where 8192 columns gave 1.30-1.34 x).
_NOISY_SPREAD = 1.3
# Rounds over the candidates, interleaved (each candidate's fastest round counts), so that a
# burst of load from another process slows every candidate alike instead of one.
_REPEATS = 3
# Stop starting rounds after this many seconds (a loaded machine): the fastest so far wins.
_DEADLINE_SECONDS = 1.0
# Rows of a worker's piece at d_model 768 (piece_rows), and its width when other work blurs the timings.
_PIECE_ROWS = 2048
_PIECE_WIDTH_NOISY = 2048


class TileShape(NamedTuple):
    """How the kernel cuts a product: ``rows`` per matrix product, ``width`` columns per tile.

    ``source`` says where it came from: ``"measured"``, ``"disk"``, ``"forced"``,
    ``"budget"``, ``"fallback"`` or ``"whole"``; ``seconds`` is what the measurement took.
    """

    rows: int
    width: int
    strategy: str
    source: str
    seconds: float = 0.0
    timings: Tuple[Tuple[int, int, float], ...] = ()  # (rows, width, ns per logit) per candidate
    #: Single-threaded workers that take ``[rows, width]`` pieces in turn (:mod:`.workers`); 1: one
    #: stream of products on all threads.
    lanes: int = 1


_lock = threading.Lock()
_memory: Dict[str, TileShape] = {}
_budget: Optional[int] = None
_forced: Dict[str, Any] = {}


def set_chunk_budget(nbytes: Optional[int]) -> None:
    """Bytes of working buffers per product (rows follow from it); ``None`` goes back to measured rows.

    Example::

        >>> from tl_logitlens import tuning
        >>> tuning.set_chunk_budget(16 * 2**20); tuning.chunk_budget()
        16777216
        >>> tuning.set_chunk_budget(None)
    """
    global _budget
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, Integral) or nbytes < 1):
        raise LensInputError(f"the chunk budget must be a positive number of bytes or None, got {nbytes!r}")
    _budget = None if nbytes is None else int(nbytes)


def chunk_budget() -> Optional[int]:
    """The budget set by :func:`set_chunk_budget`, or ``None`` (rows are measured)."""
    return _budget


@contextlib.contextmanager
def force(
    *,
    rows: Optional[int] = None,
    width: Optional[int] = None,
    strategy: Optional[str] = None,
    half_products: Optional[bool] = None,
    fused: Optional[bool] = None,
    workers: Optional[int] = None,
) -> Iterator[None]:
    """Use this shape (any part left ``None`` is chosen as usual) inside the block;
    ``half_products``: read a half-precision unembedding in its own dtype (see :func:`half_products`);
    ``fused``: read the tiles' statistics with the fused C kernel (``True``; ``RuntimeError`` where it
    cannot be built) or as tensor operations (``False``), see :mod:`tl_logitlens.kernel.native`;
    ``workers``: single-threaded workers taking pieces in turn on the fused path (``1``: one stream
    of products on all threads), see :mod:`tl_logitlens.kernel.workers`."""
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if half_products is not None and not isinstance(half_products, bool):
        raise ValueError(f"half_products must be True, False or None, got {half_products!r}")
    saved = dict(_forced)
    _forced.update(
        {
            k: v
            for k, v in (("rows", rows), ("width", width), ("strategy", strategy), ("half_products", half_products))
            if v is not None
        }
    )
    try:
        with native.force(fused), _workers.force(workers):
            yield
    finally:
        _forced.clear()
        _forced.update(saved)


def measured_shapes() -> Dict[str, TileShape]:
    """The shapes chosen so far in this process, by key (device, processor, threads, dtypes, sizes, layout)."""
    with _lock:
        return dict(_memory)


def clear_cache() -> None:
    """Forget the shapes measured in this process (the disk cache is left alone)."""
    with _lock:
        _memory.clear()


# -- the machine --------------------------------------------------------------------------------
def processor_name(device: Optional[torch.device] = None) -> str:
    """The processor's marketing name: the GPU's for a CUDA device, else the CPU's."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cache_sizes() -> Dict[str, str]:
    """CPU cache sizes per level as the OS reports them (e.g. ``{"L1d": "32K", "L2": "2048K", "L3": "36608K"}``)."""
    out: Dict[str, str] = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")) if base.exists() else []:
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        name = f"L{level}" + ({"Data": "d", "Instruction": "i"}.get(kind, ""))
        out[name] = size
    return out


def _layout(W: torch.Tensor) -> str:
    """``"d_model-major"`` when ``W [d_model, d_vocab]`` has unit stride along the vocabulary,
    ``"vocab-major"`` when it is the transpose of a contiguous ``[d_vocab, d_model]`` matrix."""
    return "vocab-major" if W.stride(0) == 1 and W.shape[0] > 1 else "d_model-major"


def _path(device: torch.device, dtype: torch.dtype) -> str:
    """``"fused"`` where tiles of ``dtype`` on ``device`` take the fused C kernel (:mod:`.native`), else ``"eager"``."""
    return "fused" if native.fused(torch.empty(0, dtype=dtype, device=device)) else "eager"


def lanes(device: torch.device, dtype: torch.dtype) -> int:
    """Workers that take tiles in turn (:mod:`.workers`): on the fused path, one per thread; else 1."""
    return _workers.count(device) if _path(torch.device(device), dtype) == "fused" else 1


def piece_rows(d_model: int) -> int:
    """Rows per worker's piece: the product's work held about constant across ``d_model`` (2048 rows
    at 768), 256 to 4096. On the 2-core Xeon the GPT-2-small shape's kernel with [2048, 2048] pieces
    cost 1.11 x the plain product quietly and 1.01 x beside a busy neighbour ([1024, 2048]: 1.11 and
    1.05); 512-row pieces slowed the products themselves by 5 %, and each piece's own sums (what makes
    a call reproducible to the bit) cost less in fewer pieces."""
    return max(256, min(4096, _PIECE_ROWS * 768 // max(d_model, 1)))


def _lane_rows(rows: int, n_lanes: int, itemsize: int, width: int, budget: int) -> int:
    """``rows`` per piece, fewer where the workers' buffers (two pieces' worth each: a piece and its
    reference rows, as read_rows allocates them) would pass ``budget`` bytes."""
    return max(1, min(rows, budget // (2 * n_lanes * itemsize * width)))


def _key(W: torch.Tensor, dtype: torch.dtype, whole_rows: bool) -> str:
    d_model, d_vocab = W.shape
    path = _path(W.device, dtype)
    candidates = "w" + "-".join(map(str, _FUSED_WIDTHS if path == "fused" else _WIDTHS))
    if path == "fused":
        path += f"-lanes{lanes(W.device, dtype)}"
    return "|".join(
        map(
            str,
            (
                W.device.type,
                processor_name(W.device),
                torch.get_num_threads(),
                str(dtype).replace("torch.", ""),
                str(W.dtype).replace("torch.", ""),
                d_model,
                d_vocab,
                _layout(W),
                "whole-rows" if whole_rows else "tiles",
                path,
                candidates,
                torch.__version__,
            ),
        )
    )


# -- the disk cache -------------------------------------------------------------------------------
def cache_file() -> Optional[Path]:
    """The on-disk cache named by ``TL_LOGITLENS_TILE_CACHE`` (``1``: the user cache directory), else ``None``."""
    value = os.environ.get("TL_LOGITLENS_TILE_CACHE", "").strip()
    if not value or value == "0":
        return None
    if value == "1":
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return root / "tl_logitlens" / "tile_shapes.json"
    return Path(value)


def _read_disk(path: Path) -> Dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, ValueError) as err:
        warnings.warn(
            f"tl_logitlens: ignoring the unreadable tile-shape cache {path} ({err}); it will be rewritten", stacklevel=3
        )
        return {}


def _from_disk(path: Path, key: str) -> Optional[TileShape]:
    entry = _read_disk(path).get(key)
    try:
        rows, width, strategy = int(entry["rows"]), int(entry["width"]), str(entry["strategy"])
        if rows < 1 or width < 1 or strategy not in STRATEGIES:
            raise ValueError
        return TileShape(rows, width, strategy, "disk")
    except (TypeError, KeyError, ValueError):
        if entry is not None:
            warnings.warn(f"tl_logitlens: ignoring a malformed entry in the tile-shape cache {path}", stacklevel=3)
        return None


def _to_disk(path: Path, key: str, shape: TileShape) -> None:
    data = _read_disk(path)
    data[key] = {
        "rows": shape.rows,
        "width": shape.width,
        "strategy": shape.strategy,
        "timings": [list(t) for t in shape.timings],
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, data, indent=1)  # atomic: a concurrent reader sees the old or the new file
    except OSError as err:
        warnings.warn(f"tl_logitlens: could not write the tile-shape cache {path} ({err})", stacklevel=3)


# -- the measurement ----------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_kernel(x: torch.Tensor, W: torch.Tensor, width: int, buffers: List[torch.Tensor]) -> float:
    """Seconds for one call of the tiled kernel (top-k, entropy, KL, a target) over ``x @ W``
    (with workers, each reads whole tiles of ``x``'s rows: a piece and its reference rows)."""
    m = x.shape[0]
    targets = torch.zeros(m, 1, dtype=torch.long, device=x.device)
    _sync(x.device)
    start = time.perf_counter()
    read_product(x, 1, W, None, None, buffers, top_k=5, with_reference=True, target_ids=targets, width=width)
    _sync(x.device)
    return time.perf_counter() - start


def measure(W: torch.Tensor, dtype: torch.dtype) -> TileShape:
    """Time the candidate shapes on a slice of ``W [d_model, d_vocab]`` and return the fastest per logit.

    The slice keeps ``W``'s layout and dtype; the vectors are unit-variance random ones in
    ``dtype`` (the statistics' cost does not depend on their values beyond top-k's pruning).
    On the fused path (:mod:`.native`) only widths are timed. With one stream of products the
    widest within 5 % of the fastest is kept (the widest of all when other work blurred the rounds,
    see :func:`_noisy`) and rows fill the budget; with workers taking pieces in turn
    (:mod:`.workers`) the narrowest within 5 % (2048 columns when blurred) and :func:`piece_rows`
    rows, fewer where the workers' buffers would pass the budget. On the eager path rows are timed too.
    """
    started = time.perf_counter()
    d_model, d_vocab = W.shape
    fused = _path(W.device, dtype) == "fused"
    n_lanes = lanes(W.device, dtype)
    columns = min(d_vocab, _SLICE_COLUMNS)
    Ws = W[:, :columns]
    gen = torch.Generator(device="cpu").manual_seed(0)
    # Rows scaled so each trial does the same work whatever d_model (a 7B model's 4096
    # gives 72 and 18 rows), at most doubled for small models; workers' pieces have their own rule.
    trial_rows = sorted({min(2 * r, max(16, r * 768 // max(d_model, 1))) for r in _ROWS}, reverse=True)
    widths = list(dict.fromkeys(min(w, columns) for w in (_FUSED_WIDTHS if fused else _WIDTHS)))
    itemsize = torch.empty((), dtype=dtype).element_size()
    if n_lanes > 1:  # pieces that fit half the budget at the widest candidate (a piece's rate hardly depends on it)
        trial_rows = [_lane_rows(piece_rows(d_model), n_lanes, itemsize, max(widths), CPU_BUDGET_BYTES // 2)]
    # One set of buffers for every trial, as wide as the widest: allocations of changing sizes grow the
    # process (a set per candidate took 200 MiB of resident memory where one set is 50).
    count = max(BUFFERS, 2 * n_lanes)
    buffers = [torch.empty(max(trial_rows) * max(widths), dtype=dtype, device=W.device) for _ in range(count)]
    rounds: Dict[Tuple[int, int], List[float]] = {}  # (rows, width) -> ns per logit, one per round
    with torch.no_grad():
        inputs = {
            rows: torch.randn(rows, d_model, generator=gen, dtype=torch.float32).to(device=W.device, dtype=dtype)
            for rows in (trial_rows[:1] if fused else trial_rows)
        }
        torch.mm(inputs[trial_rows[0]], Ws[:, :512].to(dtype))  # warm-up: BLAS threads, first-touch pages
        for _ in range(_REPEATS):
            if rounds and time.perf_counter() - started > _DEADLINE_SECONDS:
                break
            for rows, x in inputs.items():
                for width in widths:
                    ns = _time_kernel(x, Ws, width, buffers) / (rows * columns) * 1e9
                    rounds.setdefault((rows, width), []).append(ns)
    timings = [(rows, width, min(ns)) for (rows, width), ns in rounds.items()]
    best = min(t[2] for t in timings)
    if fused:  # the widest of the near-fastest (of all, when other work blurred the timings); rows fill the budget
        noisy = _noisy(list(rounds.values()))
        near = [w for _, w, ns in timings if ns <= best * (1 + _FUSED_TOLERANCE)]
        if n_lanes > 1:  # workers: the narrowest of the near-fastest, so the last pieces end together
            width = min(_PIECE_WIDTH_NOISY, columns) if noisy else min(near)
            rows = _lane_rows(piece_rows(d_model), n_lanes, itemsize, width, CPU_BUDGET_BYTES)
        else:
            width = max(w for _, w, _ in timings) if noisy else max(near)
            rows = max(trial_rows[0], CPU_BUDGET_BYTES // (BUFFERS * itemsize * width))
    else:
        rows, width, _ = min(timings, key=lambda t: t[2])
        if rows == max(t[0] for t in timings):
            # More rows were no slower: let them grow to the CPU budget (fewer passes over W_U).
            rows = max(rows, CPU_BUDGET_BYTES // (BUFFERS * itemsize * width))
    shape = TileShape(rows, width, "tiled", "measured", time.perf_counter() - started, tuple(timings))
    return shape._replace(lanes=n_lanes)


def _noisy(rounds: List[List[float]]) -> bool:
    """Whether other work blurred the timings: some candidate's rounds after its first (which
    also faults its buffers in) differ by more than :data:`_NOISY_SPREAD`, or the deadline left
    fewer than two such rounds."""
    later = [ns[1:] for ns in rounds]
    if any(len(ns) < 2 for ns in later):
        return True
    return max(max(ns) / min(ns) for ns in later) > _NOISY_SPREAD


def half_products(W: torch.Tensor) -> bool:
    """Whether products with ``W [d_model, d_vocab]`` read it in its own half precision.

    True for a bfloat16 or float16 ``W`` on CUDA (tensor cores: the vectors rounded to
    ``W``'s dtype, float32 accumulation and logits), unless ``force(half_products=False)``
    or ``TL_LOGITLENS_HALF_PRODUCTS=0``; False on the CPU unless forced (or ``=1``), and
    always False for a float32 or float64 ``W``.

    Example::

        >>> import torch
        >>> from tl_logitlens import tuning
        >>> W = torch.zeros(4, 8, dtype=torch.bfloat16)
        >>> tuning.half_products(W), tuning.half_products(W.float())
        (False, False)
        >>> with tuning.force(half_products=True):
        ...     tuning.half_products(W), tuning.half_products(W.float())
        (True, False)
    """
    if W.dtype not in HALF_DTYPES:
        return False
    forced = _forced.get("half_products")
    if forced is not None:
        return bool(forced)
    env = os.environ.get("TL_LOGITLENS_HALF_PRODUCTS", "").strip()
    if env in ("0", "1"):
        return env == "1"
    if env:
        raise ValueError(
            f"TL_LOGITLENS_HALF_PRODUCTS must be 0 (float32 products) or 1 (half-precision products), "
            f"got {env!r}; unset it for the default (half precision on CUDA only)"
        )
    return W.device.type == "cuda"


def default_strategy(device: torch.device) -> str:
    """``"whole"`` on CUDA, ``"tiled"`` elsewhere."""
    return "whole" if torch.device(device).type == "cuda" else "tiled"


def _whole_rows(W: torch.Tensor, itemsize: int) -> int:
    budget = _budget
    if budget is None:
        budget = CUDA_BUDGET_BYTES
        if W.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(W.device)
            budget = min(budget, free // 8)
        else:
            budget = CPU_BUDGET_BYTES
    return max(1, budget // (BUFFERS * itemsize * W.shape[1]))


def tile_shape(
    W: torch.Tensor,
    dtype: torch.dtype,
    *,
    whole_rows: bool = False,
    chunk_size: Optional[int] = None,
    strategy: Optional[str] = None,
) -> TileShape:
    """The shape the kernel uses for ``W [d_model, d_vocab]`` read in ``dtype``.

    ``whole_rows``: a transform that needs whole rows (a soft cap is elementwise and does
    not), so one tile spans the vocabulary. ``chunk_size`` forces the rows per product.
    ``strategy``: ``"tiled"`` for a reader that always tiles (the loss of
    :mod:`tl_logitlens.kernel.loss`), whatever the device's default.
    """
    d_vocab = W.shape[1]
    itemsize = torch.empty((), dtype=dtype).element_size()
    strategy = strategy or _forced.get("strategy") or default_strategy(W.device)
    if strategy == "whole" or whole_rows:
        rows = chunk_size or _forced.get("rows") or _whole_rows(W, itemsize)
        return TileShape(rows, d_vocab, strategy, "whole" if strategy == "whole" else "budget")
    width, rows = _forced.get("width"), _forced.get("rows")
    source = "forced"
    base: Optional[TileShape] = None
    if width is None or (rows is None and chunk_size is None and _budget is None):
        base = _measured(W, dtype)
        source = "forced" if _forced.keys() & {"rows", "width", "strategy"} else base.source
    width = min(d_vocab, width or base.width)
    n_lanes = lanes(W.device, dtype)
    if chunk_size is not None:
        rows, source = chunk_size, "forced"
    elif rows is None and _budget is not None:
        rows, source = max(1, _budget // (BUFFERS * itemsize * width)), "budget"
        if n_lanes > 1:
            rows = _lane_rows(piece_rows(W.shape[0]), n_lanes, itemsize, width, _budget)
    elif rows is None:
        rows = base.rows
        if n_lanes > 1:  # measured for another width, perhaps: the pieces still fit the budget
            rows = _lane_rows(rows, n_lanes, itemsize, width, CPU_BUDGET_BYTES)
    seconds, timings = (base.seconds, base.timings) if base else (0.0, ())
    return TileShape(int(rows), int(width), "tiled", source, seconds, timings, n_lanes)


def _measured(W: torch.Tensor, dtype: torch.dtype) -> TileShape:
    """The measured (or cached) shape for this machine and matrix."""
    key = _key(W, dtype, False)
    with _lock:
        shape = _memory.get(key)
        if shape is not None:
            return shape
        if os.environ.get("TL_LOGITLENS_AUTOTUNE", "1").strip() == "0":
            itemsize = torch.empty((), dtype=dtype).element_size()
            width = min(W.shape[1], FALLBACK_WIDTH)
            rows = max(1, CPU_BUDGET_BYTES // (BUFFERS * itemsize * width))
            if lanes(W.device, dtype) > 1:
                rows = piece_rows(W.shape[0])
            shape = TileShape(rows, width, "tiled", "fallback")
        else:
            path = cache_file()
            shape = _from_disk(path, key) if path is not None else None
            if shape is None:
                shape = measure(W, dtype)
                if path is not None:
                    _to_disk(path, key, shape)
        _memory[key] = shape
        return shape
