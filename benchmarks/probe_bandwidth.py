"""How fast this machine streams a decode step's weights: the read-bandwidth bound, measured honestly.

    nice -n 10 python benchmarks/probe_bandwidth.py [--threads 2] [--sizes-mb 1024,517,138,90] [--repeat 7]
        [--clock wall|cpu]

A decode step reads every weight once per token, the same bytes every token. The bound is therefore the best time
of a repeated pass over a buffer of the model's weight bytes (not a 1 GiB sweep: a working set that fits partly in
the last-level cache is re-read from it every token, and decode gets that too). Per size, interleaved, best of
``--repeat`` passes (after one warm-up pass), timed with the wall clock or (``--clock cpu``, for a loaded machine)
the process's CPU time divided by the threads:

- ``torch.sum``: the probe ``bench_decode_quant.read_bandwidth`` used (torch's reduction, its own threads);
- ``numba``: ``threads`` workers, each summing its contiguous share with vector loads into independent
  accumulators (LLVM vectorises the fast-math loop, several 8-float vectors wide), the weights in 4 KiB pages;
- ``numba-2M``: the same over a buffer advised ``MADV_HUGEPAGE`` (2 MiB pages when the kernel grants them:
  fewer TLB misses per byte streamed);
- ``streams`` / ``streams-2M``: each worker reads its share as STREAMS interleaved contiguous streams with 64-byte
  loads and a software prefetch PREFETCH_BYTES ahead (one stream per core reads about half as fast: the hardware
  prefetcher stops at every 4 KiB page and a single stream has too few misses in flight).

Prints GB/s per size and writes benchmarks/results/probe_bandwidth.json. :func:`stream_read_bandwidth` is the
probe the decode benchmarks use.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import time
from pathlib import Path

import numba as nb
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

from ssmkit.ops._numba_q8 import data_ptr, load, prefetch, reduce_sum  # noqa: E402

STREAMS = 4  # interleaved streams per worker (the row kernels read 4 weight rows at a time)
PREFETCH_BYTES = 4 * 4096  # software prefetch distance of each stream


def _streams_intrinsic(n_streams: int, ahead: int):
    """``f(x, lo, n) -> float32``: the sum of x[lo:lo + n] read as ``n_streams`` interleaved contiguous streams
    with 64-byte loads (n a multiple of 16 n_streams), each prefetching ``ahead`` bytes in front (0: none)."""

    @intrinsic
    def sum_streams(typingctx, x, lo, n):
        sig = x.dtype(x, types.intp, types.intp)

        def codegen(context, builder, sg, args):
            ax, alo, an = args
            vty = ir.VectorType(ir.FloatType(), 16)
            acc = [cgutils.alloca_once_value(builder, ir.Constant(vty, [0.0] * 16)) for _ in range(n_streams)]
            part = builder.udiv(an, ir.Constant(an.type, n_streams))
            with cgutils.for_range(builder, builder.udiv(part, ir.Constant(an.type, 16))) as loop:
                col = builder.add(alo, builder.mul(loop.index, ir.Constant(an.type, 16)))
                for s in range(n_streams):
                    at = builder.add(col, builder.mul(part, ir.Constant(an.type, s)))
                    if ahead:
                        prefetch(builder, data_ptr(builder, ax, builder.add(at, ir.Constant(an.type, ahead // 4))))
                    v = load(builder, ax, at, vty)
                    builder.store(builder.fadd(builder.load(acc[s]), v, flags=("fast",)), acc[s])
            total = builder.load(acc[0])
            for a in acc[1:]:
                total = builder.fadd(total, builder.load(a), flags=("fast",))
            return reduce_sum(builder, total)

        return sig, codegen

    return sum_streams


_sum_streams = _streams_intrinsic(STREAMS, PREFETCH_BYTES)


@nb.njit(parallel=True, cache=True)
def _parallel_streams(x, n_threads):
    """sum(x[:m]) (m: x's length rounded down to 16 STREAMS n_threads), each worker over its contiguous share, read
    as STREAMS prefetched streams; the probe the decode bound is measured with."""
    share = x.shape[0] // (16 * STREAMS * n_threads) * 16 * STREAMS
    parts = np.zeros(n_threads * 16, dtype=np.float32)
    for t in nb.prange(n_threads):
        parts[16 * t] = _sum_streams(x, t * share, share)
    return parts.sum()


@nb.njit(fastmath=True, cache=True)
def _sum(x):
    """sum(x) of a 1-D float32 array (a plain loop: LLVM vectorises it, which it does not inside a prange body)."""
    acc = np.float32(0)
    for i in range(x.shape[0]):
        acc += x[i]
    return acc


@nb.njit(parallel=True, cache=True)
def _parallel_sum(x, n_threads):
    """sum(x), each of n_threads workers over its contiguous share (x float32, 1-D)."""
    parts = np.zeros(n_threads * 16, dtype=np.float32)  # a 64-byte line per worker
    for t in nb.prange(n_threads):
        parts[16 * t] = _sum(x[t * x.shape[0] // n_threads:(t + 1) * x.shape[0] // n_threads])
    return parts.sum()


def huge_page_buffer(nbytes: int) -> np.ndarray:
    """A float32 array of ``nbytes`` (rounded down to 4 bytes) in an anonymous mapping advised MADV_HUGEPAGE, filled
    with ones (the first touch faults the pages in, as 2 MiB pages when the kernel grants them)."""
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    x = np.frombuffer(m, dtype=np.float32, count=nbytes // 4)
    x[:] = 1
    return x


def huge_pages_of_process() -> int:
    """kB of this process's memory in transparent huge pages (AnonHugePages of /proc/self/smaps_rollup)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def _best(fn, repeat: int, clock) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = clock()
        fn()
        best = min(best, clock() - t)
    return best


def stream_read_bandwidth(threads: int, nbytes: int, repeat: int = 7, huge: bool = False,
                          clock=time.perf_counter) -> float:
    """Bytes per second of the best of ``repeat`` passes of :func:`_parallel_streams` with ``threads`` workers over a
    float32 buffer of ``nbytes`` (the weight bytes one decode step reads; 2 MiB pages with ``huge``, which read
    no faster here), timed with ``clock`` (a CPU clock only with one thread)."""
    x = huge_page_buffer(nbytes) if huge else np.ones(nbytes // 4, dtype=np.float32)
    return x.size * 4 / _best(lambda: _parallel_streams(x, threads), repeat, clock)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes-mb", default="1024,517,138,90")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = p.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time  # cpu: all threads, divided below
    per = 1 if args.clock == "wall" else args.threads
    torch.set_num_threads(args.threads)
    nb.set_num_threads(args.threads)
    rows = []
    for mb in (float(s) for s in args.sizes_mb.split(",")):
        n = int(mb * 1e6) // 4
        plain = np.ones(n, dtype=np.float32)
        huge = huge_page_buffer(4 * n)
        tplain = torch.from_numpy(plain)
        cases = {"torch.sum": lambda t=tplain: torch.sum(t), "numba": lambda a=plain: _parallel_sum(a, args.threads),
                 "numba-2M": lambda a=huge: _parallel_sum(a, args.threads),
                 "streams": lambda a=plain: _parallel_streams(a, args.threads),
                 "streams-2M": lambda a=huge: _parallel_streams(a, args.threads)}
        best = {k: float("inf") for k in cases}
        for fn in cases.values():
            fn()
        for _ in range(args.repeat):  # interleaved
            for k, fn in cases.items():
                t = clock()
                fn()
                best[k] = min(best[k], (clock() - t) / per)
        row = {"MB": mb, **{f"{k} GB/s": 4 * n / best[k] / 1e9 for k in cases}, "huge_kB": huge_pages_of_process(),
               "load": os.getloadavg()[0]}
        rows.append(row)
        del plain, huge, tplain
    print_table(rows, list(rows[0]))
    write_json("probe_bandwidth", {"threads": args.threads, "clock": args.clock, "rows": rows})


if __name__ == "__main__":
    main()
