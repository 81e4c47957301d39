"""Where a fused decode step's time goes at one and two threads, measured interleaved in one process.

    nice -n 10 python benchmarks/probe_decode_threads.py [--arch mamba|mamba2] [--variants f32,int8a8,int4a8]
                                                          [--rounds 15] [--tokens 8] [--layers 24] [--profile]

For each variant of a random 130M-shaped model (d_model 768, 24 layers, vocab 50280; Mamba d_state 16, Mamba-2
d_state 128 / headdim 64) it alternates, ``--rounds`` times: ``model.step`` at 1 thread, at 2 threads, and the
bare kernel launch (the plan's arrays prepared once, no Python around it) at 1 and 2 threads. Per round it
times ``--tokens`` steps (wall clock, best of the round's 2 passes) and reports per case the best and the median
ms per token over the rounds, and the 2-thread speed-up (t1 / t2) per round: best, median and the spread
(quartiles), since on a shared machine a descheduled thread stalls every barrier of a two-thread step.
``--profile`` also runs the kernels with their per-stage clock (the kernels' ``prof`` argument: cycle-counter
stamps at every barrier) and prints, per stage kind, the time inside chunks (work: the stage's products and the
quantization of its input) and the time waiting at its barriers, per thread, in microseconds per token.
Also prints the load average and a read-bandwidth probe's GB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numba as nb
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ssmkit.infer.quantize import quantize_weights  # noqa: E402
from ssmkit.models import CausalLM, ModelConfig  # noqa: E402
from ssmkit.models.fused_decode import stack_plan  # noqa: E402
from ssmkit.ops import _numba_decode as D  # noqa: E402
from ssmkit.ops import _numba_decode_mamba2 as D2  # noqa: E402


def build(arch: str, layers: int, variant: str) -> CausalLM:
    torch.manual_seed(0)
    opts = {"mamba": {"d_state": 16}} if arch == "mamba" else {}
    model = CausalLM(ModelConfig(d_model=768, pattern=f"{arch}*{layers}", vocab_size=50280,
                                 mixer_options=opts)).eval()
    if variant == "f32":
        return model
    bits = 8 if variant.startswith("int8") else 4
    act = "int8" if variant.endswith("a8") else "float"
    kw = {"group_size": 32} if bits == 4 else {}
    return quantize_weights(model, bits=bits, activations=act, **kw)


class Launch:
    """The bare kernel launch of a model's stack plan at batch 1 (arrays prepared once)."""

    def __init__(self, model: CausalLM, arch: str) -> None:
        plan = stack_plan(model.backbone, model.lm_head)
        self.plan, self.arch = plan, arch
        state = model.init_state(1)
        h = torch.randn(1, 768)
        self.h = h.numpy()
        self.resid = h.clone().numpy()
        a = plan.arrays
        w0 = plan.layers[0]
        n = len(plan.layers)
        conv = torch.stack([s.conv for s in state.layers])
        ssm = torch.stack([s.ssm for s in state.layers]).contiguous()
        self.conv, self.ssm = conv.numpy(), ssm.numpy()
        self.conv_new, self.ssm_new = np.empty_like(self.conv), np.empty_like(self.ssm)
        self.out = np.empty((1, 768), np.float32)
        hw = a["head"][0]
        self.logits = np.empty((1, hw.shape[0]), np.float32)
        if arch == "mamba":
            di, rank, ns = w0.d.shape[0], w0.dt_w.shape[1], w0.a_log.shape[1]
            self.scratch = [np.empty((1, k), np.float32) for k in (768, 2 * di, di, rank + 2 * ns, di)]
            self.stages = 5 * n + 2
        else:
            di, n_conv, heads, p, ns = w0.dims()
            self.scratch = [np.empty((1, k), np.float32) for k in (768, di, n_conv, 2 * heads, di)]
            self.ssm = self.ssm.reshape(n, 1, di, ns)
            self.ssm_new = self.ssm_new.reshape(n, 1, di, ns)
            self.stages = D2.STAGES * n + 2

    def __call__(self, threads: int, prof: np.ndarray | None = None) -> None:
        a, plan = self.plan.arrays, self.plan
        self.resid[:] = self.h
        counters = np.zeros(D.counter_slots(self.stages, threads), np.int64)
        prof = np.zeros((0, 0), np.int64) if prof is None else prof
        hw, hs, hb = a["head"]
        if self.arch == "mamba":
            D.mamba_stack(self.resid, plan.residual, a["norm_w"], plan.eps, a["final_w"], plan.final_eps,
                          a["in_w"], a["in_scale"], a["in_b"], a["conv_w"], a["conv_b"], self.conv,
                          a["x_w"], a["x_scale"], a["dt_w"], a["dt_b"], a["a_exp"], a["d"], a["out_w"],
                          a["out_scale"], a["out_b"], self.ssm, self.conv_new, self.ssm_new, *self.scratch,
                          self.out, hw, hs, hb, self.logits, counters, threads, plan.act_quant, prof)
        else:
            D2.mamba2_stack(self.resid, plan.residual, a["norm"], plan.eps, a["final_w"], plan.final_eps,
                            a["in_w"], a["in_scale"], a["in_b"], a["conv_w"], a["conv_b"], self.conv,
                            a["dt_b"], a["a_log"], a["d"], a["norm_w"], a["consts"], plan.layers[0].ngroups,
                            a["out_w"], a["out_scale"], a["out_b"], self.ssm, self.conv_new, self.ssm_new,
                            *self.scratch, self.out, hw, hs, hb, self.logits, counters, threads, plan.act_quant,
                            prof)


def time_steps(fn, tokens: int, passes: int = 2) -> tuple[float, float]:
    """Best (wall, process CPU) seconds per call over ``passes`` runs of ``tokens`` calls."""
    best, best_cpu = float("inf"), float("inf")
    for _ in range(passes):
        t, c = time.perf_counter(), time.process_time()
        for _ in range(tokens):
            fn()
        best = min(best, (time.perf_counter() - t) / tokens)
        best_cpu = min(best_cpu, (time.process_time() - c) / tokens)
    return best, best_cpu


def model_stepper(model: CausalLM):
    state = [model.init_state(1)]
    tok = torch.zeros(1, dtype=torch.long)

    def step():
        with torch.no_grad():
            _, state[0] = model.step(tok, state[0])
    return step


def with_threads(n: int, fn):
    def run():
        torch.set_num_threads(n)
        nb.set_num_threads(n)
        fn()
    return run


def read_bandwidth(gib: float = 0.5, repeat: int = 5) -> float:
    x = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        torch.sum(x)
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def quartiles(v: list[float]) -> str:
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return f"{q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f}"


def profile(launch: Launch, threads: int, tokens: int) -> None:
    """Per stage kind, microseconds per token inside chunks (work) and at the barriers (wait), per thread: in the
    fastest of ``tokens`` launches and the median over them."""
    kinds = (["norm", "in_proj", "x_proj", "scan", "out_proj"] if launch.arch == "mamba"
             else ["norm", "in_proj", "ssd", "gated_norm", "out_proj"])
    per_layer = len(kinds)
    prof = np.zeros((threads, 2 * launch.stages + 1), np.int64)
    work = np.zeros((tokens, threads, per_layer + 2))
    wait = np.zeros((tokens, threads, per_layer + 2))
    totals = []
    from ssmkit.ops._numba_atomics import counter_hz

    hz = counter_hz()
    for i in range(tokens):
        prof[:] = 0
        t0 = time.perf_counter()
        launch(threads, prof)
        totals.append(time.perf_counter() - t0)
        ticks = prof / hz
        for t in range(threads):
            prev = ticks[t, 0]
            for s in range(launch.stages):
                k = s % per_layer if s < launch.stages - 2 else per_layer + s - (launch.stages - 2)
                enter, leave = ticks[t, 1 + 2 * s], ticks[t, 2 + 2 * s]
                work[i, t, k] += enter - prev
                wait[i, t, k] += leave - enter
                prev = leave
    names = kinds + ["final_norm", "head"]
    best = int(np.argmin(totals))
    print(f"  threads {threads}: launch ms best {1e3 * totals[best]:.2f}, median {1e3 * statistics.median(totals):.2f}"
          f"; us per token per stage kind, work / wait: in the best launch [median over {tokens}], thread by thread")
    for k, name in enumerate(names):
        cells = "  ".join(f"{1e6 * work[best, t, k]:6.0f} [{1e6 * np.median(work[:, t, k]):6.0f}] / "
                          f"{1e6 * wait[best, t, k]:5.0f} [{1e6 * np.median(wait[:, t, k]):5.0f}]"
                          for t in range(threads))
        print(f"    {name:11s} {cells}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=["mamba", "mamba2"], default="mamba")
    p.add_argument("--variants", default="int8a8")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--no-model", action="store_true", help="time the bare launch only")
    p.add_argument("--steps-only", action="store_true", help="time model.step only (e.g. an older tree's kernels)")
    p.add_argument("--json", type=Path, help="also write the per-round times here")
    args = p.parse_args()
    report = {"load_before": os.getloadavg(), "variants": {}}
    print(f"load average {os.getloadavg()}; read bandwidth (1 thread) {read_bandwidth() / 1e9:.1f} GB/s",
          flush=True)
    for variant in args.variants.split(","):
        model = build(args.arch, args.layers, variant)
        cases = {}
        if not args.steps_only:
            launch = Launch(model, args.arch)
            cases = {f"launch t{n}": with_threads(n, lambda n=n, f=launch: f(n)) for n in (1, 2)}
        if not args.no_model:
            step = model_stepper(model)
            cases.update({f"step t{n}": with_threads(n, step) for n in (1, 2)})
        for fn in cases.values():  # compile and warm up
            fn()
        times: dict[str, list[float]] = {k: [] for k in cases}
        cpu: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.rounds):
            for k, fn in cases.items():
                wall, c = time_steps(fn, args.tokens)
                times[k].append(wall)
                cpu[k].append(c)
        report["variants"][variant] = {"wall": times, "cpu": cpu, "load_after": os.getloadavg()}
        print(f"{args.arch} {variant}, load {os.getloadavg()[0]:.2f}: ms per token, wall best / median over "
              f"{args.rounds} rounds; process CPU best")
        for k, v in times.items():
            print(f"  {k:10s} {1e3 * min(v):7.3f} / {1e3 * statistics.median(v):7.3f}   cpu {1e3 * min(cpu[k]):7.3f}")
        kinds = [k for k in ("launch", "step") if f"{k} t1" in times]
        for kind in kinds:
            r = [a / b for a, b in zip(times[f"{kind} t1"], times[f"{kind} t2"], strict=True)]
            print(f"  {kind} t1/t2 per round: best {max(r):.2f}, quartiles {quartiles(r)}; "
                  f"ratio of bests {min(times[f'{kind} t1']) / min(times[f'{kind} t2']):.2f}")
        if args.profile and not args.steps_only:
            for n in (1, 2):
                nb.set_num_threads(n)
                launch(n, np.zeros((n, 2 * launch.stages + 1), np.int64))
                profile(launch, n, 4 * args.tokens)
        sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
