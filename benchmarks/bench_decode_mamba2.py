"""Mamba-2 decode: the fused one-launch step against the block-by-block step and the memory-bandwidth bound.

    nice -n 10 python benchmarks/bench_decode_mamba2.py [--quick] [--threads 1 2] [--tokens T] [--batch B]

Model: a 130M-shaped Mamba-2 (d_model 768, 24 layers, d_state 128, headdim 64, one group, vocab 50280, tied
head, random weights) built with ssmkit, in float32 and with ``quantize_weights`` int8 and int4 (group 32), with
float and with int8 activations (``a8``). For
each thread count and precision it times T greedy decode steps at batch B (default 1) two ways, in the same
process and interleaved: ``model.step`` (the fused path: every block and the LM head in one numba launch) and
the block-by-block step (embedding, each ``block.step`` in Python, the final norm, the head through
``decode_linear``: what every non-fused model runs). It prints tokens/s, the fused/block-by-block ratio, the
process CPU time per step (with one thread, a measure that other jobs on a shared machine disturb less), and the
fraction of two bounds from the read bandwidth measured in the same process (best ``torch.sum`` over 1 GiB with
the same threads): weights only, and weights plus the recurrent state read and written per token (Mamba-2's
state is 24 x 24 x 64 x 128 floats = 18.9 MB per row, read and written once). ``--quick``: 4 layers.

``--families``: where a non-fused step's time goes, for 130M-shaped stacks of every steppable family (Mamba,
Mamba-2, GatedSSM, RG-LRU and a Mamba-2 + attention hybrid, 1 of 6 layers attention, after a 64-token prefill),
float32 and int8, on one thread: the block-by-block step against the model's linear layers alone, each called
once through ``decode_linear`` (the weight-reading floor a fused step would approach), in process CPU time
(robust to other jobs on a shared machine) and wall time; "fused" is "stack" (one launch for the whole step),
"runs" (a hybrid: each run of Mamba / Mamba-2 blocks in one launch) or "no".
Writes benchmarks/results/bench_decode_mamba2.json (or bench_decode_families.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode_quant import read_bandwidth, weight_bytes  # noqa: E402
from common import print_table, write_json  # noqa: E402

from ssmkit.infer.quantize import quantize_weights  # noqa: E402
from ssmkit.layers.base import linear_weights  # noqa: E402
from ssmkit.models import CausalLM, ModelConfig  # noqa: E402
from ssmkit.models.fused_decode import run_plans, stack_plan  # noqa: E402
from ssmkit.models.outputs import ModelState  # noqa: E402
from ssmkit.ops.decode_linear import decode_linear  # noqa: E402


def blockwise_step(model: CausalLM, tok: torch.Tensor, state: ModelState) -> tuple[torch.Tensor, ModelState]:
    """The block-by-block step (what Backbone.step_with_head runs for a model the fused kernel does not take)."""
    bb = model.backbone
    h = bb.embed(tok)
    new = []
    for block, s in zip(bb.blocks, state.layers, strict=True):
        h, s = block.step(h, s)
        new.append(s)
    weight, scale, bias = linear_weights(model.lm_head)
    return decode_linear(bb.final_norm(h), weight, bias, scale=scale), ModelState(new)


def state_bytes(model: CausalLM, batch: int) -> int:
    """Bytes of the recurrent state one step reads and writes (both counted)."""
    return 2 * sum(t.numel() * t.element_size() for s in model.init_state(batch).layers for t in (s.conv, s.ssm))


def time_decode(step, model: CausalLM, batch: int, tokens: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per step of ``tokens`` greedy steps from a zero state."""
    with torch.no_grad():
        state = model.init_state(batch)
        tok = torch.zeros(batch, dtype=torch.long)
        t, c = time.perf_counter(), time.process_time()
        for _ in range(tokens):
            logits, state = step(tok, state)
            tok = logits.argmax(-1)
        return (time.perf_counter() - t) / tokens, (time.process_time() - c) / tokens


def linears_floor(model: CausalLM) -> list[tuple]:
    """(x, weight, scale, bias) of every linear layer a step reads, the LM head last (zero inputs)."""
    out = []
    for name, m in model.named_modules():
        if name.endswith("dt_proj") or not hasattr(m, "in_features") or name == "lm_head":
            continue
        w, sc, b = linear_weights(m)
        out.append((torch.zeros(1, m.in_features), w, sc, b))
    w, sc, b = linear_weights(model.lm_head)
    return out + [(torch.zeros(1, model.config.d_model), w, sc, b)]


def cpu_and_wall(fn, tokens: int) -> tuple[float, float]:
    c, t = time.process_time(), time.perf_counter()
    for _ in range(tokens):
        fn()
    return (time.process_time() - c) / tokens, (time.perf_counter() - t) / tokens


def families(args) -> None:
    """The --families table (module docstring)."""
    torch.set_num_threads(1)
    patterns = {"mamba": "mamba*24", "mamba2": "mamba2*24", "gated": "gated*24", "rglru": "rglru*24",
                "mamba2+attn": "(mamba2*5,attn)*4"}
    ids = torch.randint(0, 50280, (1, 64), generator=torch.Generator().manual_seed(1))
    tok = torch.zeros(1, dtype=torch.long)
    rows = []
    for fam, pattern in patterns.items():
        base = CausalLM(ModelConfig(d_model=768, pattern=pattern, vocab_size=50280,
                                    mixer_options={"mamba": {"d_state": 16}, "attn": {"n_heads": 12}})).eval()
        for prec, m in (("float32", base), ("int8", quantize_weights(base))):
            with torch.no_grad():
                _, state0 = m.backbone(ids, return_final_state=True, input_name="input_ids")
                floor = linears_floor(m)
                best = [float("inf")] * 6
                for _ in range(args.repeat + 1):
                    cur = [state0, state0]

                    def fused(cur=cur, m=m):
                        cur[0] = m.step(tok, cur[0])[1]

                    def blocks(cur=cur, m=m):
                        cur[1] = blockwise_step(m, tok, cur[1])[1]

                    def lin(floor=floor):
                        for x, w, sc, b in floor:
                            decode_linear(x, w, b, scale=sc)

                    got = cpu_and_wall(fused, args.tokens) + cpu_and_wall(blocks, args.tokens) + cpu_and_wall(
                        lin, args.tokens)
                    best = [min(a, b) for a, b in zip(best, got, strict=True)]
            fc, fw, bc, bw_, lc, lw = best
            fused_plan = ("stack" if stack_plan(m.backbone, m.lm_head) is not None
                          else "runs" if run_plans(m.backbone) is not None else "no")
            rows.append({"family": fam, "weights": prec, "fused": fused_plan, "step_cpu_ms": fc * 1e3,
                         "blocks_cpu_ms": bc * 1e3, "linears_cpu_ms": lc * 1e3,
                         "blocks_minus_linears_ms": (bc - lc) * 1e3, "share_not_linears": (bc - lc) / bc,
                         "step_wall_ms": fw * 1e3, "blocks_wall_ms": bw_ * 1e3, "linears_wall_ms": lw * 1e3})
            print(rows[-1], flush=True)
    print_table(rows, ["family", "weights", "fused", "step_cpu_ms", "blocks_cpu_ms", "linears_cpu_ms",
                       "blocks_minus_linears_ms", "share_not_linears", "step_wall_ms", "blocks_wall_ms",
                       "linears_wall_ms"])
    write_json("bench_decode_families", {"threads": 1, "tokens": args.tokens, "rows": rows})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="timed runs per case (best taken), after one warm-up")
    p.add_argument("--families", action="store_true", help="the per-family step breakdown instead")
    args = p.parse_args()
    if min(*args.threads, args.tokens, args.batch, args.repeat) < 1:
        p.error("--threads, --tokens, --batch and --repeat must be >= 1")
    if args.families:
        families(args)
        return
    torch.manual_seed(0)
    layers = 4 if args.quick else 24
    model = CausalLM(ModelConfig(d_model=768, pattern=f"mamba2*{layers}", vocab_size=50280)).eval()
    variants = {"float32": model, "int8": quantize_weights(model), "int4-g32": quantize_weights(model, bits=4),
                "int8 a8": quantize_weights(model, activations="int8"),
                "int4-g32 a8": quantize_weights(model, bits=4, activations="int8")}
    for name, m in variants.items():
        if stack_plan(m.backbone, m.lm_head) is None:
            raise SystemExit(f"{name}: the fused Mamba-2 plan is not available")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        bw = read_bandwidth(threads)
        print(f"threads {threads}: read bandwidth {bw / 1e9:.1f} GB/s", flush=True)
        for name, m in variants.items():
            best = [float("inf")] * 4  # fused wall, fused CPU, blocks wall, blocks CPU
            for _ in range(args.repeat + 1):  # interleaved, best of each; the first round warms up
                got = time_decode(m.step, m, args.batch, args.tokens) + time_decode(
                    lambda t, s, m=m: blockwise_step(m, t, s), m, args.batch, args.tokens)
                best = [min(a, b) for a, b in zip(best, got, strict=True)]
            fused, fused_cpu, blocks, blocks_cpu = best
            w_bytes, s_bytes = weight_bytes(m), state_bytes(m, args.batch)
            rows.append({"threads": threads, "variant": name, "fused_tok_s": args.batch / fused,
                         "blocks_tok_s": args.batch / blocks, "fused_vs_blocks": blocks / fused,
                         "fused_cpu_ms": fused_cpu * 1e3, "blocks_cpu_ms": blocks_cpu * 1e3,
                         "weight_MB": w_bytes / 1e6, "state_rw_MB": s_bytes / 1e6,
                         "bound_w_tok_s": args.batch * bw / w_bytes,
                         "frac_bound_w": (1 / fused) / (bw / w_bytes),
                         "frac_bound_w_state": (1 / fused) / (bw / (w_bytes + s_bytes))})
            print(rows[-1], flush=True)
    print_table(rows, ["threads", "variant", "fused_tok_s", "blocks_tok_s", "fused_vs_blocks", "fused_cpu_ms",
                       "blocks_cpu_ms", "weight_MB",
                       "state_rw_MB", "bound_w_tok_s", "frac_bound_w", "frac_bound_w_state"])
    write_json("bench_decode_mamba2", {"layers": layers, "tokens": args.tokens, "batch": args.batch, "rows": rows})


if __name__ == "__main__":
    main()
