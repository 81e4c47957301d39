"""Induction heads, length extrapolation (Mamba paper, Table 2): train at length 256, test at 2^6 ... 2^20.

The task (:class:`ssmkit.data.copying.InductionHeads`): random tokens of a 16-token vocabulary; the trigger (0)
appears once followed by a target, and the sequence ends with the trigger; the model must output the target.
Recurrent models are evaluated in chunks with their state passed from chunk to chunk (memory bounded by the
chunk, not the length); attention is evaluated in one pass up to ``ATTN_MAX_LEN`` (its cost is quadratic).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ssmkit.data import get_task

from .registry import Budget, Reproduction, Setting
from .report import ReportContext, pct, pyplot, save_figure, table

TRAIN_LEN = 256
VOCAB = 16
#: setting name -> model section (2 layers, d_model 64: the presets)
MODELS: dict[str, dict[str, Any]] = {
    "mamba": {"preset": "mamba"},
    "mamba2": {"preset": "mamba2"},
    "h3": {"preset": "h3"},
    "s4d": {"preset": "s4d"},
    "longconv": {"preset": "longconv", "mixer_options": {"longconv": {"kernel_len": TRAIN_LEN}}},
    "attn": {"preset": "attn"},
}
ATTN_MAX_LEN = 2 ** 12  # attention beyond this is not evaluated (quadratic cost on 2 cores)
CHUNK = 2 ** 14  # recurrent evaluation passes the state across chunks of this many tokens
EVAL_TOKENS = 2 ** 19  # examples per length: EVAL_TOKENS // length, clamped to [MIN_EXAMPLES, MAX_EXAMPLES]
MIN_EXAMPLES, MAX_EXAMPLES = 4, 64


def lengths(quick: bool) -> list[int]:
    return [2 ** k for k in (range(5, 8) if quick else range(6, 21))]


def examples_at(length: int, quick: bool) -> int:
    if quick:
        return 4
    return max(MIN_EXAMPLES, min(MAX_EXAMPLES, EVAL_TOKENS // length))


@torch.no_grad()
def last_logits(model: Any, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Logits at the last position of ``ids`` (batch, length), feeding the model ``chunk`` tokens at a time
    with its state passed on: (batch, vocab). Memory is bounded by the chunk (attention: by its KV cache)."""
    state, last = None, None
    for piece in ids.split(chunk, dim=1):
        out = model(piece, state, return_final_state=True)
        state, last = out.state, out.logits[:, -1]
    return last


@torch.no_grad()
def accuracy_at(model: Any, length: int, n: int, *, chunk: int = CHUNK, seed: int = 0) -> float:
    """Accuracy of ``model`` on ``n`` test sequences of ``length`` tokens (one scored position each), in
    batches of at most 8 sequences, each fed in chunks of ``chunk`` tokens with the state passed on."""
    task = get_task("induction_heads", vocab_size=VOCAB, seq_len=length, num_train=1, num_val=1, num_test=n)
    was = model.training
    model.eval()
    correct = 0
    try:
        for batch in task.batches("test", min(8, n), seed):
            last = last_logits(model, batch["input_ids"], chunk)
            correct += int((last[:, :VOCAB].argmax(-1) == batch["labels"][:, -1]).sum())
    finally:
        model.train(was)
    return correct / n


def evaluate(model: Any, setup: Any, setting: Setting, quick: bool) -> dict[str, Any]:
    """Accuracy at every test length (attention only up to ``ATTN_MAX_LEN``, one pass)."""
    attn = setting.meta.get("model") == "attn"
    cap = 2 ** 6 if quick else ATTN_MAX_LEN
    acc: dict[str, float | None] = {}
    for length in lengths(quick):
        if attn and length > cap:
            acc[str(length)] = None
            continue
        chunk = length if attn else (64 if quick else CHUNK)
        acc[str(length)] = accuracy_at(model, length, examples_at(length, quick), chunk=chunk)
    return {"accuracy_by_length": acc, "attention_max_length": cap if attn else None}


def settings(d_model: int, seq_len: int, train: dict[str, Any], task_extra: dict[str, Any]) -> tuple[Setting, ...]:
    task = {"name": "induction_heads", "vocab_size": VOCAB, "seq_len": seq_len, **task_extra}
    return tuple(Setting(name, {"task": task, "model": {**model, "d_model": d_model}, "train": train},
                         meta={"model": name})
                 for name, model in MODELS.items())


def quick() -> Budget:
    return Budget(settings(16, 32, {"steps": 2, "batch_size": 8, "warmup_steps": 1},
                           {"num_train": 64, "num_val": 16, "num_test": 16}),
                  seeds=1, minutes=0.3, note="Tiny models trained 2 steps at length 32, tested at 32-128.")


FULL_TRAIN = {"steps": 1500, "batch_size": 32, "lr": 2e-3, "warmup_steps": 100}


def full() -> Budget:
    return Budget(
        settings(64, TRAIN_LEN, FULL_TRAIN, {"num_train": 50000}), seeds=2, minutes=120,
        note=("The paper's models (2 layers, d_model 64, vocabulary 16, trained at length 256); 1,500 steps of "
              "32 sequences instead of the paper's 25-50 epochs of 8,192 steps of 8. Test lengths 2^6-2^20 with "
              f"{MIN_EXAMPLES}-{MAX_EXAMPLES} sequences each (2^20 / length, clamped); attention up to "
              f"2^{int(math.log2(ATTN_MAX_LEN))} only. Runtime estimated, not measured: training ~10 min per run "
              "and ~5-10 min of evaluation per recurrent run on the loaded 2-core machine (inference measured "
              "there at 17-44K tokens/s on one thread, 2^18 tokens in chunks of 2^14, 0.6-0.7 GB peak)."))


def report(ctx: ReportContext, directory: Any) -> str:
    """Accuracy by test length (mean over seeds) as a table and a plot, like the paper's Table 2."""
    by = ctx.by_setting()
    names = [n for n in MODELS if n in by]
    if not names:
        return ""
    lens = lengths(ctx.quick)
    means: dict[str, list[float]] = {}
    for n in names:
        row = []
        for length in lens:
            vals = [r["extra"]["accuracy_by_length"].get(str(length)) for r in by[n]]
            vals = [v for v in vals if v is not None]
            row.append(sum(vals) / len(vals) if vals else math.nan)
        means[n] = row
    head = ["model", *(f"2^{int(math.log2(x))}" for x in lens)]
    rows = [[n, *(pct(v) for v in means[n])] for n in names]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for n in names:
        ax.plot([math.log2(x) for x in lens], [100 * v for v in means[n]], marker="o", ms=3, label=n)
    train_len = ctx.budget.settings[0].sections["task"]["seq_len"]
    ax.axvline(math.log2(train_len), color="k", ls=":", lw=0.8, label="train length")
    ax.axhline(100 / (VOCAB - 1), color="gray", ls="--", lw=0.8, label="chance")
    ax.set_xlabel("test length (log2 tokens)")
    ax.set_ylabel("accuracy %")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=7, ncol=2)
    png = save_figure(fig, directory, "induction.png")
    return "\n".join([
        "## Accuracy by test length (ours, mean over seeds)", "",
        table(head, rows), "",
        "`-`: not evaluated (attention beyond its cap: quadratic time). Recurrent models are evaluated in chunks "
        f"of {CHUNK} tokens (full budget) with the state passed on, so memory does not grow with the length.", "",
        f"![induction heads extrapolation]({png})"])


REPRODUCTION = Reproduction(
    name="induction",
    title="Induction heads: Mamba extrapolates from 256 to 1M tokens (Mamba, Table 2)",
    claim=("Gu & Dao (2023), Table 2: 2-layer models (d_model 64) trained on induction heads at length 256 "
           "(vocabulary 16) and tested at 2^6 ... 2^20 tokens. Mamba stays at 100% up to 2^20 = 1,048,576 "
           "tokens (4,000x the training length); attention with absolute, rotary or xPos positions fails "
           "beyond about twice the training length (and runs out of memory at the longest lengths); H3 and "
           "Hyena degrade beyond the training length."),
    paper=("Gu & Dao, *Mamba* (2023), Table 2 (a plot of accuracy against test length; full numbers in its "
           "Table 11), in words: Mamba 100% at every length 2^6-2^20; MHA-Abs, MHA-RoPE, MHA-xPos about "
           "100% up to the training length 2^8, good to about 2^9, near chance beyond; H3 and Hyena below "
           "100% already near the training length and falling with length."),
    quick=quick,
    full=full,
    evaluate=evaluate,
    report=report,
)
