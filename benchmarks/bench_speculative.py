"""Speculative decoding on trained byte-level Tiny Shakespeare models: plain greedy vs chain vs tree drafts (and a
self-draft), in one process so the ratios are fair.

    python benchmarks/bench_speculative.py --target RUN --draft RUN [--new 128] [--num-draft 2,4] [--tree '2,2 2,3']
    python benchmarks/bench_speculative.py --train DIR     # first trains a target and a draft into DIR (nice -n 10)

Prompts are the first ``--prompt`` tokens of validation rows. For batch 1 and 4 at ``--threads`` threads it
reports new tokens per second (prefill included, best of ``--repeat``), the speedup over plain greedy (wall time;
the same without the prompt's prefill, timed apart; and in this process's CPU time, which a busy machine disturbs
less), the tokens a row gains per target pass (the acceptance length) and the acceptance rate, and whether the
tokens equal plain greedy's: float32 rows identical, and an exact check in float64 (models cast to float64).
Writes benchmarks/results/bench_speculative_t<threads>.json.
"""

from __future__ import annotations

import argparse
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


COLUMNS = ["case", "batch", "tokens_per_s", "speedup_vs_plain", "speedup_vs_best_chain", "decode_only_speedup_vs_plain",
           "cpu_speedup_vs_plain", "cpu_speedup_vs_best_chain", "tokens_per_pass", "acceptance_rate",
           "rows_identical_fp32"]


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


def load(run: str):
    from ssmkit.cli.common import load_run

    _, _, task, model, _ = load_run(run)
    return task, model.eval()


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, this process's CPU seconds, fn's result)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def bench(target, draft, self_layers: int, prompts: torch.Tensor, new: int, ks: list[int],
          trees: list[tuple[int, int]], repeat: int) -> list[dict]:
    from ssmkit.infer import generate, self_draft, speculative_generate

    mine = self_draft(target, self_layers)
    cases = {"plain": lambda: (generate(target, prompts, new), None)}
    for k in ks:
        cases[f"chain k={k}"] = lambda k=k: speculative_generate(target, prompts, new, draft_model=draft,
                                                                 num_draft=k)
    for b, d in trees:
        cases[f"tree {b},{d}"] = lambda t=(b, d): speculative_generate(target, prompts, new, draft_model=draft,
                                                                       tree=t)
    cases[f"self-draft {self_layers}L k={ks[0]}"] = lambda: speculative_generate(
        target, prompts, new, draft_model=mine, num_draft=ks[0])
    prefill = {"target": lambda: target(prompts, return_final_state=True),
               "draft": lambda: draft(prompts, return_final_state=True)}
    pre = {}
    with torch.no_grad():
        for name, fn in prefill.items():  # the prompt's share of every case's time (best of repeat + 1)
            pre[name] = min(timed(fn)[0] for _ in range(repeat + 1))
    best = {name: float("inf") for name in cases}
    cpu = {name: float("inf") for name in cases}
    outs: dict[str, tuple] = {}
    for fn in cases.values():  # warm-up (kernel compilation)
        fn()
    for _ in range(repeat):  # interleaved, so load changes hit every case alike
        for name, fn in cases.items():
            t, c, outs[name] = timed(fn)
            best[name], cpu[name] = min(best[name], t), min(cpu[name], c)
    plain_tokens = outs["plain"][0]
    best_chain = min(best[n] for n in cases if n.startswith("chain"))
    cpu_chain = min(cpu[n] for n in cases if n.startswith("chain"))
    rows = []
    for name in cases:
        tokens, stats = outs[name]
        rows.append({
            "case": name, "batch": prompts.shape[0],
            "tokens_per_s": prompts.shape[0] * new / best[name],
            "speedup_vs_plain": best["plain"] / best[name],
            "speedup_vs_best_chain": best_chain / best[name],
            "decode_only_speedup_vs_plain": (best["plain"] - pre["target"]) / (
                best[name] - pre["target"] - (0.0 if name == "plain" or name.startswith("self") else pre["draft"])),
            "cpu_speedup_vs_plain": cpu["plain"] / cpu[name],
            "cpu_speedup_vs_best_chain": cpu_chain / cpu[name],
            "tokens_per_pass": None if stats is None else stats.tokens_per_pass,
            "acceptance_rate": None if stats is None else stats.acceptance_rate,
            "rows_identical_fp32": int((tokens == plain_tokens).all(1).sum()),
        })
    return rows


def components(target, draft, prompts: torch.Tensor, k: int, tree: tuple[int, int], repeat: int = 20) -> list[dict]:
    """CPU milliseconds (best of ``repeat``, interleaved) of the parts of one round after the prompt: a plain decode
    step, the unfused round's parts, and the fused loop's three launches (draft, verify, acceptance + rollback), the
    verify pass for 1..8 and the tree's nodes, and the products alone (every weight once, as the verify pass reads
    them) for 1, k + 1 and the tree's rows."""
    import numba as nb
    import numpy as np

    from ssmkit.infer import _numba_spec as S
    from ssmkit.infer._numba_spec_stages import _gemm
    from ssmkit.infer.fused_loop import _Side, _Verify
    from ssmkit.infer.fused_spec import _full_tree, fused_plan
    from ssmkit.infer.multitoken import forward_snapshots

    @nb.njit(fastmath=True)
    def products(xs, w_in, w_x, w_out, w_head, e, outs, col):  # the verify pass's products with its blocking
        for layer in range(len(w_in)):
            _gemm(xs[0], w_in[layer], e, e, 0, w_in[layer].shape[0], outs[0], col)
            _gemm(xs[1], w_x[layer], e, e, 0, w_x[layer].shape[0], outs[1], col)
            _gemm(xs[1], w_out[layer], e, e, 0, w_out[layer].shape[0], outs[2], col)
        _gemm(xs[0], w_head, e, e, 0, w_head.shape[0], outs[3], col)

    def draft_steps():
        tok, s = last, s_d
        for _ in range(k):
            lg, s = draft.step(tok, s)
            tok = lg.argmax(-1)

    batch = prompts.shape[0]
    with torch.no_grad():
        out = target(prompts, return_final_state=True)
        s_t, s_d = out.state, draft(prompts, return_final_state=True).state
        last = out.logits[:, -1].argmax(-1)
        chain = last[:, None].repeat(1, k + 1)
        _, snaps = forward_snapshots(target, chain, s_t)
        n = torch.full((batch,), k // 2, dtype=torch.long)
        parts = {"plain step (target)": lambda: target.step(last, s_t),
                 f"unfused: {k} draft steps": draft_steps,
                 f"unfused: target pass over {k + 1} tokens": lambda: forward_snapshots(target, chain, s_t),
                 "unfused: rollback select": lambda: snaps.select(n)}
        tp, dp = fused_plan(target, s_t), fused_plan(draft, s_d)
        if tp is not None and dp is not None:
            a = tp.arrays
            e = np.empty(0, dtype=np.float32)
            di, xdim, d_model = a["d"][0].shape[0], a["x_w"][0].shape[0], a["in_w"][0].shape[1]

            def side_pair(b: int, d: int):
                tt = _full_tree(b, d)
                tg, dr = _Side(target, tp, s_t, tt), _Side(draft, dp, s_d, tt)
                return tt, tg, dr, _Verify(tg, batch), last[:, None].repeat(1, tt.size).contiguous()

            def fused_parts(b: int, d: int, label: str) -> None:
                tt, tg, dr, ver, nodes = side_pair(b, d)
                root = last.numpy().astype(np.int64)
                toks, cnt = np.empty((batch, d + 1), np.int64), np.empty(batch, np.int64)

                def draft_fn():
                    S.draft_tree(root, b, d, dr.emb.numpy(), dr.parents, dr.win, *dr.layers, dr.conv_t, *dr.scan,
                                 dr.ssm, *dr.head, nodes.numpy(), dr.node_x, dr.node_ssm)

                def accept_fn():
                    S.accept_round(nodes.numpy(), ver.logits.numpy().reshape(batch, tt.size, -1), tg.parents, tg.win,
                                   tg.node_x, tg.node_ssm, tg.conv_t.copy(), tg.ssm.copy(), dr.win, dr.node_x,
                                   dr.node_ssm, dr.conv_t.copy(), dr.ssm.copy(), toks, cnt)
                draft_fn()
                ver.run(tg, nodes)
                parts[f"fused: draft {label}"] = draft_fn
                parts[f"fused: verify {label} ({tt.size} nodes)"] = lambda: ver.run(tg, nodes)
                parts[f"fused: accept + rollback {label}"] = accept_fn

            fused_parts(1, k, f"chain of {k}")
            fused_parts(*tree, f"tree {tree[0]},{tree[1]}")
            for t in sorted({1, 2, 3, 5, 6, 8} - {k + 1}):
                _, tg, _, ver, nodes = side_pair(1, t - 1)
                parts[f"fused: verify {t} tokens"] = lambda tg=tg, ver=ver, nodes=nodes: ver.run(tg, nodes)
            for rows in sorted({1, k + 1, _full_tree(*tree).size}):
                r = rows * batch
                xs = (np.random.rand(r, d_model).astype(np.float32), np.random.rand(r, di).astype(np.float32))
                outs = tuple(np.empty((r, m), np.float32) for m in (2 * di, xdim, d_model, a["head"][0].shape[0]))
                args = (xs, a["in_w"], a["x_w"], a["out_w"], a["head"][0], e, outs, np.empty(r, np.float32))
                parts[f"products only, {rows} node rows per batch row"] = lambda args=args: products(*args)
        times = {name: [] for name in parts}
        for fn in parts.values():
            fn()
        for _ in range(repeat):  # interleaved, so load changes hit every part alike
            for name, fn in parts.items():
                times[name].append(timed(fn)[1])
        return [{"part": name, "batch": batch, "cpu_ms": 1e3 * min(v), "cpu_ms_median": 1e3 * float(np.median(v)),
                 "plain_steps": min(v) / min(times["plain step (target)"])} for name, v in times.items()]


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


def exact_check(target, draft, prompts: torch.Tensor, new: int, k: int, tree: tuple[int, int]) -> dict:
    """Chain and tree tokens equal plain greedy's with both models in float64."""
    import copy

    from ssmkit.infer import generate, speculative_generate

    t64, d64 = copy.deepcopy(target).double(), copy.deepcopy(draft).double()
    want = generate(t64, prompts, new)
    chain = speculative_generate(t64, prompts, new, draft_model=d64, num_draft=k)[0]
    treed = speculative_generate(t64, prompts, new, draft_model=d64, tree=tree)[0]
    return {"rows": prompts.shape[0], "new_tokens": new, "chain_identical": bool(torch.equal(chain, want)),
            "tree_identical": bool(torch.equal(treed, want))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", help="target run directory")
    ap.add_argument("--draft", help="draft run directory")
    ap.add_argument("--train", metavar="DIR", help="train a target and a draft into DIR first (skips done ones)")
    ap.add_argument("--new", type=int, default=128, help="new tokens per row")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--num-draft", default="2,4", help="chain lengths k, comma-separated")
    ap.add_argument("--tree", default="2,2 2,3", help="trees B,D, space-separated")
    ap.add_argument("--self-layers", type=int, default=2, help="layers of the self-draft")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.train:
        args.target, args.draft = (str(p) for p in train(Path(args.train)))
    if not (args.target and args.draft):
        ap.error("give --target and --draft run directories, or --train DIR")
    torch.set_num_threads(args.threads)
    ks = [int(v) for v in args.num_draft.split(",")]
    trees = [tuple(int(v) for v in t.split(",")) for t in args.tree.split()]
    task, target = load(args.target)
    _, draft = load(args.draft)
    val = next(iter(task.batches("val", 4, 0)))["input_ids"][:, : args.prompt]
    rows = []
    for b in (int(v) for v in args.batches.split(",")):
        rows += bench(target, draft, args.self_layers, val[:b].contiguous(), args.new, ks, trees, args.repeat)
    print_table(rows, COLUMNS)
    parts = []
    for b in (int(v) for v in args.batches.split(",")):
        parts += components(target, draft, val[:b].contiguous(), ks[-1], trees[-1])
    print_table(parts, ["part", "batch", "cpu_ms", "cpu_ms_median", "plain_steps"])
    exact = exact_check(target, draft, val, min(args.new, 48), ks[-1], trees[-1])
    print(f"float64 exactness ({exact['rows']} rows x {exact['new_tokens']} tokens): chain identical "
          f"{exact['chain_identical']}, tree identical {exact['tree_identical']}")
    bounds = machine_bounds()
    weight_bytes = sum(p.numel() * p.element_size() for p in target.parameters())
    bounds["target_weight_MB"] = weight_bytes / 1e6
    bounds["plain_bound_tokens_per_s_batch1"] = bounds["copy_GBps"] * 1e9 / weight_bytes
    bounds["read_GBps_weights_size"] = read_bandwidth(weight_bytes)
    bounds["read_GBps_1GB"] = read_bandwidth(1 << 30)
    bounds["weights_read_ms_at_weights_size_rate"] = weight_bytes / bounds["read_GBps_weights_size"] / 1e6
    print(f"machine: copy {bounds['copy_GBps']:.1f} GB/s; one thread reads {bounds['read_GBps_weights_size']:.1f} "
          f"GB/s from an array of the target's size ({weight_bytes / 1e6:.1f} MB: "
          f"{bounds['weights_read_ms_at_weights_size_rate']:.2f} ms per pass over the weights) and "
          f"{bounds['read_GBps_1GB']:.1f} GB/s from 1 GB; load average {os.getloadavg()[0]:.1f}")
    config = {"target": args.target, "draft": args.draft, "target_params": sum(p.numel() for p in target.parameters()),
              "draft_params": sum(p.numel() for p in draft.parameters()), "new_tokens": args.new,
              "prompt": args.prompt, "num_draft": ks, "trees": trees, "threads": args.threads,
              "load_average": list(os.getloadavg())}
    write_json(f"bench_speculative_t{args.threads}", {"config": config, "machine_bounds": bounds, "rows": rows,
                                                     "round_parts": parts, "float64_exact": exact})


if __name__ == "__main__":
    main()
