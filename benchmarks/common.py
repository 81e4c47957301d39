"""Shared helpers for the benchmarks: best-of-n timing, peak-RSS measurement in a child process, machine bounds.

Benchmarks report ratios against baselines run in the same process (timings on shared 2-core machines are
noisy; ratios much less so) and write JSON next to a printed table.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def best_time(fn: Callable[[], object], *, repeat: int = 3, warmup: int = 1, budget_s: float = 60.0) -> float:
    """Best wall time over ``repeat`` calls after ``warmup`` calls; stops early once ``budget_s`` is spent."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return min(times)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's memory (Linux: VmHWM of /proc/self/status, which starts afresh
    at exec; ``getrusage``'s ru_maxrss does not: a child started from a big parent inherits the parent's RSS at
    fork time as its "peak")."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_child(script: Path, *args: str, timeout: float = 1800.0) -> dict:
    """Run ``script --child args...`` in a fresh interpreter; it prints one JSON line last."""
    proc = subprocess.run([sys.executable, str(script), "--child", *args], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_bounds(n_elems: int = 1 << 25) -> dict:
    """Measure this machine's copy bandwidth (GB/s, read+write bytes) and torch.exp throughput (Gelem/s)."""
    src = torch.rand(n_elems)
    dst = torch.empty_like(src)
    t_copy = best_time(lambda: dst.copy_(src), repeat=5)
    small = torch.rand(1 << 16)  # cache-resident, so this measures the exp units, not memory
    out = torch.empty_like(small)
    reps = 200

    def exps():
        for _ in range(reps):
            torch.exp(small, out=out)

    t_exp = best_time(exps, repeat=5)
    return {
        "copy_GBps": 2 * src.numel() * 4 / t_copy / 1e9,
        "exp_Gelem_per_s": reps * small.numel() / t_exp / 1e9,
        "threads": torch.get_num_threads(),
    }


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"environment": environment(), **payload}
    path.write_text(json.dumps(payload, indent=2))
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths, strict=True)))


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
