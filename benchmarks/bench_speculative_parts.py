"""Where one speculative round's time goes: the parts timed apart (used by bench_speculative.py).

Every part is timed interleaved with the others (A B C A B C ...), best of ``repeat``, in wall time and in this
process's CPU time (with two threads, CPU time also counts a thread spinning at a stage barrier), and given in
plain decode steps of the same target (generate's own step: the fused one-launch step where the model has one).
"""

from __future__ import annotations

import time

import numpy as np
import torch


def _timed(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _table(parts: dict, batch: int, repeat: int) -> list[dict]:
    wall = {name: [] for name in parts}
    cpu = {name: [] for name in parts}
    for fn in parts.values():  # warm-up (kernel compilation, buffers)
        fn()
    for _ in range(repeat):  # interleaved, so load changes hit every part alike
        for name, fn in parts.items():
            w, c = _timed(fn)
            wall[name].append(w)
            cpu[name].append(c)
    step = min(wall["plain step (target)"])
    return [{"part": name, "batch": batch, "wall_ms": 1e3 * min(wall[name]),
             "wall_ms_median": 1e3 * float(np.median(wall[name])), "cpu_ms": 1e3 * min(cpu[name]),
             "plain_steps": min(wall[name]) / step} for name in parts]


@torch.no_grad()
def _start(target, draft, prompts: torch.Tensor):
    from ssmkit.infer.generate import _prefill
    from ssmkit.infer.prompts import parse_prompts

    parsed = parse_prompts(prompts, vocab_size=target.config.vocab_size, device=prompts.device)
    logits, s_t = _prefill(target, parsed)
    _, s_d = _prefill(draft, parsed)
    return parsed, logits.argmax(-1), s_t, s_d


@torch.no_grad()
def components(target, draft, prompts: torch.Tensor, k: int, tree: tuple[int, int], repeat: int = 20) -> list[dict]:
    """The prompt's prefill (target, draft), a plain decode step, the fused loop's three launches (draft, verify,
    acceptance + rollback) for a chain of k and for ``tree``, the verify pass alone for 1..8 chain nodes (k + 1
    included, to compare with the same pass right after a draft launch), and the products alone (every weight
    once, as the verify pass blocks them) for 1, k + 1 and the tree's node rows. Pure-Mamba target and draft."""
    import numba as nb

    from ssmkit.infer import _numba_spec as S
    from ssmkit.infer._numba_spec_stages import _gemm
    from ssmkit.infer.fused_loop import _Side, _Verify
    from ssmkit.infer.fused_spec import _full_tree, fused_plan
    from ssmkit.infer.generate import _prefill, _step

    @nb.njit(fastmath=True)
    def products(xs, w_in, w_x, w_out, w_head, e, outs, col):  # the verify pass's products with its blocking
        for layer in range(len(w_in)):
            _gemm(xs[0], w_in[layer], e, e, 0, w_in[layer].shape[0], outs[0], col)
            _gemm(xs[1], w_x[layer], e, e, 0, w_x[layer].shape[0], outs[1], col)
            _gemm(xs[1], w_out[layer], e, e, 0, w_out[layer].shape[0], outs[2], col)
        _gemm(xs[0], w_head, e, e, 0, w_head.shape[0], outs[3], col)

    batch = prompts.shape[0]
    parsed, last, s_t, s_d = _start(target, draft, prompts)
    parts = {"plain step (target)": lambda: _step(target, last, s_t),
             "prefill (target)": lambda: _prefill(target, parsed),
             "prefill (draft)": lambda: _prefill(draft, parsed)}
    tp, dp = fused_plan(target, s_t), fused_plan(draft, s_d)
    if tp is None or dp is None:
        raise ValueError("components() needs a pure-Mamba target and draft (the fused loop's models)")
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
    for t in sorted({1, 2, 3, 5, 6, 8, k + 1}):
        _, tg, _, ver, nodes = side_pair(1, t - 1)
        parts[f"fused: verify {t} tokens (after another verify)"] = lambda tg=tg, ver=ver, nodes=nodes: ver.run(
            tg, nodes)
    for rows in sorted({1, k + 1, _full_tree(*tree).size}):
        r = rows * batch
        xs = (np.random.rand(r, d_model).astype(np.float32), np.random.rand(r, di).astype(np.float32))
        outs = tuple(np.empty((r, m), np.float32) for m in (2 * di, xdim, d_model, a["head"][0].shape[0]))
        args = (xs, a["in_w"], a["x_w"], a["out_w"], a["head"][0], e, outs, np.empty(r, np.float32))
        parts[f"products only, {rows} node rows per batch row (1 thread)"] = lambda args=args: products(*args)
    return _table(parts, batch, repeat)


@torch.no_grad()
def hybrid_components(target, draft, prompts: torch.Tensor, k: int, repeat: int = 10) -> list[dict]:
    """The same for a target the fused loop does not cover (e.g. Mamba-2 + attention): prefill, the plain step
    (the fused hybrid step where it applies), the draft's chain of k (one launch for a pure-Mamba draft, else k
    steps), the target's multi-token pass over k + 1 tokens (PyTorch, ``forward_snapshots``) and its rollback."""
    from ssmkit.infer.fused_spec import fused_draft, fused_plan
    from ssmkit.infer.generate import _prefill, _step
    from ssmkit.infer.multitoken import forward_snapshots

    batch = prompts.shape[0]
    parsed, last, s_t, s_d = _start(target, draft, prompts)
    chain = last[:, None].repeat(1, k + 1)
    _, snaps = forward_snapshots(target, chain, s_t)
    n = torch.full((batch,), (k + 1) // 2, dtype=torch.long)
    dp = fused_plan(draft, s_d)

    def draft_fn():
        if dp is not None:
            return fused_draft(draft, dp, last, 1, k, s_d)
        tok, s = last, s_d
        for _ in range(k):
            lg, s = draft.step(tok, s)
            tok = lg.argmax(-1)
    parts = {"plain step (target)": lambda: _step(target, last, s_t),
             "prefill (target)": lambda: _prefill(target, parsed),
             "prefill (draft)": lambda: _prefill(draft, parsed),
             f"draft chain of {k} ({'one launch' if dp is not None else 'steps'})": draft_fn,
             f"target pass over {k + 1} tokens (forward_snapshots)": lambda: forward_snapshots(target, chain, s_t),
             "target rollback select": lambda: snaps.select(n)}
    return _table(parts, batch, repeat)
