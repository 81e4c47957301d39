"""Which draft shapes (chains, full trees, trees that branch only at the first levels) could pay on this machine:
the exact tokens per pass of any greedy shape from one teacher-forced draft pass, and the verify pass's measured
cost per node count, in one process.

    python benchmarks/bench_speculative_shapes.py --target RUN --draft RUN [--draft RUN2 ...] [--threads 2]

Greedy speculative decoding keeps, per round, the longest path of the draft's tree that equals the target's
greedy continuation. Along that path every accepted token is the target's, so the draft's context at each level
is the target's own output: a shape with widths (w1, ..., wD) (node counts per level 1, w1, w1 w2, ...; each
node's children are the draft's top-w tokens) accepts level j exactly when the target's next token is among the
draft's top-w_j there, given the true prefix. So one plain greedy run of the target and one teacher-forced pass
of the draft over its output give the tokens per pass of every shape without running them (ties aside; the
benchmark's measured chains and trees check this). The cost per round is timed: the verify pass for 1..16 nodes
(node count, not topology, sets it: the products take all nodes as rows; the scan is per node) and the draft's
launch, interleaved with the plain step. Predicted speedup = tokens per pass x plain step / round.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speculative import load  # noqa: E402
from bench_speculative_parts import _start, _table  # noqa: E402
from common import print_table  # noqa: E402

SHAPES = [(1,) * k for k in (2, 3, 4, 5, 6)] + [
    (2,), (2, 2), (2, 2, 2), (2, 1), (2, 1, 1), (2, 1, 1, 1), (2, 1, 1, 1, 1), (3, 1, 1, 1), (2, 2, 1, 1),
    (1, 2, 1, 1), (2, 1, 1, 1, 1, 1), (4, 1, 1)]


def n_nodes(widths: tuple[int, ...]) -> int:
    """1 + w1 + w1 w2 + ...: the root and every level."""
    total, level = 1, 1
    for w in widths:
        level *= w
        total += level
    return total


def ranks(target, draft, prompt: torch.Tensor, new: int) -> tuple[np.ndarray, np.ndarray]:
    """(the target's greedy tokens (B, new), the rank of each of those tokens among the draft's teacher-forced
    logits at that position (B, new), 0 = the draft's argmax)."""
    from ssmkit.infer import generate

    out = generate(target, prompt, new)
    seq = torch.cat([prompt, out], 1)
    logits = draft(seq[:, :-1]).logits[:, prompt.shape[1] - 1:]  # predicts out[:, 0..new-1]
    true = logits.gather(-1, out[:, :, None])
    idx = torch.arange(logits.shape[-1])
    above = (logits > true) | ((logits == true) & (idx < out[:, :, None]))  # argmax: the first index on ties
    return out.numpy(), above.sum(-1).numpy()


def simulate(rank: np.ndarray, widths: tuple[int, ...]) -> float:
    """Tokens per pass of a row whose draft ranks are ``rank`` (new,): rounds start after the prefill's token."""
    pos, passes, new = 1, 0, rank.shape[0]
    while pos < new:
        n = 0
        while n < len(widths) and pos + n < new and rank[pos + n] < widths[n]:
            n += 1
        pos += n + 1
        passes += 1
    return (new - 1) / passes


@torch.no_grad()
def costs(target, draft, prompt: torch.Tensor, max_nodes: int, repeat: int) -> dict[str, float]:
    """Wall ms (best of ``repeat``, interleaved): the plain step, verify of 1..max_nodes chain nodes, the draft's
    chains as deep as SHAPES' and its full trees (2, 1..3)."""
    from ssmkit.infer import _numba_spec as S
    from ssmkit.infer.fused_loop import _Side, _Verify
    from ssmkit.infer.fused_spec import _full_tree, fused_plan
    from ssmkit.infer.generate import _step

    batch = prompt.shape[0]
    _, last, s_t, s_d = _start(target, draft, prompt)
    tp, dp = fused_plan(target, s_t), fused_plan(draft, s_d)
    parts = {"plain step (target)": lambda: _step(target, last, s_t)}
    root = last.numpy().astype(np.int64)
    for t in range(1, max_nodes + 1):
        tt = _full_tree(1, t - 1)
        tg = _Side(target, tp, s_t, tt)
        ver, nodes = _Verify(tg, batch), last[:, None].repeat(1, t).contiguous()
        parts[f"verify {t}"] = lambda tg=tg, ver=ver, nodes=nodes: ver.run(tg, nodes)
    for b, d in [(1, k) for k in range(1, max(len(s) for s in SHAPES) + 1)] + [(2, 1), (2, 2), (2, 3)]:
        tt = _full_tree(b, d)
        dr = _Side(draft, dp, s_d, tt)
        nodes = torch.empty((batch, tt.size), dtype=torch.long)
        parts[f"draft {b},{d}"] = lambda b=b, d=d, dr=dr, nodes=nodes: S.draft_tree(
            root, b, d, dr.emb.numpy(), dr.parents, dr.win, *dr.layers, dr.conv_t, *dr.scan, dr.ssm, *dr.head,
            nodes.numpy(), dr.node_x, dr.node_ssm)
    return {r["part"]: r["wall_ms"] for r in _table(parts, batch, repeat)}


def draft_ms(c: dict[str, float], widths: tuple[int, ...]) -> float:
    """The draft's launch for a shape, from the measured chains and full trees: the chain of the same depth plus
    the per-node cost of the extra nodes (from tree 2,3 against chain 3)."""
    d = len(widths)
    per_node = max(0.0, (c["draft 2,3"] - c["draft 1,3"]) / (15 - 4))
    return c[f"draft 1,{d}"] + per_node * (n_nodes(widths) - (d + 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", action="append", required=True, help="draft run (repeatable)")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--rows", type=int, default=4, help="validation rows for the acceptance (batch 1 = row 0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--overhead-ms", type=float, default=None, help="per-round cost besides verify and draft "
                    "(acceptance, rollback, Python); default: measured as a fraction of the plain step, 0.1")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task, target = load(args.target)
    val = next(iter(task.batches("val", args.rows, 0)))["input_ids"][:, : args.prompt].contiguous()
    max_nodes = max(n_nodes(s) for s in SHAPES)
    load_avg = [os.getloadavg()[0]]
    c = costs(target, load(args.draft[0])[1], val[:1], max_nodes, args.repeat)
    load_avg.append(os.getloadavg()[0])
    step = c["plain step (target)"]
    over = args.overhead_ms if args.overhead_ms is not None else 0.1 * step
    print(f"plain step {step:.3f} ms; verify ms by nodes: "
          + ", ".join(f"{t}: {c[f'verify {t}']:.2f}" for t in range(1, max_nodes + 1)))
    print("draft ms: " + ", ".join(f"{k[6:]}: {v:.3f}" for k, v in c.items() if k.startswith("draft")))
    rows = []
    for run in args.draft:
        draft = load(run)[1]
        _, rk = ranks(target, draft, val, args.new)
        agree = {f"top{w}": float((rk[:, 1:] < w).mean()) for w in (1, 2, 3, 4)}
        print(f"{run}: teacher-forced agreement with the target's greedy output (all rows) "
              + ", ".join(f"{k} {v:.3f}" for k, v in agree.items()))
        best_chain = None
        for s in SHAPES:
            a1 = simulate(rk[0], s)
            a_all = float(np.mean([simulate(r, s) for r in rk]))
            round_ms = c[f"verify {n_nodes(s)}"] + draft_ms(c, s) + over
            pred = a1 * step / round_ms
            if all(w == 1 for w in s):
                best_chain = max(best_chain or 0.0, pred)
            rows.append({"draft": Path(run).name, "shape": ",".join(map(str, s)), "nodes": n_nodes(s),
                         "tokens_per_pass_b1": a1, f"tokens_per_pass_{args.rows}rows": a_all,
                         "round_plain_steps": round_ms / step, "pred_decode_speedup_b1": pred})
        for r in rows[-len(SHAPES):]:
            r["vs_best_chain"] = r["pred_decode_speedup_b1"] / best_chain
    print_table(rows, list(rows[0]))
    print(f"1-min load average: {', '.join(f'{v:.1f}' for v in load_avg)}; per-round overhead {over:.3f} ms")


if __name__ == "__main__":
    main()
