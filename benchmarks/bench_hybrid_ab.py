"""A/B of two versions of the hybrid decode kernel (ops/_numba_decode_hybrid.py) against transformers, in one
process: decode steps after a prefilled prompt, CPU time, interleaved (old, new, transformers, old, ...).

    git show <commit>:src/ssmkit/ops/_numba_decode_hybrid.py > /tmp/old_hybrid.py
    python benchmarks/bench_hybrid_ab.py /tmp/old_hybrid.py [--context 2048] [--steps 16] [--batches 1,8]
        [--family nemotron_h|bamba] [--repeat 4]

The old file is loaded as a module of ``ssmkit.ops`` (its relative imports resolve there) and swapped in for
``generate``'s step (``infer.fused_hybrid.decode_step``) while its runs are timed; one thread (torch and numba).
Prints ms per step (best of ``repeat``) and the ratios; the logits of the new kernel are compared with
transformers'. A file from before per-block residual multipliers (commit c3a24f3) reads ``mult = res_mult``:
change it to ``mult = res_mult[layer]`` (the plan now passes one per block).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import time
import warnings
from pathlib import Path

import numba as nb
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hybrid import build, ids  # noqa: E402


def load_old(path: str):
    spec = importlib.util.spec_from_file_location("ssmkit.ops._ab_old_hybrid", path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "ssmkit.ops"
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@torch.no_grad()
def ab_batch(hf, ours, old, batch: int, args) -> str:
    """One batch size: the three paths interleaved, best of ``args.repeat`` CPU times; a printable line."""
    import ssmkit.ops as ops_pkg
    import ssmkit.ops._numba_decode_hybrid as new
    from ssmkit.infer.fused_hybrid import decode_step

    x = ids(batch, args.context + args.steps, seed=batch)
    prompt, nxt = x[:, :args.context], x[:, args.context:]
    state0 = ours(prompt, return_final_state=True).state
    cache0 = hf(prompt, use_cache=True, logits_to_keep=1).cache

    def run(mod):
        ops_pkg._numba_decode_hybrid = mod
        try:
            state = state0
            c0 = time.process_time()
            for t in range(args.steps):
                logits, state = decode_step(ours, nxt[:, t], state)
            return time.process_time() - c0, logits
        finally:
            ops_pkg._numba_decode_hybrid = new

    def run_hf():
        cache = copy.deepcopy(cache0)
        c0 = time.process_time()
        for t in range(args.steps):
            out = hf(nxt[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache
        return time.process_time() - c0, out.logits[:, -1]

    runs = {"old": lambda: run(old), "new": lambda: run(new), "hf": run_hf}
    for fn in runs.values():
        fn()
    best, logits = {k: float("inf") for k in runs}, {}
    for _ in range(args.repeat):
        for k, fn in runs.items():
            t, logits[k] = fn()
            best[k] = min(best[k], t)
    err = float((logits["new"] - logits["hf"]).abs().max() / logits["hf"].abs().max())
    o, n, h = (best[k] / args.steps * 1e3 for k in ("old", "new", "hf"))
    return (f"{args.family} b{batch} @{args.context}: old {o:.2f}  new {n:.2f}  transformers {h:.2f} ms/step | "
            f"transformers/old {h / o:.2f}x  transformers/new {h / n:.2f}x  old/new {o / n:.2f}x  "
            f"logits rel err {err:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", help="path of the old _numba_decode_hybrid.py")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--family", choices=["nemotron_h", "bamba"], default="nemotron_h")
    args = parser.parse_args()
    if min(args.context, args.steps, args.repeat) < 1:
        parser.error("--context, --steps and --repeat must be >= 1")
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    nb.set_num_threads(1)
    old = load_old(args.old)
    hf, ours = build("M-M-*-M-", args.family)
    for batch in (int(b) for b in args.batches.split(",")):
        print(ab_batch(hf, ours, old, batch, args), flush=True)


if __name__ == "__main__":
    main()
