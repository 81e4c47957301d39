"""Decode speed of the quantized models against float32 and the memory-bandwidth bound, in one process.

    nice -n 10 python benchmarks/bench_decode_quant.py [--quick] [--threads N] [--tokens T] [--clock wall|cpu]

Model: a 130M-shaped Mamba (d_model 768, 24 layers, vocab 50280, random weights) built with ssmkit. For float32,
``quantize_weights`` int8, int4 (group 32 and 64), the same with ``activations="int8"`` (``a8``: integer
products on activations quantized per block of 32) and float32 with int8 SSM states, it times T greedy decode
steps at batch 1 (``model.step``, the fused one-launch path) and reports tokens/s, the ratio to float32, the
bytes of weights one token reads, and the fraction of the bound: the read bandwidth measured in the same process
(:func:`read_bandwidth`: the best 4-stream read of a 1 GiB float32 buffer with the same threads) divided by those
bytes. ``--quick``: 4
layers. Then the same for a Mamba-2 of the same width and depth (fused too since the Mamba-2 stack kernel;
``bench_decode_mamba2.py`` compares it with the block-by-block step), with the speed of
its linear layers alone (each called once per token, nothing in between), and a prefill of ``--prefill`` tokens
(default 512) for float32, W8A8 (integer products), int8 and int4. vs_float32 is against the Mamba float32 decode
row (the prefill rows: against the float32 prefill). ``--clock cpu`` times with the process's CPU time
(``time.process_time``, every thread) instead of the wall clock, so on a loaded machine time slices lost to other
processes do not count (only with ``--threads 1``: with more, CPU time would add up the threads). Writes
benchmarks/results/bench_decode_quant.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

from ssmkit.infer.quantize import quantize_weights  # noqa: E402
from ssmkit.infer.state_quant import quantize_state, step_int8_state  # noqa: E402
from ssmkit.infer.w8a8 import quantize_w8a8  # noqa: E402
from ssmkit.models import CausalLM, ModelConfig  # noqa: E402


def read_bandwidth(threads: int, gib: float = 1.0, repeat: int = 5, nbytes: int | None = None) -> float:
    """Bytes per second of the best of ``repeat`` passes over a float32 buffer of ``nbytes`` (default ``gib`` GiB)
    by ``threads`` workers, each reading its share as 4 prefetched streams (:mod:`probe_bandwidth`; a
    ``torch.sum`` pass, the probe before, read 10-20% less). Pass the weight bytes of the model as ``nbytes``:
    a working set that fits partly in the last-level cache is re-read from it every token."""
    from probe_bandwidth import stream_read_bandwidth

    return stream_read_bandwidth(threads, nbytes if nbytes is not None else int(gib * 2**30), repeat, clock=CLOCK)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer a decode step reads (the embedding: one row)."""
    total = 0
    emb = model.backbone.embedding.weight
    seen = {emb.data_ptr()}
    head = getattr(model.lm_head, "weight", None)
    tied = head is not None and head.data_ptr() == emb.data_ptr()
    total += emb.shape[1] * emb.element_size() + (emb.numel() * emb.element_size() if tied else 0)
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


CLOCK = time.perf_counter  # --clock cpu: time.process_time


def time_decode(model, tokens: int, int8_state: bool = False, repeat: int = 3) -> float:
    """Best seconds per token over ``repeat`` runs of ``tokens`` greedy steps from a zero state."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeat + 1):  # the first run warms the kernels up
            state = model.init_state(1)
            if int8_state:
                state = quantize_state(state)
            tok = torch.zeros(1, dtype=torch.long)
            t = CLOCK()
            for _ in range(tokens):
                if int8_state:
                    logits, state = step_int8_state(model, tok, state)
                else:
                    logits, state = model.step(tok, state)
                tok = logits.argmax(-1)
            best = min(best, (CLOCK() - t) / tokens)
    return best


def time_linears(model, tokens: int, repeat: int = 3) -> float:
    """Best seconds per token of only the model's linear layers at batch 1 (each called on a zero input, in
    block order): what a step would cost if everything between the matrix products were free."""
    linears = [m for n, m in model.named_modules() if hasattr(m, "in_features") and not n.endswith("dt_proj")]
    xs = [torch.zeros(1, m.in_features) for m in linears]
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeat + 1):
            t = CLOCK()
            for _ in range(tokens):
                for m, x in zip(linears, xs, strict=True):
                    m(x)
            best = min(best, (CLOCK() - t) / tokens)
    return best


def time_prefill(model, ids: torch.Tensor, repeat: int = 2) -> float:
    """Best seconds of the backbone forward over ``ids`` (1, L) plus the LM head on the last position."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeat + 1):
            t = CLOCK()
            hidden, _ = model.backbone(ids, return_final_state=True, input_name="input_ids")
            model.lm_head(hidden[:, -1])
            best = min(best, CLOCK() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3, help="timed runs per case (best taken), after one warm-up")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = p.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu needs --threads 1 (CPU time adds up the threads)")
    if min(args.threads, args.tokens, args.prefill, args.repeat) < 1:
        p.error("--threads, --tokens, --prefill and --repeat must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers = 4 if args.quick else 24
    model = CausalLM(ModelConfig(d_model=768, pattern=f"mamba*{layers}", vocab_size=50280,
                                 mixer_options={"mamba": {"d_state": 16}})).eval()
    variants = {"float32": (model, False), "int8": (quantize_weights(model), False),
                "int4-g32": (quantize_weights(model, bits=4, group_size=32), False),
                "int4-g64": (quantize_weights(model, bits=4, group_size=64), False),
                "int8 a8": (quantize_weights(model, activations="int8"), False),
                "int4-g32 a8": (quantize_weights(model, bits=4, group_size=32, activations="int8"), False),
                "int4-g64 a8": (quantize_weights(model, bits=4, group_size=64, activations="int8"), False),
                "float32 + int8-state": (model, True)}
    bw = read_bandwidth(args.threads)
    print(f"read bandwidth {bw / 1e9:.1f} GB/s", flush=True)
    rows, base = [], None
    for name, (m, int8_state) in variants.items():
        s = time_decode(m, args.tokens, int8_state, args.repeat)
        base = base or s
        nbytes = weight_bytes(m)
        bound = bw / nbytes
        rows.append({"variant": name, "tok_per_s": 1 / s, "vs_float32": base / s, "weight_MB": nbytes / 1e6,
                     "bound_tok_per_s": bound, "fraction_of_bound": (1 / s) / bound})
        print(rows[-1], flush=True)
    # Mamba-2 (one launch per step too): its step against its linear layers alone
    model2 = CausalLM(ModelConfig(d_model=768, pattern=f"mamba2*{layers}", vocab_size=50280)).eval()
    for name, m in {"mamba2 float32": model2, "mamba2 int8": quantize_weights(model2),
                    "mamba2 int4-g32": quantize_weights(model2, bits=4, group_size=32),
                    "mamba2 int8 a8": quantize_weights(model2, activations="int8"),
                    "mamba2 int4-g32 a8": quantize_weights(model2, bits=4, group_size=32, activations="int8")
                    }.items():
        s, lin = time_decode(m, args.tokens, repeat=args.repeat), time_linears(m, args.tokens, args.repeat)
        nbytes = weight_bytes(m)
        rows.append({"variant": name, "tok_per_s": 1 / s, "vs_float32": base / s, "weight_MB": nbytes / 1e6,
                     "bound_tok_per_s": bw / nbytes, "fraction_of_bound": (1 / s) / (bw / nbytes),
                     "linears_only_tok_per_s": 1 / lin})
        print(rows[-1], flush=True)
    # prefill: float32 against W8A8 (integer products) and the weight-only models (which dequantize for a prefill)
    ids = torch.randint(0, 50280, (1, args.prefill), generator=torch.Generator().manual_seed(1))
    w8a8 = quantize_w8a8(model, [ids[:, :256]])
    pre_base = None
    for name, m in {"float32": model, "W8A8": w8a8, "int8": variants["int8"][0],
                    "int4-g32": variants["int4-g32"][0]}.items():
        s = time_prefill(m, ids, args.repeat)
        pre_base = pre_base or s
        rows.append({"variant": f"prefill {args.prefill}: {name}", "tok_per_s": args.prefill / s,
                     "vs_float32": pre_base / s})
        print(rows[-1], flush=True)
    bw2 = read_bandwidth(args.threads)
    print(f"read bandwidth {bw / 1e9:.1f} GB/s before, {bw2 / 1e9:.1f} GB/s after; threads {args.threads}")
    print_table(rows, ["variant", "tok_per_s", "vs_float32", "weight_MB", "bound_tok_per_s", "fraction_of_bound",
                       "linears_only_tok_per_s"])
    write_json("bench_decode_quant", {"threads": args.threads, "clock": args.clock, "layers": layers,
                                      "tokens": args.tokens,
                                      "read_bandwidth_Bps": [bw, bw2], "rows": rows})


if __name__ == "__main__":
    main()
