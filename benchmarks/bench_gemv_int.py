"""Decode GEMVs (batch 1) on the 130M Mamba shapes: float-activation rows against integer-activation rows.

    nice -n 10 python benchmarks/bench_gemv_int.py [--copies 24] [--repeat 5] [--shapes in_proj,out_proj,...]
        [--isas vnni,avx512bw] [--clock wall|cpu] [--flush-mb 512]

One thread, one process. Per shape (in_proj 3072 x 768, out_proj 768 x 1536, x_proj 80 x 1536, LM head
50280 x 768) it builds ``--copies`` independent weights (a 24-layer model reads 24 different matrices per token,
so the products stream from memory, not cache; the head gets one copy) and times one pass over all copies,
best of ``--repeat``, every variant interleaved:

- ``f32``: the fused decode kernels' float row product (``_rows_block``), and ``F.linear`` (oneDNN/MKL);
- ``int8``: the float-activation row product (each int8 weight widened to float), the integer-activation one
  (``_numba_q8``: x quantized per block of 32, int8 x int8 products summed in int32 lanes) on each instruction
  set of ``--isas`` (``vnni``: ``vpdpbusd``, the decode kernels' choice on a CPU with AVX-512 VNNI;
  ``avx512bw``: ``vpmaddwd``; ``generic``: plain widening multiplies), ``torch._weight_int8pack_mm`` (float
  activations) and torch.ao's fbgemm dynamic quantized linear (per-tensor int8 activations);
- ``int4`` (group 32): float-activation rows, integer-activation rows (``_numba_q4``) on each of ``--isas``,
  ``_weight_int4pack_mm_for_cpu``.

Before each timed pass a ``--flush-mb`` buffer is summed (untimed), so no variant finds the weights in the
last-level cache after the pass of the variant before it over the same weights (0: no flush).
``--clock cpu`` times with this thread's CPU time (``time.thread_time``) instead of the wall clock, so time
slices lost to other processes on a loaded machine do not count (cache and memory contention still do).
Columns: time of one GEMV relative to the first row of its precision (``vs first``), and ``of bound``: the
weight bytes over the copy bandwidth measured in the same process (``np.copyto`` of 1 GiB; bytes copied per
second), divided by the measured time. Writes benchmarks/results/bench_gemv_int.json.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numba as nb
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

from ssmkit.ops import _numba_decode as D  # noqa: E402
from ssmkit.ops import _numba_q4 as Q4  # noqa: E402
from ssmkit.ops import _numba_q8 as Q  # noqa: E402
from ssmkit.ops.int4_linear import quantize_int4  # noqa: E402
from ssmkit.ops.int8_linear import quantize_int8  # noqa: E402

SHAPES = {"in_proj": (3072, 768), "out_proj": (768, 1536), "x_proj": (80, 1536), "head": (50280, 768)}


@nb.njit(fastmath=True, cache=True)
def _float_rows(x, w, scale, buf):
    D._rows_block(x, w, 0, w.shape[0], scale, buf[:0, 0], buf)


def _int_rows(isa: str):
    """Jitted (int8, int4) integer-activation GEMVs f(x, qbuf, w, scale, buf) on instruction set ``isa``:
    quantize x, lay it out, multiply every row (what a decode stage does)."""
    r8, r4 = Q.make_rows_int8(isa), Q4.make_rows_int4(isa)

    @nb.njit(fastmath=True)
    def q8(x, qb, w, scale, buf):
        Q.quantize_rows(x, qb[0], qb[1], qb[2])
        Q.pack_acts8(qb[0], qb[1], qb[4], qb[5])
        r8(qb[0], qb[1], qb[4], qb[5], w, 0, w.shape[0], scale, buf[:0, 0], buf)

    @nb.njit(fastmath=True)
    def q4(x, qb, w, scale, buf):
        Q.quantize_rows(x, qb[0], qb[1], qb[2])
        Q4.pack_acts(qb[0], qb[1], x.shape[1] // scale.shape[1], qb[3], qb[4], qb[5])
        r4(qb[3], qb[4], qb[5], w, 0, w.shape[0], scale, buf[:0, 0], buf)

    return q8, q4


@nb.njit(cache=True)
def _buffers(x):
    return D._act_buffers(x.shape[0], x.shape[1], x)


def copy_bandwidth(gib: float = 1.0, repeat: int = 5, clock=time.perf_counter) -> float:
    """Bytes copied per second: best ``np.copyto`` of ``gib`` GiB (each byte read once and written once), timed
    with ``clock``."""
    src = np.ones(int(gib * 2**30), dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeat):
        t = clock()
        np.copyto(dst, src)
        best = min(best, clock() - t)
    return src.nbytes / best


def _variants(rows: int, cols: int, copies: int, isas: list[str]) -> dict[str, tuple[str, int, list]]:
    """name -> (precision, weight bytes per copy, one closure per copy)."""
    torch.manual_seed(0)
    x = torch.randn(1, cols)
    xn = x.numpy()
    qb = _buffers(xn)
    buf = np.zeros((rows, 1), np.float32)
    none = np.zeros(0, np.float32)
    kernels = {isa: _int_rows(isa) for isa in isas}
    out: dict[str, tuple[str, int, list]] = {k: ("", 0, []) for k in (
        "f32 numba rows", "f32 F.linear", "int8 float-act rows", *(f"int8 q8-act rows {i}" for i in isas),
        "int8 torch int8pack_mm", "int8 fbgemm dynamic (per-tensor act)", "int4 float-act rows",
        *(f"int4 q8-act rows {i}" for i in isas), "int4 torch int4pack_mm")}

    def add(name: str, nbytes: int, fn) -> None:
        prec, _, fns = out[name]
        out[name] = (name.split()[0], nbytes, [*fns, fn])

    for _ in range(copies):
        w = torch.randn(rows, cols) / cols**0.5
        wn = w.numpy()
        add("f32 numba rows", w.numel() * 4, lambda wn=wn: _float_rows(xn, wn, none, buf))
        add("f32 F.linear", w.numel() * 4, lambda w=w: F.linear(x, w))
        q, s = quantize_int8(w)
        qn, sn = q.numpy(), s.numpy()
        nb8 = q.numel() + s.numel() * 4
        add("int8 float-act rows", nb8, lambda qn=qn, sn=sn: _float_rows(xn, qn, sn, buf))
        for isa, (k8, _) in kernels.items():
            add(f"int8 q8-act rows {isa}", nb8, lambda qn=qn, sn=sn, k8=k8: k8(xn, qb, qn, sn, buf))
        add("int8 torch int8pack_mm", nb8, lambda q=q, s=s: torch._weight_int8pack_mm(x, q, s))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dyn = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(cols, rows, bias=False)),
                                                         {torch.nn.Linear}, dtype=torch.qint8)
        add("int8 fbgemm dynamic (per-tensor act)", nb8, lambda dyn=dyn: dyn(x))
        p, s4 = quantize_int4(w, 32)
        pn, s4n = p.numpy(), s4.numpy()
        nb4 = p.numel() + s4.numel() * 4
        add("int4 float-act rows", nb4, lambda pn=pn, s4n=s4n: _float_rows(xn, pn, s4n, buf))
        for isa, (_, k4) in kernels.items():
            add(f"int4 q8-act rows {isa}", nb4, lambda pn=pn, s4n=s4n, k4=k4: k4(xn, qb, pn, s4n, buf))
        if rows % 16:  # torch's int4 packing needs a multiple of 16 rows
            continue
        nib = (p.view(torch.uint8).to(torch.int32).reshape(rows, cols // 32, 16))
        wq = torch.cat([nib & 15, nib >> 4], dim=2).reshape(rows, cols)  # 0..15, torch subtracts 8
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(wq, 8)
        sz = torch.stack([s4.T, torch.zeros_like(s4.T)], -1).contiguous()
        add("int4 torch int4pack_mm", nb4, lambda packed=packed, sz=sz:
            torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz))
    return out


def run(shape: str, copies: int, repeat: int, bw: float, isas: list[str], clock=time.perf_counter,
        flush: np.ndarray | None = None) -> list[dict]:
    rows, cols = SHAPES[shape]
    variants = _variants(rows, cols, copies, isas)
    variants = {k: v for k, v in variants.items() if v[2]}
    for _, _, fns in variants.values():  # compile and warm up
        fns[0]()
    best = {k: float("inf") for k in variants}
    for _ in range(repeat):
        for name, (_, _, fns) in variants.items():
            if flush is not None:
                flush.sum()
            t = clock()
            for fn in fns:
                fn()
            best[name] = min(best[name], (clock() - t) / len(fns))
    table, first = [], {}
    for name, (prec, nbytes, _) in variants.items():
        first.setdefault(prec, best[name])
        table.append({"shape": f"{shape} {rows}x{cols}", "kernel": name, "us": round(best[name] * 1e6, 1),
                      "vs first": round(first[prec] / best[name], 2), "MB": round(nbytes / 1e6, 2),
                      "of bound": round(nbytes / bw / best[name], 2)})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--isas", default=",".join(i for i in Q.ISAS if i != "generic" and (i != "vnni" or Q.ISA == i)),
                        help=f"instruction sets of the integer-activation rows, of {Q.ISAS} (host: {Q.ISA})")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--flush-mb", type=int, default=512)
    args = parser.parse_args()
    flush = np.ones(args.flush_mb << 20, np.uint8) if args.flush_mb > 0 else None
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    isas = args.isas.split(",")
    if any(i not in Q.ISAS for i in isas) or (Q.ISA != "vnni" and "vnni" in isas):
        raise SystemExit(f"--isas: each must be one of {Q.ISAS} (vnni only on a CPU with it), got {args.isas!r}")
    torch.set_num_threads(1)
    bw = copy_bandwidth(clock=clock)
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s (one thread)", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        if shape not in SHAPES:
            raise SystemExit(f"--shapes: unknown shape {shape!r}; known: {', '.join(SHAPES)}")
        rows += run(shape, 1 if shape == "head" else args.copies, args.repeat, bw, isas, clock, flush)
    bw2 = copy_bandwidth(clock=clock)
    print_table(rows, ["shape", "kernel", "us", "vs first", "MB", "of bound"])
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s before, {bw2 / 1e9:.1f} GB/s after")
    write_json("bench_gemv_int", {"copy_bandwidth_Bps": [bw, bw2], "host_isa": Q.ISA, "clock": args.clock,
                                  "flush_mb": args.flush_mb, "rows": rows})


if __name__ == "__main__":
    main()
