"""Speed and memory of the ops against peers, in one process (ratios), plus peak memory in child processes.

    python benchmarks/bench_ops.py [--lengths 4096 16384] [--quick] [--no-memory]

Cases:
- selective scan, batch 1, dim 1536, N 16: ssmkit (fused numba kernel) vs mambapy's pscan selective scan and
  transformers' `mamba_selective_scan` sequential fallback (the MambaMixer slow path's scan), forward and
  forward+backward; peak extra RSS of forward+backward in a fresh process;
- SSD, batch 1, heads 24, head_dim 64, N 128, L 4096: ssmkit `ssd` vs transformers' `Mamba2Mixer (torch chunked path)`
  (its chunked algorithm; the mixer also does its projections, conv and norm, reported separately);
- this machine's bounds measured in the same run: copy bandwidth and exp throughput, and the fraction of the
  bound the fused scan reaches.
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


def bench_scan(lengths: list[int], quick: bool, memory: bool) -> list[dict]:
    rows = []
    for length in lengths:
        t = scan_inputs(length)
        tg = scan_inputs(length, requires_grad=True)
        base = {}
        for impl, fn in IMPLS.items():
            row = {"case": f"selective_scan L={length}", "impl": impl}
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
            if row["impl"] != "ssmkit":
                row["fwd_speedup_of_ssmkit"] = row["fwd_s"] / base["fwd_s"]
                if "fwd_bwd_s" in row:
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
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    torch.manual_seed(0)
    bounds = machine_bounds()
    rows = bench_scan(args.lengths, args.quick, not args.no_memory)
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
    path = write_json("bench_ops", {"bounds": bounds, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
