"""Speed and memory of the ops against peers, in one process (ratios), plus peak memory in child processes.

    python benchmarks/bench_ops.py [--lengths 4096 16384] [--quick] [--no-memory] [--max-gib 4]

Cases:
- selective scan, batch 1, dim 1536, N 16: ssmkit (fused numba kernel) vs mambapy's pscan selective scan and
  transformers' `mamba_selective_scan` sequential fallback (the MambaMixer slow path's scan), forward and
  forward+backward; peak extra RSS of forward+backward in a fresh process;
- SSD, batch 1, heads 24, head_dim 64, N 128, L 4096: ssmkit `ssd` vs transformers' `Mamba2Mixer (torch chunked path)`
  (its chunked algorithm; the mixer also does its projections, conv and norm, reported separately);
- this machine's bounds measured in the same run: copy bandwidth and exp throughput, and the fraction of the
  bound the fused scan reaches.
Peers that materialise (length, dim, N) tensors need GiBs at long lengths (mambapy's forward+backward about 14 GiB
at L=16384): a peer whose estimated peak (see PEAK_UNITS) exceeds --max-gib (default 4) is skipped at that length,
with a printed line saying so before anything runs; --max-gib 16 runs every case.
Writes benchmarks/results/bench_ops.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    best_time,
    current_rss_bytes,
    machine_bounds,
    peak_rss_bytes,
    print_table,
    run_child,
    write_json,
)

DIM, N = 1536, 16
DEFAULT_MAX_GIB = 4.0
#: peak extra memory of one call, in units of one (length, DIM, N) float32 tensor (batch 1). Measured at L = 1024
#: and 2048 on this project's machine (mambapy: forward 5.6, forward+backward 8.5-9.1; transformers' loop:
#: forward 5.0-5.8; ssmkit: 0.28, its fused kernel keeps O(L * DIM) plus state checkpoints every 32 steps) and
#: rounded up. transformers' backward is never run (see bench_scan).
PEAK_UNITS = {"ssmkit": {"fwd": 0.5, "fwd_bwd": 0.5}, "mambapy": {"fwd": 6.0, "fwd_bwd": 9.5},
              "transformers": {"fwd": 6.5}}


def estimated_peak_gib(impl: str, length: int) -> float:
    """Estimated peak extra memory (GiB) of the costliest pass ``impl`` runs at ``length``."""
    unit = length * DIM * N * 4
    return max(PEAK_UNITS[impl].values()) * unit / 2**30


def plan_scan(lengths: list[int], max_gib: float) -> dict[tuple[str, int], str]:
    """(impl, length) -> why it is skipped, for every case whose estimated peak exceeds ``max_gib``."""
    skipped = {}
    for length in lengths:
        for impl in IMPLS:
            est = estimated_peak_gib(impl, length)
            if est > max_gib:
                skipped[(impl, length)] = (f"skipped: needs about {est:.1f} GiB > --max-gib {max_gib:g} "
                                           f"(pass --max-gib {int(est) + 1} to run it)")
    return skipped


def scan_inputs(length: int, requires_grad: bool = False, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = {
        "u": torch.randn(1, length, DIM, generator=g),
        "delta": torch.nn.functional.softplus(torch.randn(1, length, DIM, generator=g) - 3),
        "A": -torch.exp(torch.randn(DIM, N, generator=g) * 0.5),
        "B": torch.randn(1, length, N, generator=g),
        "C": torch.randn(1, length, N, generator=g),
        "D": torch.randn(DIM, generator=g),
    }
    for v in t.values():
        v.requires_grad_(requires_grad)
    return t


def ssmkit_scan(t: dict) -> torch.Tensor:
    from ssmkit.ops import selective_scan

    return selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"])


def mambapy_scan(t: dict) -> torch.Tensor:
    from mambapy.mamba import MambaBlock

    return MambaBlock.selective_scan(None, t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"])


def transformers_scan(t: dict) -> torch.Tensor:
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan

    out = mamba_selective_scan(t["u"].transpose(1, 2), t["delta"].transpose(1, 2), t["A"],
                               t["B"].transpose(1, 2), t["C"].transpose(1, 2), t["D"])
    return out[0] if isinstance(out, tuple) else out


IMPLS = {"ssmkit": ssmkit_scan, "mambapy": mambapy_scan, "transformers": transformers_scan}


def fwd_bwd(fn, t: dict) -> None:
    y = fn(t)
    y.sum().backward()
    for v in t.values():
        v.grad = None


def child(impl: str, length: int) -> None:
    """Peak extra RSS of one forward+backward, measured in this fresh process."""
    t = scan_inputs(length, requires_grad=True)
    fn = IMPLS[impl]
    if impl == "ssmkit":  # compile the kernels on a tiny input first so JIT memory is not counted
        fwd_bwd(fn, scan_inputs(64, requires_grad=True))
    base = current_rss_bytes()
    fwd_bwd(fn, t)
    print(json.dumps({"impl": impl, "length": length, "peak_extra_bytes": peak_rss_bytes() - base}))


def bench_scan(lengths: list[int], quick: bool, memory: bool, skipped: dict[tuple[str, int], str]) -> list[dict]:
    rows = []
    for length in lengths:
        t = scan_inputs(length)
        tg = scan_inputs(length, requires_grad=True)
        base = {}
        for impl, fn in IMPLS.items():
            row = {"case": f"selective_scan L={length}", "impl": impl}
            if (impl, length) in skipped:
                rows.append({**row, "note": skipped[(impl, length)]})
                continue
            heavy = impl == "transformers"
            with torch.no_grad():
                row["fwd_s"] = best_time(lambda fn=fn, t=t: fn(t), repeat=1 if heavy or quick else 3,
                                         warmup=0 if heavy else 1)
            if not heavy:  # transformers' loop: its backward grows much faster than L (>30 min at L=2048 here)
                row["fwd_bwd_s"] = best_time(lambda fn=fn, tg=tg: fwd_bwd(fn, tg), repeat=1 if heavy or quick else 3,
                                             warmup=0 if heavy else 1)
            if memory and not heavy:
                res = run_child(Path(__file__), impl, str(length))
                row["peak_extra_GiB"] = (res["peak_extra_bytes"] / 2**30) if "peak_extra_bytes" in res else None
                if "error" in res:
                    row["note"] = res["error"][:60]
            rows.append(row)
            if impl == "ssmkit":
                base = row
        for row in rows[-len(IMPLS):]:
            if row["impl"] != "ssmkit" and "fwd_s" in row and "fwd_s" in base:
                row["fwd_speedup_of_ssmkit"] = row["fwd_s"] / base["fwd_s"]
                if "fwd_bwd_s" in row and "fwd_bwd_s" in base:
                    row["fwd_bwd_speedup_of_ssmkit"] = row["fwd_bwd_s"] / base["fwd_bwd_s"]
    return rows


def bench_ssd(length: int, quick: bool) -> list[dict]:
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    from ssmkit.ops import ssd

    heads, head_dim, n = 24, 64, 128
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, length, heads, head_dim, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(1, length, heads, generator=g) - 3)
    A = -torch.rand(heads, generator=g) * 4
    B = torch.randn(1, length, 1, n, generator=g)
    C = torch.randn(1, length, 1, n, generator=g)
    rows = []
    cfg = Mamba2Config(hidden_size=heads * head_dim // 2, expand=2, num_heads=heads, head_dim=head_dim,
                       state_size=n, n_groups=1, chunk_size=256, num_hidden_layers=1)
    mixer = Mamba2Mixer(cfg, layer_idx=0).eval()
    hidden = torch.randn(1, length, cfg.hidden_size, generator=g)
    rep = 1 if quick else 3
    with torch.no_grad():
        t_ours = best_time(lambda: ssd(x, dt, A, B, C, chunk_size=64), repeat=rep)
        t_mixer = best_time(lambda: mixer(hidden), repeat=rep)
    leaves = [v.clone().requires_grad_() for v in (x, dt, A, B, C)]

    def ours_fb():
        ssd(*leaves, chunk_size=64).sum().backward()

    hg = hidden.clone().requires_grad_()

    def mixer_fb():
        mixer(hg).sum().backward()

    t_ours_fb = best_time(ours_fb, repeat=rep)
    t_mixer_fb = best_time(mixer_fb, repeat=rep)
    rows.append({"case": f"ssd L={length}", "impl": "ssmkit ssd op", "fwd_s": t_ours, "fwd_bwd_s": t_ours_fb})
    rows.append({"case": f"ssd L={length}", "impl": "transformers Mamba2Mixer (torch chunked path) (whole mixer)",
                 "fwd_s": t_mixer, "fwd_bwd_s": t_mixer_fb, "fwd_speedup_of_ssmkit": t_mixer / t_ours,
                 "fwd_bwd_speedup_of_ssmkit": t_mixer_fb / t_ours_fb})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384])
    parser.add_argument("--ssd-length", type=int, default=4096)
    parser.add_argument("--quick", action="store_true", help="one repeat per case")
    parser.add_argument("--no-memory", action="store_true", help="skip the child-process peak-memory runs")
    parser.add_argument("--max-gib", type=float, default=DEFAULT_MAX_GIB,
                        help="skip a selective-scan case whose estimated peak extra memory exceeds this many GiB "
                             f"(default {DEFAULT_MAX_GIB:g}; mambapy at L=16384 needs about 14)")
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    bad = [n for n in args.lengths if n < 1]
    if bad:
        parser.error(f"--lengths: expected positive integers, got {bad}")
    if not args.max_gib > 0:
        parser.error(f"--max-gib: expected a positive number of GiB, got {args.max_gib:g}")
    skipped = plan_scan(args.lengths, args.max_gib)
    for (impl, length), why in skipped.items():
        print(f"selective_scan L={length} {impl}: {why}", flush=True)
    torch.manual_seed(0)
    bounds = machine_bounds()
    rows = bench_scan(args.lengths, args.quick, not args.no_memory, skipped)
    for row in rows:
        if row["impl"] == "ssmkit" and "L=" in row["case"]:
            length = int(row["case"].split("L=")[1])
            exp_bound = length * DIM * N / (bounds["exp_Gelem_per_s"] * 1e9)
            mem_bound = 4 * length * DIM * 3 / (bounds["copy_GBps"] * 1e9)
            row["bound_s"] = max(exp_bound, mem_bound)
            row["fraction_of_bound"] = row["bound_s"] / row["fwd_s"]
    try:
        rows += bench_ssd(args.ssd_length, args.quick)
    except Exception as e:  # report the scan results even if the peer's API moved
        rows.append({"case": f"ssd L={args.ssd_length}", "impl": "-", "note": f"failed: {e}"[:80]})
    cols = ["case", "impl", "fwd_s", "fwd_bwd_s", "fwd_speedup_of_ssmkit", "fwd_bwd_speedup_of_ssmkit",
            "peak_extra_GiB", "bound_s", "fraction_of_bound", "note"]
    print(f"machine: copy {bounds['copy_GBps']:.1f} GB/s, torch.exp {bounds['exp_Gelem_per_s']:.2f} Gelem/s, "
          f"{bounds['threads']} threads")
    print_table(rows, cols)
    path = write_json("bench_ops", {"bounds": bounds, "max_gib": args.max_gib, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
