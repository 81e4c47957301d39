"""One training step (forward + backward) on a single 1,048,576-token sequence in bounded memory.

    python benchmarks/bench_longseq.py [--length 1048576] [--chunk-len 32768]
                                       [--hf-lengths 4096 16384 65536] [--hf-cap-gib 12] [--quick]
    python benchmarks/bench_longseq.py --bound-only --length 131072 --models mamba mamba2

Model: a 2-layer Mamba CausalLM, d_model 256, byte vocabulary (256), d_state 16, expand 2, d_conv 4, tied
embeddings, RMSNorm, no MLP; float32, batch 1, random weights and tokens. ``--models mamba2`` adds the same
model with Mamba2 mixers (d_state 128, expand 2, headdim 64, chunk_size 64).

Bound (printed with every ssmkit run, in the same process): the step's FLOPs at the measured one-thread GEMM
rate plus its exps at the measured exp rate. FLOPs per token come from the model's shapes: 2·in·out per Linear
(projections and the tied head), the depthwise conv, and for Mamba2 the SSD products (2·Q·N·G + 2·Q·P·H + 4·N·P·H
per token, Q = chunk_size); exps per token: d_inner·d_state (Mamba's Δ·A), Q·H (Mamba2's segment sums). A chunked
step runs the forward twice (pass 1 and the recompute) and a backward of twice the forward's GEMM FLOPs, and the
scan's backward recomputes its exps: bound = tokens × (4·F / GEMM rate + 3·X / exp rate).

- ssmkit: ``ssmkit.train.chunked.chunked_loss_backward`` (exact gradient; state checkpoints at chunk
  boundaries and per-chunk recomputation) on the full length, in a fresh process: peak RSS, time, chunk_len.
  The same at the largest transformers length, for a same-length comparison.
- transformers: ``MambaForCausalLM`` with the same config (random weights), ``use_mambapy=True`` (its fastest
  CPU training path without mamba_ssm: mambapy's parallel scan; its default per-step Python loop is far slower
  still) in a fresh process per length under a hard address-space cap (``RLIMIT_AS``), since it keeps the whole
  sequence's activations. Peak RSS growth per token is measured from the two largest lengths that fit and
  extrapolated to the full length; lengths that exceed the cap are reported as failed (measured).

Writes benchmarks/results/bench_longseq.json. Timings are wall clock on a shared machine (the load average is
recorded); memory figures do not depend on the load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

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

D_MODEL, N_LAYERS, VOCAB, D_STATE, EXPAND, D_CONV = 256, 2, 256, 16, 2, 4
GIB, MIB = 1 << 30, 1 << 20
SCRIPT = Path(__file__).resolve()


# --------------------------------------------------------------------------------------------- children
def _tokens(length: int):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (1, length), generator=g)
    labels = torch.cat([x[:, 1:], torch.full((1, 1), -100)], 1)  # next-token targets, aligned
    return x, labels


MIXERS = {"mamba": {"d_state": D_STATE, "expand": EXPAND, "d_conv": D_CONV},
          "mamba2": {"d_state": 128, "expand": EXPAND, "d_conv": D_CONV, "headdim": 64, "chunk_size": 64}}


def per_token_cost(model) -> tuple[float, float]:
    """(forward FLOPs, exps) per token of ``model``, from its shapes (see the module docstring)."""
    from torch import nn

    from ssmkit.layers import Mamba, Mamba2

    flops = sum(2.0 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    exps = 0.0
    for m in model.modules():
        if isinstance(m, Mamba):
            flops += 2.0 * m.d_inner * m.d_conv
            exps += m.d_inner * m.d_state
        elif isinstance(m, Mamba2):
            q, n, g, h, p = m.chunk_size, m.d_state, m.ngroups, m.nheads, m.headdim
            flops += 2.0 * (m.d_inner + 2 * g * n) * m.d_conv + 2.0 * q * n * g + 2.0 * q * p * h + 4.0 * n * p * h
            exps += q * h
    return flops, exps


def machine_rates() -> dict:
    """One-thread GEMM FLOP/s (a (4096 x 256) @ (256 x 1024) float32 product, the shape of the input
    projection) and exp/s."""
    import torch

    a, b = torch.randn(4096, D_MODEL), torch.randn(D_MODEL, 4 * D_MODEL)
    out = torch.empty(4096, 4 * D_MODEL)
    t = best_time(lambda: torch.mm(a, b, out=out), repeat=5)
    return {"gemm_flops": 2.0 * a.shape[0] * a.shape[1] * b.shape[1] / t,
            "exp_per_s": machine_bounds(1 << 22)["exp_Gelem_per_s"] * 1e9}


def bound_seconds(model, length: int, rates: dict) -> float:
    flops, exps = per_token_cost(model)
    return length * (4 * flops / rates["gemm_flops"] + 3 * exps / rates["exp_per_s"])


def child_ssmkit(length: int, chunk_len: int, name: str = "mamba") -> dict:
    """Peak RSS and time of one chunked training step (ssmkit) on ``length`` tokens, and the bound measured in
    the same process."""
    import torch

    from ssmkit.models import CausalLM, ModelConfig
    from ssmkit.train.chunked import chunked_loss_backward

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=D_MODEL, n_layers=N_LAYERS, pattern=name, vocab_size=VOCAB,
                      mixer_options={name: MIXERS[name]})
    model = CausalLM(cfg)
    x, labels = _tokens(length)
    warm_x, warm_l = x[:, :256], labels[:, :256]  # numba kernels load/compile outside the measurement
    chunked_loss_backward(model, {"input_ids": warm_x, "labels": warm_l}, 128)
    model.zero_grad(set_to_none=True)
    base = current_rss_bytes()
    t0 = time.perf_counter()
    stats = chunked_loss_backward(model, {"input_ids": x, "labels": labels}, chunk_len)
    seconds = time.perf_counter() - t0
    grads_ok = all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    rates = machine_rates()
    flops, exps = per_token_cost(model)
    return {"model": name, "length": length, "chunk_len": chunk_len, "seconds": seconds,
            "bound_s": bound_seconds(model, length, rates), "rates": rates, "fwd_flops_per_token": flops,
            "exps_per_token": exps, "peak_rss": peak_rss_bytes(),
            "base_rss": base, "loss": stats["loss"], "tokens": stats["tokens"], "chunks": stats["chunks"],
            "state_bytes": stats["state_bytes"], "grads_finite": grads_ok,
            "params": model.num_parameters()}


def child_hf(length: int, cap_bytes: int) -> dict:
    """Peak RSS and time of one plain training step of transformers' MambaForCausalLM, under an
    address-space cap."""
    resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))
    import torch
    from transformers import MambaConfig, MambaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, state_size=D_STATE,
                      expand=EXPAND, conv_kernel=D_CONV, use_mambapy=True)
    model = MambaForCausalLM(cfg)
    x, labels = _tokens(length)
    model(x[:, :64], labels=labels[:, :64], use_cache=False).loss.backward()  # warm-up
    model.zero_grad(set_to_none=True)
    base = current_rss_bytes()
    t0 = time.perf_counter()
    # transformers shifts the labels itself: pass the inputs as labels for next-token prediction
    out = model(x, labels=x, use_cache=False)
    out.loss.backward()
    seconds = time.perf_counter() - t0
    return {"length": length, "seconds": seconds, "peak_rss": peak_rss_bytes(), "base_rss": base,
            "loss": float(out.loss.detach()), "params": sum(p.numel() for p in model.parameters())}


# --------------------------------------------------------------------------------------------- driver
def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, *args = sys.argv[2:]
        result = child_ssmkit(int(args[0]), int(args[1]), *args[2:]) if kind == "ssmkit" else child_hf(
            int(args[0]), int(args[1]))
        print(json.dumps(result))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=1 << 20)
    ap.add_argument("--chunk-len", type=int, default=32768)
    ap.add_argument("--hf-lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--hf-cap-gib", type=float, default=12.0,
                    help="RLIMIT_AS for each transformers child (the machine is shared: keep it well below "
                         "free RAM)")
    ap.add_argument("--rss-limit-gib", type=float, default=8.0, help="the bound ssmkit's step must stay under")
    ap.add_argument("--quick", action="store_true", help="small lengths (a smoke test of this script)")
    ap.add_argument("--models", nargs="+", default=["mamba"], choices=sorted(MIXERS))
    ap.add_argument("--bound-only", action="store_true",
                    help="only ssmkit's chunked step at --length per model, against its bound (no transformers)")
    a = ap.parse_args()
    if a.bound_only:
        rows = []
        for name in a.models:
            r = run_child(SCRIPT, "ssmkit", str(a.length), str(min(a.chunk_len, a.length)), name, timeout=3600)
            if "error" in r:
                print(f"{name}: FAILED: {r['error']}")
                continue
            rows.append({"model": name, "length": a.length, "chunk_len": r["chunk_len"], "time_s": r["seconds"],
                         "bound_s": r["bound_s"], "ratio": r["seconds"] / r["bound_s"],
                         "MFLOP/token": 4 * r["fwd_flops_per_token"] / 1e6, "exps/token": 3 * r["exps_per_token"],
                         "GFLOP/s": r["rates"]["gemm_flops"] / 1e9, "Gexp/s": r["rates"]["exp_per_s"] / 1e9})
        print_table(rows, list(rows[0]) if rows else ["model"])
        write_json("bench_longseq_bound", {"table": rows, "loadavg": os.getloadavg()})
        return
    if a.quick:
        a.length, a.chunk_len, a.hf_lengths = 8192, 2048, [512, 1024]
    load_start = os.getloadavg()
    t_start = time.perf_counter()

    # transformers, growing lengths under the cap; stop after the first failure
    cap = int(a.hf_cap_gib * GIB)
    hf: list[dict] = []
    for n in sorted(a.hf_lengths):
        r = run_child(SCRIPT, "hf", str(n), str(cap), timeout=1200)
        r.setdefault("length", n)
        hf.append(r)
        print(f"transformers L={n}: " + (f"{r['seconds']:.1f}s, peak RSS {r['peak_rss'] / GIB:.2f} GiB"
                                          if "error" not in r else f"FAILED: {r['error']}"), flush=True)
        if "error" in r:
            break
    ok = [r for r in hf if "error" not in r]

    # ssmkit: the same length as the largest transformers run that fit (comparison), then the full length
    runs: list[dict] = []
    if ok:
        n = ok[-1]["length"]
        runs.append(run_child(SCRIPT, "ssmkit", str(n), str(min(a.chunk_len, n)), timeout=1800))
        runs[-1].setdefault("length", n)
    runs.append(run_child(SCRIPT, "ssmkit", str(a.length), str(a.chunk_len), timeout=3600))
    runs[-1].setdefault("length", a.length)
    for r in runs:
        print(f"ssmkit chunked L={r['length']}: " + (
            f"{r['seconds']:.1f}s (bound {r['bound_s']:.1f}s, {r['seconds'] / r['bound_s']:.2f}x), "
            f"peak RSS {r['peak_rss'] / GIB:.2f} GiB" if "error" not in r
            else f"FAILED: {r['error']}"), flush=True)

    # extrapolate transformers' peak RSS to the full length from its per-token growth
    extrap = None
    if len(ok) >= 2:
        lo, hi = ok[-2], ok[-1]
        per_token = (hi["peak_rss"] - lo["peak_rss"]) / (hi["length"] - lo["length"])
        s_per_token = (hi["seconds"] - lo["seconds"]) / (hi["length"] - lo["length"])
        if s_per_token <= 0:  # timing noise on a shared machine: fall back to proportional scaling
            s_per_token = hi["seconds"] / hi["length"]
        extrap = {"from_lengths": [lo["length"], hi["length"]], "bytes_per_token": per_token,
                  "peak_rss_at_length": hi["peak_rss"] + per_token * (a.length - hi["length"]),
                  "length": a.length,
                  "seconds_per_token": s_per_token,
                  "seconds_at_length": hi["seconds"] + s_per_token * (a.length - hi["length"])}

    rows = []
    for r in hf:
        rows.append({"impl": "transformers (mambapy)", "length": r["length"], "chunk_len": "-",
                     "time_s": r.get("seconds"), "tok_per_s": _tps(r),
                     "peak_rss_GiB": _gib(r.get("peak_rss")), "extra_rss_GiB": _extra(r),
                     "note": "measured" if "error" not in r else f"FAILED under {a.hf_cap_gib:g} GiB cap: "
                                                                  f"{r['error'][:60]}"})
    if extrap:
        rows.append({"impl": "transformers (mambapy)", "length": a.length, "chunk_len": "-",
                     "time_s": extrap["seconds_at_length"], "tok_per_s": None,
                     "peak_rss_GiB": extrap["peak_rss_at_length"] / GIB, "extra_rss_GiB": None,
                     "note": f"EXTRAPOLATED from L={extrap['from_lengths']} "
                             f"({extrap['bytes_per_token'] / 1024:.0f} KiB/token; time by its per-token slope)"})
    for r in runs:
        within = "error" not in r and r["peak_rss"] < a.rss_limit_gib * GIB
        rows.append({"impl": "ssmkit chunked", "length": r["length"], "chunk_len": r.get("chunk_len"),
                     "time_s": r.get("seconds"), "tok_per_s": _tps(r), "peak_rss_GiB": _gib(r.get("peak_rss")),
                     "extra_rss_GiB": _extra(r),
                     "note": f"measured; {'under' if within else 'NOT under'} {a.rss_limit_gib:g} GiB"
                     if "error" not in r else f"FAILED: {r['error'][:60]}"})
    print()
    print_table(rows, ["impl", "length", "chunk_len", "time_s", "tok_per_s", "peak_rss_GiB", "extra_rss_GiB",
                       "note"])
    payload = {
        "model": {"d_model": D_MODEL, "n_layers": N_LAYERS, "vocab_size": VOCAB, "d_state": D_STATE,
                  "expand": EXPAND, "d_conv": D_CONV, "dtype": "float32", "batch": 1},
        "length": a.length, "chunk_len": a.chunk_len, "hf_cap_bytes": cap,
        "ssmkit": runs, "transformers": hf, "transformers_extrapolated": extrap, "table": rows,
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "total_seconds": time.perf_counter() - t_start,
    }
    path = write_json("bench_longseq" + ("_quick" if a.quick else ""), payload)
    print(f"\nwrote {path} (total {payload['total_seconds']:.0f}s, load average {load_start[0]:.1f} -> "
          f"{payload['loadavg_end'][0]:.1f})")


def _gib(v: float | None) -> float | None:
    return None if v is None else v / GIB


def _extra(r: dict) -> float | None:
    return None if "error" in r else (r["peak_rss"] - r["base_rss"]) / GIB


def _tps(r: dict) -> float | None:
    return None if "error" in r else r["length"] / r["seconds"]


if __name__ == "__main__":
    main()
