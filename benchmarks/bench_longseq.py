"""One training step (forward + backward) on a single 1,048,576-token sequence in bounded memory.

    python benchmarks/bench_longseq.py [--length 1048576] [--chunk-len 32768]
                                       [--hf-lengths 4096 16384 65536] [--hf-cap-gib 12] [--quick]
    python benchmarks/bench_longseq.py --bound-only --length 131072 --models mamba mamba2 [--resident-heap]

Model: a 2-layer Mamba CausalLM, d_model 256, byte vocabulary (256), d_state 16, expand 2, d_conv 4, tied
embeddings, RMSNorm, no MLP; float32, batch 1, random weights and tokens. ``--models mamba2`` adds the same
model with Mamba2 mixers (d_state 128, expand 2, headdim 64, chunk_size 64).

Bound (printed with every ssmkit run, in the same process): the step's FLOPs at the measured one-thread GEMM
rate plus its exps at the measured exp rate, both measured by CPU time (so a loaded machine slows them as little as
it slows the step's own CPU time). The step is counted as it must run: pass 1 runs the backbone (not the head) on
every chunk but the last, pass 2 the whole model on every chunk, and the backward twice pass 2's GEMM FLOPs.
FLOPs per token from the model's shapes: 2·in·out per Linear (projections and the tied head), the depthwise conv,
for Mamba the scan's arithmetic besides its exps (6 FLOPs per (channel, state) forward, 21 backward), for Mamba2
the SSD products (2·Q·N·G + 2·Q·P·H + 4·N·P·H per token, Q = chunk_size). Exps per token: Mamba's exp(Δ·A)
(d_inner·d_state, recomputed once by the backward), Mamba2's segment sums (Q·H, saved for the backward), and every
layer's SiLU/softplus (sigmoid again in the backward) and the head's softmax (2·vocab: forward and backward).
``--profile`` prints the same step's CPU time per op beside each op's own bound.

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
    current_rss_bytes,
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


def per_token_cost(model) -> dict:
    """Per-token costs of ``model`` from its shapes (see the module docstring): FLOPs of the backbone's forward
    (``backbone``, GEMMs and conv), the head's (``head``), the scan's extra forward/backward arithmetic
    (``scan_fwd``/``scan_bwd``), the backbone's exps in the forward and backward (``exps_fwd``/``exps_bwd``) and
    the head's per pass (``head_exps``)."""
    from torch import nn

    from ssmkit.layers import Mamba, Mamba2

    head = getattr(model, "lm_head", None)
    lin = {m: 2.0 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear)}
    c = {"head": lin.pop(head, 0.0), "backbone": sum(lin.values()), "scan_fwd": 0.0, "scan_bwd": 0.0,
         "exps_fwd": 0.0, "exps_bwd": 0.0, "head_exps": float(VOCAB)}  # the loss's softmax, forward and backward
    for m in model.modules():
        if isinstance(m, Mamba):
            d, n = m.d_inner, m.d_state
            c["backbone"] += 2.0 * d * m.d_conv
            c["scan_fwd"] += 6.0 * d * n
            c["scan_bwd"] += 21.0 * d * n
            c["exps_fwd"] += d * n + 4.0 * d  # decays; silu of conv out and gate; softplus (exp and log)
            c["exps_bwd"] += d * n + 3.0 * d
        elif isinstance(m, Mamba2):
            q, n, g, h, p = m.chunk_size, m.d_state, m.ngroups, m.nheads, m.headdim
            c["backbone"] += 2.0 * m.conv_dim * m.d_conv + 2.0 * q * n * g + 2.0 * q * p * h + 4.0 * n * p * h
            c["exps_fwd"] += q * h + m.conv_dim + m.d_inner + 2.0 * h  # segment sums; silu of xBC and gate; softplus
            c["exps_bwd"] += m.conv_dim + m.d_inner + h
    return c


def machine_rates(rows: int = 8192) -> dict:
    """One-thread GEMM FLOP/s (a (rows x 256) @ (256 x 1024) float32 product, the input projection's shape),
    exp/s (torch.exp over a cache-resident vector) and copy bandwidth (bytes read + written, 64 MiB), each the best
    of 5 by CPU time."""
    import torch

    a, b = torch.randn(rows, D_MODEL), torch.randn(D_MODEL, 4 * D_MODEL)
    out = torch.empty(rows, 4 * D_MODEL)
    small, sout = torch.rand(1 << 16), torch.empty(1 << 16)

    def exps():
        for _ in range(100):
            torch.exp(small, out=sout)

    t = _best_cpu_time(lambda: torch.mm(a, b, out=out))
    te = _best_cpu_time(exps)
    src = torch.rand(1 << 24)
    dst = torch.empty_like(src)
    tc = _best_cpu_time(lambda: dst.copy_(src))
    return {"gemm_flops": 2.0 * a.shape[0] * a.shape[1] * b.shape[1] / t, "exp_per_s": 100 * small.numel() / te,
            "copy_bytes_per_s": 2.0 * 4 * src.numel() / tc}


def _best_cpu_time(fn, repeat: int = 5) -> float:
    """Best process CPU time of ``fn`` over ``repeat`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def step_counts(length: int, chunk_len: int) -> dict:
    """Tokens through each part of one chunked step: pass 1 runs the backbone on all chunks but the last."""
    last = length - (-(-length // chunk_len) - 1) * chunk_len
    return {"pass1": length - last, "pass2": length}


def bound_seconds(cost: dict, length: int, chunk_len: int, rates: dict) -> dict:
    """The step's FLOPs and exps (see the module docstring) and its bound in seconds at ``rates``."""
    n = step_counts(length, chunk_len)
    fwd = cost["backbone"] + cost["scan_fwd"]
    flops = (n["pass1"] * fwd + n["pass2"] * (fwd + cost["head"]) + n["pass2"] * 2 * (cost["backbone"] + cost["head"])
             + n["pass2"] * cost["scan_bwd"])
    exps = (n["pass1"] + n["pass2"]) * cost["exps_fwd"] + n["pass2"] * (cost["exps_bwd"] + 2 * cost["head_exps"])
    return {"flops": flops, "exps": exps, "seconds": flops / rates["gemm_flops"] + exps / rates["exp_per_s"]}


def _model(name: str):
    from ssmkit.models import CausalLM, ModelConfig

    return CausalLM(ModelConfig(d_model=D_MODEL, n_layers=N_LAYERS, pattern=name, vocab_size=VOCAB,
                                mixer_options={name: MIXERS[name]}))


def child_ssmkit(length: int, chunk_len: int, name: str = "mamba", threads: int = 1, profile: int = 0,
                 resident: int = 0) -> dict:
    """Peak RSS, wall and CPU time of one chunked training step (ssmkit) on ``length`` tokens, and the bound
    measured in the same process; with ``profile`` also the step's CPU time per op (see longseq_profile.py);
    ``resident``: chunked_loss_backward(resident_heap=True)."""
    import torch

    from ssmkit.train.chunked import chunked_loss_backward

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = _model(name)
    x, labels = _tokens(length)
    warm_x, warm_l = x[:, :256], labels[:, :256]  # numba kernels load/compile outside the measurement
    chunked_loss_backward(model, {"input_ids": warm_x, "labels": warm_l}, 128)
    model.zero_grad(set_to_none=True)
    base = current_rss_bytes()
    batch = {"input_ids": x, "labels": labels}
    ops = None
    t0, c0, o0 = time.perf_counter(), time.process_time(), os.times()
    if profile:
        from longseq_profile import OpProfiler

        with OpProfiler() as prof:
            stats = chunked_loss_backward(model, batch, chunk_len, resident_heap=bool(resident))
    else:
        stats = chunked_loss_backward(model, batch, chunk_len, resident_heap=bool(resident))
    seconds, cpu, o1 = time.perf_counter() - t0, time.process_time() - c0, os.times()
    grads_ok = all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    rates = machine_rates()
    cost = per_token_cost(model)
    bound = bound_seconds(cost, length, chunk_len, rates)
    if profile:
        ops = prof.table(rates, rates["copy_bytes_per_s"])
    return {"model": name, "length": length, "chunk_len": chunk_len, "threads": threads, "seconds": seconds,
            "cpu_seconds": cpu, "user_s": o1.user - o0.user, "sys_s": o1.system - o0.system,
            "resident_heap": bool(resident),
            "bound_s": bound["seconds"], "bound_flops": bound["flops"], "bound_exps": bound["exps"],
            "rates": rates, "cost_per_token": cost, "peak_rss": peak_rss_bytes(), "ops": ops,
            "base_rss": base, "loss": stats["loss"], "tokens": stats["tokens"], "chunks": stats["chunks"],
            "state_bytes": stats["state_bytes"], "grads_finite": grads_ok,
            "params": model.num_parameters(), "loadavg": os.getloadavg()}


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
        if kind == "ssmkit":
            result = child_ssmkit(int(args[0]), int(args[1]), *args[2:3], *map(int, args[3:]))
        else:
            result = child_hf(int(args[0]), int(args[1]))
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
    ap.add_argument("--profile", action="store_true", help="as --bound-only, plus the CPU time per op (slower)")
    ap.add_argument("--threads", type=int, default=1, help="torch and numba threads of the ssmkit step")
    ap.add_argument("--resident-heap", action="store_true",
                    help="chunked_loss_backward(resident_heap=True): glibc's heap kept resident during the step "
                         "(fewer page faults, more peak RSS; with --bound-only/--profile)")
    ap.add_argument("--tag", default="", help="suffix of the results file name (bench_longseq_bound<tag>.json)")
    ap.add_argument("--thp", action="store_true",
                    help="set THP_MEM_ALLOC_ENABLE=1 in the children (transparent huge pages for torch's tensors)")
    a = ap.parse_args()
    if a.thp:  # torch's CPU allocator then asks for 2 MiB pages for large tensors (fewer page faults)
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    if a.bound_only or a.profile:
        rows = []
        for name in a.models:
            r = run_child(SCRIPT, "ssmkit", str(a.length), str(min(a.chunk_len, a.length)), name, str(a.threads),
                          str(int(a.profile)), str(int(a.resident_heap)), timeout=3600)
            if "error" in r:
                print(f"{name}: FAILED: {r['error']}")
                continue
            rows.append({"model": name, "length": a.length, "chunk_len": r["chunk_len"], "threads": a.threads,
                         "time_s": r["seconds"], "cpu_s": r["cpu_seconds"], "sys_s": r["sys_s"],
                         "bound_s": r["bound_s"], "ratio": r["seconds"] / r["bound_s"],
                         "cpu_ratio": r["cpu_seconds"] / r["bound_s"],
                         "MFLOP/token": r["bound_flops"] / a.length / 1e6, "exps/token": r["bound_exps"] / a.length,
                         "GFLOP/s": r["rates"]["gemm_flops"] / 1e9, "Gexp/s": r["rates"]["exp_per_s"] / 1e9,
                         "thp": a.thp, "resident_heap": a.resident_heap, "peak_rss_GiB": r["peak_rss"] / GIB,
                         "load": r["loadavg"][0]})
            if r.get("ops"):
                print(f"\n{name}: CPU time per op, one step of {a.length} tokens ({a.threads} thread(s))")
                print_table(r["ops"], list(r["ops"][0]))
        print()
        print_table(rows, list(rows[0]) if rows else ["model"])
        tag = ("_profile" if a.profile else "") + (f"_{a.tag}" if a.tag else "")
        write_json(f"bench_longseq_bound{tag}", {"table": rows, "loadavg": os.getloadavg(), "argv": sys.argv[1:]})
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
