"""``ssmkit bench``: benchmarks/bench_ops.py --quick, or a small built-in timing in an installed package."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def register(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser("bench", help="time the ops", formatter_class=fmt, description=(
        "Run benchmarks/bench_ops.py --quick (speed and memory against peers), or a small built-in timing\n"
        "when the benchmarks directory is not available (installed package)."))
    p.add_argument("--full", action="store_true", help="run bench_ops.py without --quick")
    p.add_argument("--builtin", action="store_true", help="run the small built-in timing")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="further arguments for bench_ops.py")
    p.set_defaults(func=run)


def _bench_script() -> Path | None:
    here = Path(__file__).resolve()
    for root in (Path.cwd(), *here.parents):
        cand = root / "benchmarks" / "bench_ops.py"
        if cand.is_file():
            return cand
    return None


def _builtin_bench() -> None:
    import torch

    from ..models import CausalLM, ModelConfig
    from ..ops import selective_scan

    def timed(fn, repeat: int = 3) -> float:
        fn()
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    g = torch.Generator().manual_seed(0)
    b, length, d, n = 1, 2048, 256, 16
    u, dt = torch.randn(b, length, d, generator=g), torch.randn(b, length, d, generator=g)
    a = -torch.rand(d, n, generator=g) - 0.5
    bm, cm = torch.randn(b, length, n, generator=g), torch.randn(b, length, n, generator=g)
    s = timed(lambda: selective_scan(u, dt, a, bm, cm, delta_softplus=True))
    print(f"selective_scan forward  (batch 1, length {length}, dim {d}, N {n}): {s * 1e3:8.2f} ms, "
          f"{length / s:,.0f} positions/s")
    model = CausalLM(ModelConfig(d_model=128, pattern="mamba*2", vocab_size=256)).eval()
    ids = torch.randint(0, 256, (4, 256), generator=g)
    with torch.no_grad():
        s = timed(lambda: model(ids))
    print(f"Mamba LM forward        (2 layers, d_model 128, 4 x 256 tokens):   {s * 1e3:8.2f} ms, "
          f"{ids.numel() / s:,.0f} tokens/s")
    state = model.init_state(4)
    tok = ids[:, 0]
    with torch.no_grad():
        s = timed(lambda: model.step(tok, state), repeat=20)
    print(f"Mamba LM recurrent step (batch 4):                                 {s * 1e3:8.3f} ms/token")
    print(f"(torch threads: {torch.get_num_threads()}; training uses train.threads, 1 by default)")


def run(args: argparse.Namespace) -> int:
    script = None if args.builtin else _bench_script()
    if script is None:
        print("running the built-in timing (benchmarks/bench_ops.py not found)" if not args.builtin else
              "running the built-in timing")
        _builtin_bench()
        return 0
    cmd = [sys.executable, str(script), *(["--quick"] if not args.full else []), *args.extra]
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)
