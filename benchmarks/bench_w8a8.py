"""Decode speed of W8A8 against float32 and int8 weight-only, with the memory-bandwidth bound, in one process.

    nice -n 10 python benchmarks/bench_w8a8.py [--quick] [--threads 1] [--tokens 32] [--batches 1 8]

Model: a 130M-shaped Mamba (d_model 768, 24 layers, vocab 50280, random weights; ``--quick``: 4 layers).
W8A8 is calibrated on one random prompt of 256 tokens (speed does not depend on the scales). For each batch size
it times greedy ``model.step`` decoding (float32 and int8 take the fused one-launch kernel; W8A8 steps block by
block) and reports tokens/s (rows x steps per second), the ratio to float32, the bytes of weights a step reads
and the bandwidth bound (the read bandwidth of ``torch.sum`` over 1 GiB, measured in the same process, divided
by those bytes; the bound is per step, so rows x bound at batch > 1). Then the model's matrix products alone
(every projection and the head called once per step, nothing in between): int8 weight-only through
``decode_linear`` (the numba GEMV the fused step uses) against W8A8Linear, and W8A8's parts (activation
quantization with the Hadamard rotation, ``torch._int_mm``, rescale). Writes benchmarks/results/bench_w8a8.json.

``--accuracy``: instead, the trained models of ``bench_quant_accuracy.py`` (Tiny Shakespeare LM, selective copying,
MQAR; trained there, or reused from its ``--runs`` directory) scored on their validation split by the float32 and
the W8A8 model (calibrated on 8 training batches, as there), each through its forward and stepped token by token
(teacher forcing); writes benchmarks/results/bench_w8a8_accuracy.json.
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
from ssmkit.infer.w8a8 import W8A8Linear, int8_matmul, quantize_activation, quantize_w8a8  # noqa: E402
from ssmkit.models import CausalLM, ModelConfig  # noqa: E402
from ssmkit.ops.decode_linear import decode_linear  # noqa: E402


def best(fn, repeat: int) -> float:
    """Best seconds of ``fn()`` over ``repeat`` runs after one warm-up run."""
    out = float("inf")
    for i in range(repeat + 1):
        t = time.perf_counter()
        fn()
        if i:
            out = min(out, time.perf_counter() - t)
    return out


def time_decode(model, batch: int, tokens: int, repeat: int) -> float:
    """Best seconds per step of ``tokens`` greedy steps for ``batch`` rows from a zero state."""
    def run():
        state, tok = model.init_state(batch), torch.zeros(batch, dtype=torch.long)
        for _ in range(tokens):
            logits, state = model.step(tok, state)
            tok = logits.argmax(-1)
    with torch.no_grad():
        return best(run, repeat) / tokens


def linear_parts(w8a8, int8, rows: int, tokens: int, repeat: int) -> dict[str, float]:
    """Seconds per step of the matrix products alone (int8 GEMV; W8A8 whole and by part) at ``rows`` rows."""
    q = [m for m in w8a8.modules() if isinstance(m, W8A8Linear)]
    w = [m for n, m in int8.named_modules() if hasattr(m, "qweight") and not n.endswith("dt_proj")]
    xs = [torch.randn(rows, m.in_features) for m in q]
    codes = [quantize_activation(m.rotate(x), m.x_scale) for m, x in zip(q, xs, strict=True)]
    accs = [int8_matmul(c, m.qweight_t) for c, m in zip(codes, q, strict=True)]

    def loop(fn, layers, args):
        def run():
            for _ in range(tokens):
                for m, a in zip(layers, args, strict=True):
                    fn(m, a)
        return best(run, repeat) / tokens
    with torch.no_grad():
        return {
            "int8 GEMV (decode_linear)": loop(lambda m, x: decode_linear(x, m.qweight, m.bias, scale=m.scale), w, xs),
            "W8A8Linear": loop(lambda m, x: m(x), q, xs),
            "  quantize (+rotate)": loop(lambda m, x: quantize_activation(m.rotate(x), m.x_scale), q, xs),
            "  _int_mm": loop(lambda m, c: int8_matmul(c, m.qweight_t), q, codes),
            "  rescale": loop(lambda m, a: a.float() * (m.w_scale * m.x_scale), q, accs),
        }


def accuracy(eval_batches: int) -> None:
    """Perplexity / accuracy of W8A8 forward and W8A8 decode (step) against float32 on the trained models."""
    import bench_quant_accuracy as acc

    rows, out = [], {}
    for name, sections in acc.runs(False).items():
        torch.manual_seed(0)
        task, model, _ = acc.train_or_load(name, sections, acc.RESULTS / "quant_runs")
        calib = [b["input_ids"] for _, b in zip(range(8), task.batches("train", 32, 0), strict=False)]
        w8a8 = quantize_w8a8(model, calib)
        metric = "perplexity" if task.name == "text" else task.metric
        res = {}
        for vname, m, mode in [("float32", model, "forward"), ("float32 step", model, "step"),
                               ("W8A8", w8a8, "forward"), ("W8A8 step", w8a8, "step")]:
            t = time.perf_counter()
            res[vname] = acc.score(task, m, mode, eval_batches)
            res[vname]["eval_s"] = time.perf_counter() - t
        for vname, r in res.items():
            ref = res["float32 step" if "step" in vname else "float32"][metric]
            rows.append({"task": name, "variant": vname, "metric": metric, "value": r[metric],
                         "change": r[metric] - ref, "relative_%": 100 * (r[metric] - ref) / ref})
            print(rows[-1], flush=True)
        out[name] = res
    print_table(rows, ["task", "variant", "metric", "value", "change", "relative_%"])
    write_json("bench_w8a8_accuracy", {"eval_batches": eval_batches, "batch_size": 32, "rows": rows})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeat", type=int, default=2, help="timed runs per case (best taken), after one warm-up")
    p.add_argument("--accuracy", action="store_true", help="score the trained models instead (module docstring)")
    p.add_argument("--eval-batches", type=int, default=16, help="validation batches per variant (--accuracy)")
    args = p.parse_args()
    if min(args.threads, args.tokens, args.repeat, *args.batches) < 1:
        p.error("--threads, --tokens, --repeat and --batches must be >= 1")
    torch.set_num_threads(args.threads)
    if args.accuracy:
        accuracy(args.eval_batches)
        return
    torch.manual_seed(0)
    layers = 4 if args.quick else 24
    model = CausalLM(ModelConfig(d_model=768, pattern=f"mamba*{layers}", vocab_size=50280,
                                 mixer_options={"mamba": {"d_state": 16}})).eval()
    calib = torch.randint(0, 50280, (1, 256), generator=torch.Generator().manual_seed(1))
    variants = {"float32": model, "int8 weight-only": quantize_weights(model), "W8A8": quantize_w8a8(model, [calib])}
    bw = read_bandwidth(args.threads)
    print(f"read bandwidth {bw / 1e9:.2f} GB/s, threads {args.threads}", flush=True)
    rows = []
    for batch in args.batches:
        base = None
        for name, m in variants.items():
            s = time_decode(m, batch, args.tokens, args.repeat)
            base = base or s
            nbytes = weight_bytes(m)
            rows.append({"batch": batch, "variant": name, "tok_per_s": batch / s, "vs_float32": base / s,
                         "weight_MB": nbytes / 1e6, "bound_tok_per_s": batch * bw / nbytes,
                         "fraction_of_bound": (batch / s) / (batch * bw / nbytes)})
            print(rows[-1], flush=True)
    parts = []
    for batch in args.batches:
        t = linear_parts(variants["W8A8"], variants["int8 weight-only"], batch, args.tokens, args.repeat)
        base = t["int8 GEMV (decode_linear)"]
        for name, s in t.items():
            parts.append({"batch": batch, "products": name, "ms_per_step": s * 1e3, "vs_int8_gemv": s / base})
            print(parts[-1], flush=True)
    bw2 = read_bandwidth(args.threads)
    print(f"read bandwidth {bw / 1e9:.2f} GB/s before, {bw2 / 1e9:.2f} GB/s after")
    print_table(rows, ["batch", "variant", "tok_per_s", "vs_float32", "weight_MB", "bound_tok_per_s",
                       "fraction_of_bound"])
    print_table(parts, ["batch", "products", "ms_per_step", "vs_int8_gemv"])
    write_json("bench_w8a8", {"threads": args.threads, "layers": layers, "tokens": args.tokens,
                              "read_bandwidth_Bps": [bw, bw2], "rows": rows, "products": parts})


if __name__ == "__main__":
    main()
