"""Where a hybrid's 2048-token prefill time goes against its matrix products, for a NemotronH-shaped and a
Bamba-shaped random model (``bench_hybrid.build``), ssmkit and transformers in one process.

    python benchmarks/bench_hybrid_prefill.py [--length 2048] [--repeat 5] [--families nemotron_h,bamba]

One thread (torch and numba). Per family, interleaved (A B C ... A B C ...), best of ``repeat`` in CPU time:
- ``ssmkit`` / ``transformers``: the prefill (backbone over the prompt with its final state, logits of the last
  position; transformers with use_cache=True, logits_to_keep=1);
- ``projections``: F.linear on random (length, in) rows for every nn.Linear of ssmkit's backbone, one call per
  weight as both models make them (q, k, v apart; gate and up apart) - the GEMMs both libraries run;
- ``projections_fused``: the same with q/k/v stacked into one weight and gate/up into one (what fusing them
  would leave);
- ``peak``: a 2048 x 2048 x 2048 float32 GEMM, this core's GEMM rate under the current load.
``hf_over_projections`` = transformers / projections is the most any prefill doing those GEMMs with this GEMM
library could gain over transformers. A torch.profiler pass over one ssmkit prefill lists the matrix-product and
copy ops it runs (counts, CPU ms). Writes benchmarks/results/bench_hybrid_prefill.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hybrid import build, ids  # noqa: E402
from common import print_table, write_json  # noqa: E402


def weight_groups(ours) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(every projection weight as the model holds it, the same with q/k/v and gate/up stacked)."""
    apart, fused = [], []
    for block in ours.backbone.blocks:
        mixer = block.mixer
        lins = [m for m in mixer.modules() if isinstance(m, torch.nn.Linear)]
        apart += [m.weight.detach() for m in lins]
        if hasattr(mixer, "q_proj"):
            fused.append(torch.cat([mixer.q_proj.weight, mixer.k_proj.weight, mixer.v_proj.weight]).detach())
            fused.append(mixer.o_proj.weight.detach())
        elif hasattr(mixer, "mlp") and getattr(mixer.mlp, "gate_proj", None) is not None:
            fused.append(torch.cat([mixer.mlp.gate_proj.weight, mixer.mlp.up_proj.weight]).detach())
            fused.append(mixer.mlp.down_proj.weight.detach())
        else:
            fused += [m.weight.detach() for m in lins]
    return apart, fused


def profile_ops(run) -> dict:
    """CPU ms and call counts of the matrix-product and copy ops of one call of ``run``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    keep = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::copy_", "aten::clone",
            "aten::contiguous", "aten::cat", "aten::baddbmm")
    return {e.key: {"calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3}
            for e in prof.key_averages() if e.key in keep}


@torch.no_grad()
def family_case(family: str, pattern: str, length: int, repeat: int) -> dict:
    hf, ours = build(pattern, family)
    x = ids(1, length, seed=7)
    apart, fused = weight_groups(ours)
    xs = {k: torch.randn(length, k) for k in {w.shape[1] for w in apart}}
    big = torch.randn(2048, 2048)
    out: dict = {}

    def run_ours():
        hidden, _ = ours.backbone(x, return_final_state=True, input_name="input_ids")
        out["ours"] = ours.lm_head(hidden[:, -1])

    def run_hf():
        out["hf"] = hf(x, use_cache=True, logits_to_keep=1).logits[:, -1]

    def proj(ws):
        return lambda: [F.linear(xs[w.shape[1]], w) for w in ws]

    cases = {"ssmkit": run_ours, "transformers": run_hf, "projections": proj(apart),
             "projections_fused": proj(fused), "peak": lambda: big @ big}
    for fn in cases.values():
        fn()
    times: dict = {k: [] for k in cases}
    for _ in range(repeat):
        for k, fn in cases.items():
            c0 = time.process_time()
            fn()
            times[k].append(time.process_time() - c0)
    best = {k: min(v) for k, v in times.items()}
    flops = sum(2.0 * length * w.shape[0] * w.shape[1] for w in apart)
    err = float((out["ours"] - out["hf"]).abs().max() / out["hf"].abs().max())
    row = {"case": f"{family} prefill {length}", "model": ours.summary(), **{f"{k}_s": v for k, v in best.items()},
           "speedup": best["transformers"] / best["ssmkit"],
           "hf_over_projections": best["transformers"] / best["projections"],
           "hf_over_projections_fused": best["transformers"] / best["projections_fused"],
           "projection_gflops": flops / best["projections"] / 1e9,
           "projection_fused_gflops": flops / best["projections_fused"] / 1e9,
           "peak_gflops": 2 * 2048 ** 3 / best["peak"] / 1e9, "n_projections": len(apart),
           "logits_rel_err": err, "ssmkit_ops": profile_ops(run_ours), "transformers_ops": profile_ops(run_hf)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--families", default="nemotron_h,bamba")
    parser.add_argument("--pattern", default="M-M-*-M-")
    args = parser.parse_args()
    if args.length < 1 or args.repeat < 1:
        parser.error(f"--length and --repeat must be >= 1, got {args.length} and {args.repeat}")
    import numba

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = [family_case(f, args.pattern, args.length, args.repeat) for f in args.families.split(",")]
    print_table(rows, ["case", "speedup", "ssmkit_s", "transformers_s", "projections_s", "projections_fused_s",
                       "hf_over_projections", "hf_over_projections_fused", "projection_gflops",
                       "projection_fused_gflops", "peak_gflops", "logits_rel_err"])
    for r in rows:
        print(r["case"], r["model"])
        for side in ("ssmkit_ops", "transformers_ops"):
            print(f"  {side}: " + ", ".join(f"{k} {v['calls']}x {v['self_cpu_ms']:.1f} ms" for k, v in r[side].items()))
    print(f"wrote {write_json('bench_hybrid_prefill', {'length': args.length, 'repeat': args.repeat, 'rows': rows})}")


if __name__ == "__main__":
    main()
