"""Where the logit lens's time goes: the kernel rebuilt one piece at a time, each step timed against the floor.

A profiler cannot split one fused pass into its parts, so this measures by addition instead.
Every rung of the ladder below runs the kernel's own tile loop over the same normalised vectors,
with the tile shape the kernel measured for this machine and the statistics path it chose (fused
C kernel or eager tensor operations), and does everything the rung above did plus one piece:

1. ``products``: ``vectors @ W_U`` a tile at a time into the kernel's buffer, nothing read back;
2. ``copies and casts``: plus a half-precision ``W_U`` tile cast to float32, the bias, a soft cap;
3. ``maxima and exp sums``: plus each row's running maximum and its exponential sums (log Z, entropy);
4. ``KL to final``: plus the cross sums against the final layer's exponentials;
5. ``top-k``: plus the running top-5;
6. ``targets and ranks``: plus the next token's logit and how many logits beat it (its rank);
7. ``read_rows``: the kernel's entry point (the final norm, gathering rows, results to the host);
8. ``tll.logit_lens``: the whole call over the cache (checks, reading the cache, the result).

Rungs 1-6 run one stream of products on all threads (the one-stream shape, ``workers.force(1)``):
a profile by addition needs one sequence of steps. Rungs 7-8 run the kernel as it runs by
default; where single-threaded workers take the pieces in turn (:mod:`tl_logitlens.kernel.workers`,
the fused CPU path with more than one thread), rung 7's increment is what the workers gain or
lose against the one-stream rung 6, and the header says how many there are.

All rungs and the floor run interleaved (:func:`timing.interleaved`); each rung's *increment* over
the rung above is its cost, printed in seconds and as a share of the floor.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import timing
import torch

from tl_logitlens.kernel import native, tiles, tuning, workers
from tl_logitlens.kernel.read import read_rows

RUNGS = (
    "products",
    "copies and casts",
    "maxima and exp sums",
    "KL to final",
    "top-k",
    "targets and ranks",
    "read_rows",
    "tll.logit_lens",
)


def _tile_loop(x: torch.Tensor, g: int, W: torch.Tensor, b, transform, width: int, rung: int, fused: bool):
    """One product ``x [g * n, d] @ W`` a tile at a time with the statistics of ``rung`` (1-6)."""
    m, d_vocab = x.shape[0], W.shape[1]
    n = m // g
    buffers = [torch.empty(m * width) for _ in range(tiles.BUFFERS)]
    cast = W.dtype != x.dtype
    W_plain = W.to(x.dtype) if cast and rung == 0 else W  # rung 0: the product alone, no cast
    w_tile = torch.empty(W.shape[0] * width) if cast else None
    next_tokens = torch.randint(0, d_vocab, (n,), generator=torch.Generator().manual_seed(0))
    target_ids = next_tokens.unsqueeze(1)

    def run() -> None:
        stats = _Stats(x, g, W, b, transform, buffers, rung, fused, next_tokens, target_ids)
        for a in range(0, d_vocab, width):
            z = min(d_vocab, a + width)
            tile = buffers[0][: m * (z - a)].view(m, z - a)
            columns = W_plain[:, a:z]
            if cast and rung >= 1:
                columns = w_tile[: W.shape[0] * (z - a)].view(W.shape[0], z - a).copy_(columns)
            torch.mm(x, columns, out=tile)
            if rung >= 1 and b is not None:
                tile.add_(b[a:z])
            if rung >= 1 and transform is not None:
                tile.copy_(transform(tile))
            stats.fold(tile, a, z)

    return run


class _Stats:
    """The statistics of one rung, on the fused or the eager path (the kernel's own pieces)."""

    def __init__(self, x, g, W, b, transform, buffers, rung, fused, next_tokens, target_ids) -> None:
        m = x.shape[0]
        self.rung, self.fused, self.buffers, self.g, self.n = rung, fused, buffers, g, m // g
        reference = rung >= 3
        targets = target_ids if rung >= 5 else None
        nxt = next_tokens if rung >= 5 else None
        reader = tiles._FusedTiles if fused else tiles._EagerTiles
        self.inner = reader(x, g, W, b, transform, buffers, 5, reference, nxt, targets, False)

    def fold(self, tile: torch.Tensor, a: int, z: int) -> None:
        if self.rung < 2:
            return
        if self.rung >= 5 or (not self.fused and self.rung >= 4):
            return self.inner.fold(tile, a, z)
        if self.fused:  # rungs 2-5 on the fused path: the same call, pieces left out
            s = self.inner
            top = s.top if self.rung >= 4 else None
            targets = s.targets if self.rung >= 5 else None
            ref_exps = None if s.sums[3] is None else self.buffers[1]
            native.fold_tile(tile, s.n, a, s.sums, ref_exps, s.ref_prev, top, targets, s.next_pick)
            return
        # eager rungs 2-3: the online sums alone, the row maxima read by themselves
        m, w = tile.shape
        scratch = [self.buffers[1][: m * w].view(m, w), self.buffers[2][: m * w].view(m, w)]
        self.inner.sums.fold(tile, tile.amax(1), *scratch, first=a == 0)


def ladder(
    unembed: Any,
    vectors: torch.Tensor,
    lens_call: Callable[[], Any],
    floor: Callable[[], float],
    rounds: int,
    progress: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
    """Time the rungs for ``vectors [entries, rows, d_model]`` (the raw stream; the last entry is the
    final one) read through ``unembed`` (a kernel :class:`~tl_logitlens.kernel.read.Unembedding`)."""
    entries, rows, d = vectors.shape
    dtype = torch.float32
    W, b, transform = unembed.W, unembed.b, unembed.transform
    if b is not None and not bool(b.any()):
        b = None  # as the kernel does: a zero bias is skipped
    if b is not None:
        b = b.to(dtype)
    lanes = tuning.tile_shape(W, dtype, whole_rows=tiles.needs_whole_rows(transform)).lanes
    with workers.force(1):  # rungs 1-6: one stream of products (module docstring)
        shape = tuning.tile_shape(W, dtype, whole_rows=tiles.needs_whole_rows(transform))
    width = tiles.tile_width(W.shape[1], transform, shape.width)
    fused = native.fused(torch.empty(0, dtype=dtype))
    step = max(1, min(rows, shape.rows // entries))  # rows per product, every entry at once (read_rows's plan)
    fnorm = unembed.final_norm.to(dtype, W.device)
    # the final entry first: the reference, as read_rows orders a product
    order = [entries - 1] + list(range(entries - 1))
    chunks: List[torch.Tensor] = []
    for start in range(0, rows, step):
        x = torch.stack([vectors[i, start : start + step].to(dtype) for i in order])
        chunks.append(fnorm.apply(x, "recompute", None).reshape(-1, d).contiguous())

    def rung_fn(rung: int) -> Callable[[], None]:
        loops = [_tile_loop(x, entries, W, b, transform, width, rung, fused) for x in chunks]

        def run() -> None:
            with workers.force(1):
                for loop in loops:
                    loop()

        return run

    methods: Dict[str, Callable[[], Any]] = {"floor": floor}
    for rung, name in enumerate(RUNGS[:6]):
        methods[name] = rung_fn(rung)
    flat = vectors.reshape(entries, rows, d)
    targets = torch.zeros(rows, 1, dtype=torch.long)
    methods["read_rows"] = lambda: read_rows(
        unembed, flat, norm="recompute", top_k=5, target_ids=targets, reference=flat[-1],
        reference_entry=entries - 1, next_tokens=targets[:, 0],
    )  # fmt: skip
    methods["tll.logit_lens"] = lens_call
    timings = timing.interleaved(methods, rounds, memory=False, progress=progress)
    out: Dict[str, Any] = {
        "shape": {"rows_per_product": step * entries, "width": width, "strategy": shape.strategy,
                  "source": shape.source, "path": "fused" if fused else "eager", "workers": lanes},
        "rungs": {},
    }  # fmt: skip
    floor_runs = timings["floor"]["runs"]
    previous = [0.0] * rounds
    for name in RUNGS:
        runs = timings[name]["runs"]
        steps = [t - p for t, p in zip(runs, previous)]
        out["rungs"][name] = {
            "seconds": timing.spread(runs),
            "increment": timing.spread(steps),
            "increment_of_floor": timing.spread([s / f for s, f in zip(steps, floor_runs)]),
            "ratio": timing.spread([t / f for t, f in zip(runs, floor_runs)]),
        }
        previous = runs
    out["floor"] = timings["floor"]["seconds"]
    return out


def print_ladder(title: str, result: Dict[str, Any], processor: str) -> None:
    s = result["shape"]
    print(f"\nWhere the time goes: {title} on {processor}")
    print(
        f"  tiles: {s['rows_per_product']} rows x {s['width']} columns ({s['strategy']}, {s['source']}); "
        f"statistics: {s['path']}; floor median {result['floor']['median']:.3f} s"
    )
    if s.get("workers", 1) > 1:
        print(
            f"  rungs 1-6: one stream of products on all threads; read_rows and tll.logit_lens: "
            f"{s['workers']} single-threaded workers taking pieces in turn (the kernel's default here)"
        )
    print(f"  {'rung':<22}{'cumulative x floor':>24}{'increment s':>14}{'increment x floor':>24}")
    for name, r in result["rungs"].items():
        inc = r["increment_of_floor"]
        print(
            f"  {name:<22}{r['ratio']['median']:>10.3f} [{r['ratio']['low']:.2f}-{r['ratio']['high']:.2f}]"
            f"{r['increment']['median']:>14.3f}{inc['median']:>+12.3f} [{inc['low']:+.2f} {inc['high']:+.2f}]"
        )
