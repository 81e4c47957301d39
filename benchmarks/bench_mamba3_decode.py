"""Mamba-3 fused decode: one launch per token (models.fused_decode, ops/_numba_decode_mamba3.py) against stepping
block by block (Mamba3.step per block, final norm, LM head), with a same-size Mamba-2 (its fused stack step and its
block-by-block step) beside it, in one process, one thread (torch and numba).

    python benchmarks/bench_mamba3_decode.py [--layers 24] [--repeat 5] [--steps 3]

Models (random weights, float32): d_model 768, expand 2, 24 heads x headdim 64 x d_state 128 (equal SSM state
size for all), vocab 50280 with its LM head; Mamba-3 SISO, Mamba-3 MIMO of rank 2, Mamba-2 (ngroups 1, conv 4).
Cases: batch 1 and 8. Each timing is the CPU time (time.process_time) of ``--steps`` decode steps, best of
``--repeat`` rounds, the variants interleaved within each round (A B C D ..., then again). The bound: the bytes one
token must move (every weight read once, and the SSM states read and written) over the read bandwidth measured
in the same process (a single-thread matrix-vector product over a 512 MB matrix, CPU time as the steps).
Writes benchmarks/results/bench_mamba3_decode.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

from ssmkit.models import CausalLM, ModelConfig  # noqa: E402
from ssmkit.models.fused_decode import stack_plan  # noqa: E402
from ssmkit.models.outputs import ModelState  # noqa: E402


def build(pattern: str, opts: dict, layers: int) -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=768, n_layers=layers, vocab_size=50280, pattern=pattern, mixer_options={pattern: opts})
    return CausalLM(cfg).eval()


def blockwise(model: CausalLM, ids: torch.Tensor, state: ModelState) -> tuple[torch.Tensor, ModelState]:
    """The unfused decode step: each block's own step, the final norm, the LM head."""
    bb = model.backbone
    h = bb.embed(ids)
    new = []
    for block, s in zip(bb.blocks, state.layers, strict=True):
        h, s = block.step(h, s)
        new.append(s)
    return model.lm_head(bb.final_norm(h)), ModelState(new)


def read_gbps() -> float:
    """A matrix-vector product over a 512 MB matrix (far past the caches): the rate a decode step reads weights."""
    w, x = torch.rand(1 << 15, 1 << 12), torch.rand(1 << 12)
    best = float("inf")
    for _ in range(5):
        t0 = time.process_time()
        torch.mv(w, x)
        best = min(best, time.process_time() - t0)
    return w.numel() * 4 / best / 1e9


def state_bytes(state: ModelState) -> int:
    return sum(t.numel() * t.element_size() for s in state.layers for t in vars(s).values()
               if isinstance(t, torch.Tensor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import numba

    numba.set_num_threads(1)
    ssm = {"d_state": 128, "headdim": 64, "expand": 2}
    models = {"mamba3": build("mamba3", ssm, args.layers),
              "mamba3 MIMO-2": build("mamba3", {**ssm, "mimo_rank": 2}, args.layers),
              "mamba2": build("mamba2", {**ssm, "ngroups": 1}, args.layers)}
    for name, m in models.items():
        assert stack_plan(m.backbone, m.lm_head) is not None, f"{name}: no fused plan"
    gbps = read_gbps()
    rows = []
    for batch in (1, 8):
        ids = torch.arange(batch) * 11 % 50280
        runs = {}
        for name, m in models.items():
            state = m.init_state(batch)
            with torch.no_grad():
                _, state = m.step(ids, state)  # warm-up (kernel load) and a nonzero state
                fused, _ = m.step(ids, state)
                plain, _ = blockwise(m, ids, state)
            err = float((fused - plain).abs().max() / plain.abs().max())
            read = {id(p): p for p in m.parameters() if p is not m.backbone.embedding.weight}  # one embedding row
            read[id(m.lm_head.weight)] = m.lm_head.weight  # tied or not, the head reads the whole matrix
            wbytes = sum(p.numel() * p.element_size() for p in read.values())
            runs[name] = {"model": m, "state": state, "err": err, "wbytes": wbytes, "sbytes": state_bytes(state)}
        best: dict = {}
        for _ in range(args.repeat):
            for name, r in runs.items():
                for how, fn in (("fused", CausalLM.step), ("blocks", blockwise)):
                    s = r["state"]
                    with torch.no_grad():
                        t0 = time.process_time()
                        for _ in range(args.steps):
                            _, s = fn(r["model"], ids, s)
                        t = (time.process_time() - t0) / args.steps
                    best[(name, how)] = min(best.get((name, how), float("inf")), t)
        for name, r in runs.items():
            tf, tb = best[(name, "fused")], best[(name, "blocks")]
            bound_w = r["wbytes"] / gbps / 1e9
            bound = (r["wbytes"] + 2 * r["sbytes"]) / gbps / 1e9
            rows.append({"model": name, "batch": batch, "fused_ms": 1e3 * tf, "blocks_ms": 1e3 * tb,
                         "speedup": tb / tf, "fused_tok_per_s": batch / tf, "bound_weights_ms": 1e3 * bound_w,
                         "bound_ms": 1e3 * bound, "fused_over_bound": tf / bound,
                         "vs_mamba2_fused": tf / best[("mamba2", "fused")], "logits_rel_diff": r["err"]})
    print(f"read bandwidth {gbps:.1f} GB/s (1 thread); load {os.getloadavg()}")
    print_table(rows, ["model", "batch", "fused_ms", "blocks_ms", "speedup", "fused_tok_per_s", "bound_weights_ms",
                       "bound_ms", "fused_over_bound", "vs_mamba2_fused", "logits_rel_diff"])
    path = write_json("bench_mamba3_decode", {"params": vars(args), "read_GBps": gbps, "rows": rows,
                                              "loadavg": os.getloadavg()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
