"""Speculative decoding on trained byte-level Tiny Shakespeare models: plain greedy vs chain vs tree drafts (and a
self-draft), in one process so the ratios are fair.

    python benchmarks/bench_speculative.py --target RUN --draft RUN [--target-hybrid RUN] [--new 128]
        [--num-draft 3,4] [--tree '2,1 2,2']
    python benchmarks/bench_speculative.py --train DIR     # first trains a target and a draft into DIR (nice -n 10)

Prompts are the first ``--prompt`` tokens of validation rows. For batch 1 and 4 at ``--threads`` threads it
reports, best of ``--repeat`` interleaved runs: new tokens per second with the prompt's prefill and the speedup
over plain greedy (wall time); the same for the decoding alone (each case's time minus the prefills it contains,
which are timed as cases of their own in the same loop); the speedup in this process's CPU time; the tokens a row
gains per target pass (the acceptance length) and the acceptance rate; and whether the tokens equal plain
greedy's: float32 rows identical, and an exact check in float64 (models cast to float64). ``--target-hybrid``
adds a second target (a Mamba-2 + attention hybrid, say) with the same draft: plain (its fused hybrid step) vs
chain (the draft's chain in one launch, the target's fused verify pass: ssmkit.infer.spec_hybrid). Then the
parts of a round (bench_speculative_parts.py). Writes benchmarks/results/bench_speculative_t<threads>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_bounds, print_table, write_json  # noqa: E402

CORPUS = "src/ssmkit/data/corpora/tinyshakespeare.txt"
TRAIN = {  # name -> model and training flags (byte-level text task, 128-token rows; later flags win)
    "target": ["--model", "mamba", "--set", "model.d_model=512", "--set", "model.pattern=mamba*12",
               "--set", "model.n_layers=12", "--set", "train.steps=250", "--set", "train.batch_size=8",
               "--set", "train.lr=2e-3", "--set", "train.eval_batches=24", "--set", "train.save_every=25"],
    "draft": ["--model", "mamba", "--set", "model.d_model=128", "--set", "model.pattern=mamba*2",
              "--set", "model.n_layers=2", "--set", "train.steps=600"],
}


COLUMNS = ["case", "batch", "tokens_per_s", "speedup_vs_plain", "decode_tokens_per_s", "decode_speedup_vs_plain",
           "speedup_vs_best_chain", "cpu_speedup_vs_plain", "tokens_per_pass", "acceptance_rate",
           "rows_identical_fp32"]
PART_COLUMNS = ["part", "batch", "wall_ms", "wall_ms_median", "cpu_ms", "plain_steps"]


def train(root: Path) -> tuple[Path, Path]:
    """Train the target and the draft (the settings in TRAIN) into root/target and root/draft, one at a time."""
    repo = Path(__file__).resolve().parent.parent
    for name, flags in TRAIN.items():
        latest = root / name / "checkpoints" / "latest"
        steps = next(f.split("=")[1] for f in flags if f.startswith("train.steps="))
        if latest.exists() and latest.read_text().strip() == f"step-{int(steps):08d}":
            continue  # done
        resume = ["--resume"] if latest.exists() else []  # finishes an interrupted run
        cmd = ["nice", "-n", "10", sys.executable, "-m", "ssmkit.cli", "train", "--task", "text",
               "--set", f"task.path={repo / CORPUS}", "--set", "task.seq_len=128", "--set", "train.batch_size=16",
               "--set", "train.lr=3e-3", "--set", "train.eval_every=0", "--set", "train.threads=1", *flags,
               "--run-dir", str(root / name), *resume, "--quiet"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return root / "target", root / "draft"


def distill(target_run: str, draft_run: str, out: Path, steps: int, batch: int = 8, lr: float = 1e-3,
            cosine: bool = False, save_every: int = 0) -> Path:
    """Fine-tune the draft toward the target's next-token distribution (KL(target || draft) on the training split's
    128-token rows, the target's softmax as soft labels; Adam, ``steps`` steps of ``batch`` rows): the draft is
    trained on the same data, with the target as the teacher. Writes the run dir ``out`` (config copied from the
    draft's run, the weights as its latest checkpoint). Prints the teacher-forced greedy agreement (draft argmax ==
    target argmax) on 8 validation rows before and after. ``cosine``: the learning rate decays from ``lr`` to
    ``lr / 10`` over the steps (cosine); ``save_every``: also writes the weights every that many steps (a long run
    stopped early keeps its last one)."""
    import shutil

    import torch.nn.functional as F

    from ssmkit.models import save_pretrained

    task, target = load(target_run)
    _, model = load(draft_run)

    @torch.no_grad()
    def agreement() -> float:
        x = next(iter(task.batches("val", 8, 0)))["input_ids"]
        return float((model(x).logits.argmax(-1) == target(x).logits.argmax(-1)).double().mean())

    def save(step: int) -> None:
        for name in ("config.json", "config.yaml"):
            shutil.copy(Path(draft_run) / name, out / name)
        ckpt = save_pretrained(model, out / "checkpoints" / f"step-{step:08d}")
        (ckpt / "trainer_state.json").write_text(json.dumps(  # a complete checkpoint for load_run (no optimizer)
            {"ssmkit_trainer_format": 1, "step": step, "distilled_from": {"draft": draft_run, "target": target_run},
             "lr": lr, "cosine": cosine, "batch": batch}))
        (out / "checkpoints" / "latest").write_text(f"step-{step:08d}")

    import math

    print(f"greedy agreement with the target before: {agreement():.4f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t0 = time.perf_counter()
    model.train()
    for step, b in enumerate(task.batches("train", batch, 1)):
        if step == steps:
            break
        if cosine:
            for g in opt.param_groups:
                g["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        if save_every and step and step % save_every == 0:
            model.eval()
            save(step)
            print(f"step {step}: saved; agreement {agreement():.4f}; {time.perf_counter() - t0:.0f} s", flush=True)
            model.train()
        x = b["input_ids"]
        with torch.no_grad():
            teacher = F.log_softmax(target(x).logits.float(), -1)
        loss = F.kl_div(F.log_softmax(model(x).logits.float(), -1), teacher, log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            print(f"step {step} KL {loss.item() / x.shape[1]:.4f}", flush=True)
    model.eval()
    print(f"greedy agreement with the target after {steps} steps: {agreement():.4f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    save(steps)
    return out


def load(run: str):
    from ssmkit.cli.common import load_run

    _, _, task, model, _ = load_run(run)
    return task, model.eval()


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, this process's CPU seconds, fn's result)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


@torch.no_grad()
def bench(target, draft, prompts: torch.Tensor, new: int, ks: list[int], trees: list[tuple[int, int]], repeat: int,
          self_layers: int = 0, label: str = "", other_draft=None, other_name: str = "") -> list[dict]:
    """Plain greedy, chains, trees (and a self-draft if ``self_layers``; chains with ``other_draft`` too, named
    ``other_name``), with the prompt's prefill (target; draft) timed as cases of their own in the same interleaved
    loop: tokens/s with the prefill, and decode-only tokens/s (the case's best time minus the best prefills it
    contains; ``other_draft`` must have the draft's shape, so the draft's prefill stands for its own)."""
    from ssmkit.infer import generate, self_draft, speculative_generate
    from ssmkit.infer.generate import _prefill
    from ssmkit.infer.prompts import parse_prompts

    parsed = parse_prompts(prompts, vocab_size=target.config.vocab_size, device=prompts.device)
    cases = {"plain": lambda: (generate(target, prompts, new), None)}
    for k in ks:
        cases[f"chain k={k}"] = lambda k=k: speculative_generate(target, prompts, new, draft_model=draft,
                                                                 num_draft=k)
    for k in ks if other_draft is not None else ():
        cases[f"{other_name} chain k={k}"] = lambda k=k: speculative_generate(
            target, prompts, new, draft_model=other_draft, num_draft=k)
    for b, d in trees:
        cases[f"tree {b},{d}"] = lambda t=(b, d): speculative_generate(target, prompts, new, draft_model=draft,
                                                                       tree=t)
    if self_layers:
        mine = self_draft(target, self_layers)
        cases[f"self-draft {self_layers}L k={ks[0]}"] = lambda: speculative_generate(
            target, prompts, new, draft_model=mine, num_draft=ks[0])
    prefill = {"prefill target": lambda: _prefill(target, parsed), "prefill draft": lambda: _prefill(draft, parsed)}
    best = {name: float("inf") for name in [*cases, *prefill]}
    cpu = dict(best)
    outs: dict[str, tuple] = {}
    for fn in cases.values():  # warm-up (kernel compilation)
        fn()
    for _ in range(repeat):  # interleaved, so load changes hit every case alike
        for name, fn in [*cases.items(), *prefill.items()]:
            t, c, outs[name] = timed(fn)
            best[name], cpu[name] = min(best[name], t), min(cpu[name], c)
    pre_t, pre_d = best["prefill target"], best["prefill draft"]
    pre_self = pre_t  # a self-draft also prefills its first layers: not subtracted (its decode figure is a lower bound)
    print(f"{label}batch {prompts.shape[0]}: prefill of the {prompts.shape[1]}-token prompt {1e3 * pre_t:.2f} ms "
          f"(target), {1e3 * pre_d:.2f} ms (draft); plain decoding {1e3 * (best['plain'] - pre_t) / (new - 1):.3f} "
          f"ms per token after it")
    plain_tokens = outs["plain"][0]
    best_chain = min(best[n] for n in cases if n.startswith("chain"))
    n_new = prompts.shape[0] * new
    n_decoded = prompts.shape[0] * (new - 1)  # the prefill's pass gives each row its first new token
    rows = []
    for name in cases:
        tokens, stats = outs[name]
        pre = pre_t if name == "plain" else pre_self if name.startswith("self") else pre_t + pre_d
        rows.append({
            "case": label + name, "batch": prompts.shape[0],
            "tokens_per_s": n_new / best[name],
            "speedup_vs_plain": best["plain"] / best[name],
            "decode_tokens_per_s": n_decoded / (best[name] - pre),
            "decode_speedup_vs_plain": (best["plain"] - pre_t) / (best[name] - pre),
            "speedup_vs_best_chain": best_chain / best[name],
            "cpu_speedup_vs_plain": cpu["plain"] / cpu[name],
            "tokens_per_pass": None if stats is None else stats.tokens_per_pass,
            "acceptance_rate": None if stats is None else stats.acceptance_rate,
            "rows_identical_fp32": int((tokens == plain_tokens).all(1).sum()),
            "prefill_ms_target": 1e3 * pre_t, "prefill_ms_draft": 1e3 * pre_d,
        })
    return rows


def read_bandwidth(n_bytes: int) -> float:
    """GB/s of one thread summing a float32 array of ``n_bytes`` (best of 10): the rate a decode step can read
    weights of that size at (L3 for the 82 MB target on this machine, DRAM for 1 GB)."""
    import numba as nb
    import numpy as np

    @nb.njit(fastmath=True)
    def total(x):
        acc = np.float32(0.0)
        for i in range(x.shape[0]):
            acc += x[i]
        return acc

    x = np.random.rand(n_bytes // 4).astype(np.float32)
    total(x)
    return n_bytes / min(timed(lambda: total(x))[1] for _ in range(10)) / 1e9


def exact_check(target, draft, prompts: torch.Tensor, new: int, k: int, tree: tuple[int, int] | None) -> dict:
    """Chain (and tree) tokens equal plain greedy's with both models in float64."""
    import copy

    from ssmkit.infer import generate, speculative_generate

    t64, d64 = copy.deepcopy(target).double(), copy.deepcopy(draft).double()
    want = generate(t64, prompts, new)
    chain = speculative_generate(t64, prompts, new, draft_model=d64, num_draft=k)[0]
    out = {"rows": prompts.shape[0], "new_tokens": new, "chain_identical": bool(torch.equal(chain, want))}
    if tree is not None:
        out["tree_identical"] = bool(torch.equal(speculative_generate(t64, prompts, new, draft_model=d64,
                                                                      tree=tree)[0], want))
    return out


def main() -> None:
    from bench_speculative_parts import components, hybrid_components

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", help="target run directory (pure Mamba: the fused loop)")
    ap.add_argument("--draft", help="draft run directory")
    ap.add_argument("--draft-distilled", metavar="RUN", help="a second draft of the same shape (e.g. the draft "
                    "distilled from the target, --distill): chains with it too, for the pure-Mamba target")
    ap.add_argument("--target-hybrid", metavar="RUN", help="also a hybrid target (e.g. Mamba-2 + attention) with "
                    "the same draft: plain vs chain (the fused hybrid verify pass)")
    ap.add_argument("--train", metavar="DIR", help="train a target and a draft into DIR first (skips done ones)")
    ap.add_argument("--distill", metavar="DIR", help="only fine-tune --draft toward --target (distill()) into DIR")
    ap.add_argument("--distill-steps", type=int, default=150)
    ap.add_argument("--distill-lr", type=float, default=1e-3)
    ap.add_argument("--distill-cosine", action="store_true", help="cosine decay of the rate to a tenth")
    ap.add_argument("--distill-save-every", type=int, default=0)
    ap.add_argument("--new", type=int, default=128, help="new tokens per row")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--num-draft", default="3,4", help="chain lengths k, comma-separated")
    ap.add_argument("--tree", default="2,1 2,2", help="trees B,D, space-separated")
    ap.add_argument("--self-layers", type=int, default=2, help="layers of the self-draft (0: none)")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-parts", action="store_true", help="skip the per-part timings")
    args = ap.parse_args()
    if args.train:
        args.target, args.draft = (str(p) for p in train(Path(args.train)))
    if not (args.target and args.draft):
        ap.error("give --target and --draft run directories, or --train DIR")
    torch.set_num_threads(args.threads)
    if args.distill:
        distill(args.target, args.draft, Path(args.distill), args.distill_steps, lr=args.distill_lr,
                cosine=args.distill_cosine, save_every=args.distill_save_every)
        return
    ks = [int(v) for v in args.num_draft.split(",")]
    trees = [tuple(int(v) for v in t.split(",")) for t in args.tree.split()]
    batches = [int(v) for v in args.batches.split(",")]
    load_avg = [os.getloadavg()]
    task, target = load(args.target)
    _, draft = load(args.draft)
    distilled = load(args.draft_distilled)[1] if args.draft_distilled else None
    hybrid = load(args.target_hybrid)[1] if args.target_hybrid else None
    val = next(iter(task.batches("val", 4, 0)))["input_ids"][:, : args.prompt]
    rows, parts = [], []
    for b in batches:
        rows += bench(target, draft, val[:b].contiguous(), args.new, ks, trees, args.repeat, args.self_layers,
                      other_draft=distilled, other_name="distilled")
        load_avg.append(os.getloadavg())
        if hybrid is not None:
            rows += bench(hybrid, draft, val[:b].contiguous(), args.new, ks, [], args.repeat, label="hybrid ")
            load_avg.append(os.getloadavg())
    print_table(rows, COLUMNS)
    if not args.no_parts:
        for b in batches:
            parts += components(target, draft, val[:b].contiguous(), ks[-1], trees[-1])
            if hybrid is not None:
                parts += [{**r, "part": "hybrid: " + r["part"]}
                          for r in hybrid_components(hybrid, draft, val[:b].contiguous(), ks[-1])]
        print_table(parts, PART_COLUMNS)
    exact = {"target": exact_check(target, draft, val, min(args.new, 48), ks[-1], trees[-1] if trees else None)}
    if distilled is not None:
        exact["distilled draft"] = exact_check(target, distilled, val, min(args.new, 48), ks[-1], None)
    if hybrid is not None:
        exact["hybrid"] = exact_check(hybrid, draft, val, min(args.new, 48), ks[-1], None)
    for name, e in exact.items():
        print(f"float64 exactness, {name} ({e['rows']} rows x {e['new_tokens']} tokens): chain identical "
              f"{e['chain_identical']}" + (f", tree identical {e['tree_identical']}" if "tree_identical" in e else ""))
    bounds = machine_bounds()
    weight_bytes = sum(p.numel() * p.element_size() for p in target.parameters())
    bounds["target_weight_MB"] = weight_bytes / 1e6
    bounds["plain_bound_tokens_per_s_batch1"] = bounds["copy_GBps"] * 1e9 / weight_bytes
    bounds["read_GBps_weights_size"] = read_bandwidth(weight_bytes)
    bounds["read_GBps_1GB"] = read_bandwidth(1 << 30)
    bounds["weights_read_ms_at_weights_size_rate"] = weight_bytes / bounds["read_GBps_weights_size"] / 1e6
    load_avg.append(os.getloadavg())
    print(f"machine: copy {bounds['copy_GBps']:.1f} GB/s; one thread reads {bounds['read_GBps_weights_size']:.1f} "
          f"GB/s from an array of the target's size ({weight_bytes / 1e6:.1f} MB: "
          f"{bounds['weights_read_ms_at_weights_size_rate']:.2f} ms per pass over the weights) and "
          f"{bounds['read_GBps_1GB']:.1f} GB/s from 1 GB; 1-min load average during the run "
          f"{', '.join(f'{v[0]:.1f}' for v in load_avg)}")
    config = {"target": args.target, "draft": args.draft, "draft_distilled": args.draft_distilled,
              "target_hybrid": args.target_hybrid,
              "target_params": sum(p.numel() for p in target.parameters()),
              "hybrid_params": None if hybrid is None else sum(p.numel() for p in hybrid.parameters()),
              "draft_params": sum(p.numel() for p in draft.parameters()), "new_tokens": args.new,
              "prompt": args.prompt, "num_draft": ks, "trees": trees, "threads": args.threads,
              "load_average": [list(v) for v in load_avg]}
    write_json(f"bench_speculative_t{args.threads}", {"config": config, "machine_bounds": bounds, "rows": rows,
                                                     "round_parts": parts, "float64_exact": exact})


if __name__ == "__main__":
    main()
