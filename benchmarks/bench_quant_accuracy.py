"""Accuracy of ssmkit's quantization options on trained models (not random ones).

    nice -n 10 python benchmarks/bench_quant_accuracy.py [--quick] [--runs DIR] [--threads N]

Trains three small Mamba models with ssmkit (or reuses them from ``--runs``, default
benchmarks/results/quant_runs): a byte-level LM on the bundled Tiny Shakespeare, selective copying and MQAR. Then
scores each on its validation split as
- float32: the trained model's forward;
- int8: ``quantize_weights(model)`` (weight-only, per-row scales);
- int4-g32 / int4-g64: ``quantize_weights(model, bits=4, group_size=32 / 64)``;
- int8 a8 / int4-g32 a8 / int4-g64 a8: the same with ``activations="int8"`` (each layer's input quantized per
  block of 32 to int8, integer products, as llama.cpp's q8_0 / q4_0 decode does);
- W8A8: ``quantize_w8a8(model, 8 training batches)`` (static activation scales, percentile clipping of the
  SSM input, Hadamard rotation before out_proj, integer products);
- float32 step / int8-state: the model stepped token by token (teacher forcing), with the float state or with
  the SSM states stored as int8 between steps (``step_int8_state``); the step row is the baseline for the
  int8-state row (same computation apart from the state's storage).
Reports perplexity (LM) and accuracy (tasks), and the change against float32.
Writes benchmarks/results/bench_quant_accuracy.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

from ssmkit.data.corpora import tiny_shakespeare_path  # noqa: E402
from ssmkit.infer.quantize import quantize_weights  # noqa: E402
from ssmkit.infer.state_quant import dequantize_state, quantize_state  # noqa: E402
from ssmkit.infer.w8a8 import quantize_w8a8  # noqa: E402
from ssmkit.models.outputs import ModelState  # noqa: E402
from ssmkit.train import Trainer, resolve_run  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def runs(quick: bool) -> dict[str, dict]:
    lm_steps, copy_steps, mqar_steps = (60, 60, 60) if quick else (600, 600, 1500)
    return {
        "shakespeare": {
            "task": {"name": "text", "path": str(tiny_shakespeare_path()), "seq_len": 128},
            "model": {"preset": "mamba", "d_model": 128, "pattern": "mamba*4"},
            "train": {"steps": lm_steps, "batch_size": 16, "lr": 3e-3, "eval_every": 0, "save_every": 0}},
        "selective_copy": {
            "task": {"name": "selective_copy", "vocab_size": 10, "seq_len": 32, "num_tokens": 4,
                     "num_train": 20000},
            "model": {"preset": "mamba", "d_model": 64},
            "train": {"steps": copy_steps, "batch_size": 32, "lr": 3e-3, "warmup_steps": 50, "eval_every": 0,
                      "save_every": 0}},
        "mqar": {
            "task": {"name": "mqar", "vocab_size": 64, "seq_len": 32, "num_pairs": 4, "num_train": 20000},
            "model": {"preset": "mamba", "d_model": 128},
            "train": {"steps": mqar_steps, "batch_size": 32, "lr": 3e-3, "eval_every": 0, "save_every": 0}},
    }


def train_or_load(name: str, sections: dict, root: Path):
    from ssmkit.models.pretrained import load_pretrained

    setup = resolve_run(sections)
    run_dir = root / name
    ckpt = run_dir / "checkpoints"
    if ckpt.is_dir() and any(ckpt.iterdir()):
        latest = sorted(p for p in ckpt.iterdir() if p.is_dir())[-1]
        return setup.task, load_pretrained(latest).eval(), 0.0
    t = time.perf_counter()
    trainer = Trainer(setup, str(run_dir))
    trainer.train()
    return setup.task, trainer.model.eval(), time.perf_counter() - t


def zero_rows(state: ModelState, rows: torch.Tensor) -> ModelState:
    """``state`` with the rows where ``rows`` (batch,) is True set to zero."""
    keep = (~rows).to(torch.float32)
    return ModelState([s.map(lambda x: x * keep.view(-1, *[1] * (x.ndim - 1))) for s in state.layers])


def stepped_logits(model, ids: torch.Tensor, reset: torch.Tensor | None, int8_state: bool) -> torch.Tensor:
    """(batch, length, vocab) logits of stepping through ``ids`` (teacher forcing); a reset zeroes a row's
    state before its step."""
    batch, length = ids.shape
    state = model.init_state(batch)
    qstate = quantize_state(state) if int8_state else None
    out = []
    for t in range(length):
        if int8_state:
            state = dequantize_state(qstate)
        if reset is not None and bool(reset[:, t].any()):
            state = zero_rows(state, reset[:, t])
        logits, state = model.step(ids[:, t], state)
        if int8_state:
            qstate = quantize_state(state)
        out.append(logits)
    return torch.stack(out, 1)


@torch.no_grad()
def score(task, model, mode: str, max_batches: int) -> dict[str, float]:
    ev = task.evaluator()
    for i, batch in enumerate(task.batches("val", 32, 0)):
        if i >= max_batches:
            break
        ids, reset = batch["input_ids"], batch.get("reset")
        if mode == "forward":
            logits = model(ids, reset=reset).logits if reset is not None else model(ids).logits
        else:
            logits = stepped_logits(model, ids, reset, mode == "int8_state")
        ev.update(logits, batch)
    return ev.compute()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few training steps, few eval batches (a smoke run)")
    p.add_argument("--runs", type=Path, default=RESULTS / "quant_runs", help="where the trained runs live")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-batches", type=int, default=0, help="validation batches per variant (0: 16, quick 2)")
    p.add_argument("--variants", default="", help="comma-separated variants to score (default: all; float32 is "
                                                  "always scored, the baseline; int8-state needs float32 step)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n_eval = args.eval_batches or (2 if args.quick else 16)
    rows, out = [], {"eval_batches": n_eval, "batch_size": 32, "tasks": {}}
    for name, sections in runs(args.quick).items():
        torch.manual_seed(0)
        task, model, train_s = train_or_load(name, sections, args.runs)
        calib = [b["input_ids"] for _, b in zip(range(8), task.batches("train", 32, 0), strict=False)]
        variants = {
            "float32": (model, "forward"),
            "int8": (quantize_weights(model), "forward"),
            "int4-g32": (quantize_weights(model, bits=4, group_size=32), "forward"),
            "int4-g64": (quantize_weights(model, bits=4, group_size=64), "forward"),
            "int8 a8": (quantize_weights(model, activations="int8"), "forward"),
            "int4-g32 a8": (quantize_weights(model, bits=4, group_size=32, activations="int8"), "forward"),
            "int4-g64 a8": (quantize_weights(model, bits=4, group_size=64, activations="int8"), "forward"),
            "W8A8": (quantize_w8a8(model, calib), "forward"),
            "float32 step": (model, "step"),
            "int8-state": (model, "int8_state"),
        }
        if args.variants:
            keep = {"float32", *args.variants.split(",")}
            unknown = keep - set(variants)
            if unknown:
                raise SystemExit(f"--variants: unknown {sorted(unknown)}; known: {', '.join(variants)}")
            variants = {k: v for k, v in variants.items() if k in keep}
        metric = "perplexity" if task.name == "text" else task.metric
        res = {}
        for vname, (m, mode) in variants.items():
            t = time.perf_counter()
            res[vname] = score(task, m, mode, n_eval)
            res[vname]["eval_s"] = time.perf_counter() - t
        base = {"forward": res["float32"][metric], "step": res.get("float32 step", {}).get(metric, math.nan)}
        for vname, r in res.items():
            ref = base["step"] if vname == "int8-state" else base["forward"]
            change = r[metric] - ref
            rel = change / ref if ref else math.nan
            rows.append({"task": name, "variant": vname, metric if metric == "perplexity" else "accuracy":
                         f"{r[metric]:.4f}", "change": f"{change:+.4f}", "relative": f"{100 * rel:+.2f}%"})
        out["tasks"][name] = {"metric": metric, "train_seconds": train_s, "config": sections, "results": res}
    for name in out["tasks"]:
        part = [r for r in rows if r["task"] == name]
        print_table(part, list(part[0]))
    write_json("bench_quant_accuracy", out)


if __name__ == "__main__":
    main()
