"""Speculative chain decoding on a hybrid target with the fused verify pass (ssmkit.infer.spec_hybrid) against
plain greedy decoding with the fused hybrid step, decode only (both start from the same prefilled states).

    python benchmarks/bench_spec_hybrid.py --target runs/spec/hybrid9 --draft runs/spec/draft \
        --num-draft 4 --batches 1,4 --threads 1,2 --new 64 --repeat 5

Per (threads, batch), in one process and interleaved (A B A B ..., best CPU and wall time of ``--repeat``):
plain (new - 1 fused steps), the chain (``hybrid_rounds`` to the same length), and the parts in plain steps (the
plain loop's mean step): one verify pass of k + 1 tokens, one commit (rollback), one draft chain. The chain's
tokens must equal plain's (float32 here; the float64 identity is the tests'). Also the machine's copy bandwidth
and the load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_bounds, print_table, write_json  # noqa: E402


def load(run: str):
    from ssmkit.cli.common import load_run

    _, _, task, model, _ = load_run(run)
    return task, model.eval()


def best_of(fns: dict, repeat: int) -> tuple[dict, dict, dict]:
    """Interleaved runs: (best wall s, best CPU s, last result) per name."""
    wall = {n: float("inf") for n in fns}
    cpu = dict(wall)
    outs = {}
    for fn in fns.values():  # warm-up (kernel compilation)
        fn()
    for _ in range(repeat):
        for n, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            outs[n] = fn()
            wall[n], cpu[n] = min(wall[n], time.perf_counter() - t0), min(cpu[n], time.process_time() - c0)
    return wall, cpu, outs


@torch.no_grad()
def case(target, draft, prompts: torch.Tensor, new: int, k: int, repeat: int) -> dict:
    from ssmkit.infer.fused_hybrid import hybrid_step
    from ssmkit.infer.fused_spec import fused_draft, fused_plan
    from ssmkit.infer.generate import _prefill
    from ssmkit.infer.prompts import parse_prompts
    from ssmkit.infer.spec_hybrid import HybridSpecState, commit, hybrid_rounds, hybrid_verify, spec_plan
    from ssmkit.infer.speculative import SpecStats

    parsed = parse_prompts(prompts, vocab_size=target.config.vocab_size, device=prompts.device)
    logits, s_t = _prefill(target, parsed)
    _, s_d = _prefill(draft, parsed)
    first = torch.argmax(logits, -1)
    batch = prompts.shape[0]
    plan, dplan = spec_plan(target, s_t), fused_plan(draft, s_d)
    assert plan is not None and dplan is not None, "target or draft not fusable"

    def plain():
        out, tok, s = [first], first, s_t
        for _ in range(new - 1):
            lg, s = hybrid_step(target, tok, s)
            tok = torch.argmax(lg, -1)
            out.append(tok)
        return torch.stack(out, 1), None

    def chain():
        out = torch.zeros((batch, new), dtype=torch.long)
        out[:, 0] = first
        count = torch.ones(batch, dtype=torch.long)
        stats = SpecStats()
        hybrid_rounds(target, plan, draft, dplan, k, first, (s_t, s_d), out, count, count >= new, None, new, stats)
        return out, stats

    st0 = HybridSpecState.from_state(plan, s_t, new + k + 1)
    nodes, _ = fused_draft(draft, dplan, first, 1, k, s_d)
    _, rec = hybrid_verify(target, plan, nodes, st0)
    keep = torch.full((batch,), k + 1, dtype=torch.long)

    def parts_commit():
        st = HybridSpecState(st0.conv.clone(), st0.ssm.clone(), st0.k_buf, st0.v_buf, st0.lens.clone(),
                             st0.pos.clone())
        commit(plan, st, rec, keep)

    fns = {"plain": plain, "chain": chain,
           "verify": lambda: hybrid_verify(target, plan, nodes, st0), "commit": parts_commit,
           "draft": lambda: fused_draft(draft, dplan, first, 1, k, s_d),
           "clone (commit's copy)": lambda: (st0.conv.clone(), st0.ssm.clone())}
    wall, cpu, outs = best_of(fns, repeat)
    tokens, stats = outs["chain"]
    n_dec = batch * (new - 1)
    step = cpu["plain"] / (new - 1)  # a step of the plain loop (one timed apart from the prefilled state would
    # also copy its KV cache into the fused step's buffers)
    return {"batch": batch, "threads": torch.get_num_threads(), "k": k,
            "plain_tok_s_cpu": n_dec / cpu["plain"], "chain_tok_s_cpu": n_dec / cpu["chain"],
            "speedup_cpu": cpu["plain"] / cpu["chain"], "speedup_wall": wall["plain"] / wall["chain"],
            "tokens_per_pass": stats.tokens_per_pass, "acceptance": stats.acceptance_rate,
            "identical_rows": int((tokens == outs["plain"][0]).all(1).sum()),
            "step_ms": 1e3 * step, "verify_steps": cpu["verify"] / step,
            "commit_steps": (cpu["commit"] - cpu["clone (commit's copy)"]) / step, "draft_steps": cpu["draft"] / step,
            "load_avg": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="runs/spec/hybrid9")
    ap.add_argument("--draft", default="runs/spec/draft")
    ap.add_argument("--num-draft", type=int, default=4)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the rows to this JSON file")
    args = ap.parse_args()
    task, target = load(args.target)
    _, draft = load(args.draft)
    val = next(iter(task.batches("val", 4, 0)))["input_ids"][:, : args.prompt]
    rows = []
    for n_threads in (int(v) for v in args.threads.split(",")):
        torch.set_num_threads(n_threads)
        bounds = machine_bounds(1 << 23)
        for b in (int(v) for v in args.batches.split(",")):
            row = case(target, draft, val[:b].contiguous(), args.new, args.num_draft, args.repeat)
            row["copy_GBps"] = bounds["copy_GBps"]
            rows.append(row)
            print(row, flush=True)
    print_table(rows, list(rows[0]))
    if args.out:
        write_json(args.out, {"rows": rows, "args": vars(args)})


if __name__ == "__main__":
    main()
