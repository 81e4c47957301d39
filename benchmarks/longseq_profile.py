"""CPU time per op of a training step, each beside its own bound (used by ``bench_longseq.py --profile``).

    with OpProfiler() as prof:
        step()
    rows = prof.table(rates, copy_bytes_per_s)

Every aten op (forward and backward) is timed by process CPU time through a ``TorchDispatchMode``, and ssmkit's
numba kernels (selective scan, SSD's chunk-state pass, short conv + SiLU) by wrapping them. Bounds per op: GEMMs (mm,
addmm, bmm, baddbmm) their FLOPs from the operand shapes at the GEMM rate; the selective-scan kernels their exps at
the exp rate plus their other arithmetic (6 FLOPs per (channel, state) element forward, 21 backward, see
bench_longseq.py) at the GEMM rate; the short conv and the SSD state pass their multiply-adds at the GEMM rate
(a bandwidth-bound sweep, so that bound is loose); every other op the bytes it reads and writes at the
measured copy bandwidth. Timing through the mode adds a few microseconds per op call.
"""

from __future__ import annotations

import collections
import functools
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GEMMS = {"mm", "addmm", "bmm", "baddbmm"}


def _gemm_flops(name: str, args) -> float:
    a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
    return 2.0 * a.numel() * b.shape[-1]


def _bytes(name: str, args, out) -> float:
    """Bytes read and written by a non-GEMM op; 0 for views (an out-of-place op whose output shares an input's
    storage); in-place ops (``add_``, ``copy_``) count their inputs and the written output."""
    ins = [t for t in args if isinstance(t, torch.Tensor)]
    outs = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
    ptrs = {t.untyped_storage().data_ptr() for t in ins}
    if not name.endswith("_") and outs and all(t.untyped_storage().data_ptr() in ptrs for t in outs):
        return 0.0
    return float(sum(t.numel() * t.element_size() for t in (*ins, *outs)))


class OpProfiler(TorchDispatchMode):
    """Accumulates CPU seconds, calls, GEMM FLOPs and bytes moved per op name (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.sec: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()
        self.flops: dict[str, float] = collections.defaultdict(float)
        self.bytes: dict[str, float] = collections.defaultdict(float)
        self.work: dict[str, tuple[float, float]] = collections.defaultdict(lambda: (0.0, 0.0))  # (flops, exps)
        self._undo: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.process_time()
        out = func(*args, **(kwargs or {}))
        dt = time.process_time() - t0
        name = str(func.overloadpacket.__name__)
        self.sec[name] += dt
        self.calls[name] += 1
        if name in GEMMS:
            self.flops[name] += _gemm_flops(name, args)
        else:
            self.bytes[name] += _bytes(name, args, out)
        return out

    def _wrap(self, module, attr: str, label: str, cost) -> None:
        fn = getattr(module, attr)

        @functools.wraps(fn)
        def timed(*args):
            t0 = time.process_time()
            try:
                return fn(*args)
            finally:
                self.sec[label] += time.process_time() - t0
                self.calls[label] += 1
                f, x = self.work[label]
                df, dx = cost(args)
                self.work[label] = (f + df, x + dx)

        setattr(module, attr, timed)
        self._undo.append((module, attr, fn))

    def __enter__(self):
        import ssmkit.ops._numba_kernels as kern
        import ssmkit.ops._numba_short_conv as sc
        import ssmkit.ops._ssd_state as ssd_state

        def scan(per_elem: float):
            # u (B, L, D) and At (N, D) are the first and third arguments of both kernels
            return lambda a: (per_elem * a[0].size * a[2].shape[0], 1.0 * a[0].size * a[2].shape[0])

        self._wrap(kern, "selective_fwd", "numba: selective scan fwd", scan(6.0))
        self._wrap(kern, "selective_bwd", "numba: selective scan bwd", scan(21.0))
        # short conv (+ SiLU): x read in place, wt (W, C) the 6th argument, out / g (B, L, C) the 11th
        conv = (lambda a: (2.0 * a[10].size * a[5].shape[0], float(a[10].size) if a[9] else 0.0))  # noqa: E731
        # SSD's chunk-state sweep: one fma per element forward, two and a product backward (S (b, c, G, N, R, P))
        self._wrap(ssd_state, "ssd_state_fwd", "numba: ssd state pass fwd", (lambda a: (2.0 * a[0].size, 0.0)))
        self._wrap(ssd_state, "ssd_state_bwd", "numba: ssd state pass bwd", (lambda a: (4.0 * a[1].size, 0.0)))
        self._wrap(sc, "conv_fwd", "numba: short conv fwd", conv)
        self._wrap(sc, "conv_bwd", "numba: short conv bwd", (lambda a: (2 * conv(a)[0], conv(a)[1])))
        return super().__enter__()

    def __exit__(self, *exc):
        for module, attr, fn in reversed(self._undo):
            setattr(module, attr, fn)
        return super().__exit__(*exc)

    def table(self, rates: dict, copy_bytes_per_s: float, top: int = 25) -> list[dict]:
        """Rows (op, calls, cpu_s, bound_s, ratio, bound basis), largest CPU time first; the rest summed."""
        rows = []
        for name, sec in self.sec.items():
            if name in self.work:
                f, x = self.work[name]
                bound = f / rates["gemm_flops"] + x / rates["exp_per_s"]
                basis = "exps + FLOPs" if x else "FLOPs"
            elif name in GEMMS:
                bound, basis = self.flops[name] / rates["gemm_flops"], "GEMM FLOPs"
            elif self.bytes[name] > 0:
                bound, basis = self.bytes[name] / copy_bytes_per_s, "bytes at copy rate"
            else:
                bound, basis = 0.0, "view (no data)"
            rows.append({"op": name, "calls": self.calls[name], "cpu_s": sec, "bound_s": bound,
                         "ratio": sec / bound if bound > 0 else None, "bound of": basis})
        rows.sort(key=lambda r: -r["cpu_s"])
        rest = rows[top:]
        rows = rows[:top]
        if rest:
            rows.append({"op": f"({len(rest)} other ops)", "calls": sum(r["calls"] for r in rest),
                         "cpu_s": sum(r["cpu_s"] for r in rest), "bound_s": sum(r["bound_s"] for r in rest),
                         "ratio": None, "bound of": "mixed"})
        rows.append({"op": "TOTAL (ops)", "calls": sum(r["calls"] for r in rows),
                     "cpu_s": sum(r["cpu_s"] for r in rows), "bound_s": sum(r["bound_s"] for r in rows),
                     "ratio": None, "bound of": ""})
        return rows
