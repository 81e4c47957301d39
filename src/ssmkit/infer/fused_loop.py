"""Greedy speculative decoding on a pure-Mamba target and draft with three numba launches per round and no
per-round allocation or state conversion.

:func:`fused_rounds` runs the whole decode loop of :func:`ssmkit.infer.speculative_generate` once both models have
a fused plan (:func:`ssmkit.infer.fused_spec.fused_plan`): the states stay in the kernels' layout (conv
(L, B, K - 1, Di), SSM (L, B, N, Di), numpy) from the prefill to the end, and every buffer is allocated once per
batch size. Each round is

1. ``draft_tree``: the draft's chain or tree of tokens (a chain of k is the tree (1, k)), its state after every node;
2. ``verify_tree``: every node through the target in one pass (the embedding gathered into a fixed buffer first);
3. ``accept_round``: the greedy acceptance, the emitted tokens, and both models' states set to the accepted node's
   (in place, from the node states the two passes kept),

then the emitted tokens go to the output (max_new_tokens and EOS as in ``generate``). Rows that finish leave the
batch (their states and buffers are compacted). The tokens equal those of the per-round path (the same kernels),
hence plain greedy's.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..models.heads import CausalLM
from ..models.outputs import ModelState
from ..ops.mamba_step import MambaStackPlan
from ..ops.threads import kernel_threads
from .fused_spec import _buffers, _full_tree, _layer_arrays, _scan_arrays, _stacked_states, _tables
from .tree import TokenTree


class _Side:
    """One model's states (kernel layout) and node buffers for the active rows."""

    def __init__(self, model: CausalLM, plan: MambaStackPlan, state: ModelState, tree: TokenTree) -> None:
        conv, self.ssm, self.conv_t = _stacked_states(state)
        self.model, self.plan, self.n_nodes = model, plan, tree.size
        self.parents, self.win = _tables(tree, conv.shape[3] + 1)
        self.layers, self.scan = _layer_arrays(plan), _scan_arrays(plan)
        self.head = plan.arrays["head"]
        self.emb = model.backbone.embedding.weight.detach()
        self._alloc(conv)

    def _alloc(self, conv: Tensor) -> None:
        node_x, node_ssm = _buffers(self.plan, conv, self.conv_t.shape[1], self.n_nodes)
        self.node_x, self.node_ssm = node_x.numpy(), node_ssm.numpy()

    def keep(self, rows: np.ndarray) -> None:
        """Keep only batch rows ``rows`` (int64)."""
        self.conv_t = np.ascontiguousarray(self.conv_t[:, rows])
        self.ssm = np.ascontiguousarray(self.ssm[:, rows])
        self._alloc(torch.from_numpy(self.conv_t).transpose(2, 3))


class _Verify:
    """The target's verify-pass buffers for ``batch`` rows of ``n_nodes`` nodes."""

    def __init__(self, side: _Side, batch: int) -> None:
        plan, n_nodes = side.plan, side.n_nodes
        rows = batch * n_nodes
        w0 = plan.layers[0]
        di, xdim, d_model = w0.d.shape[0], w0.x_w.shape[0], side.emb.shape[1]
        self.h = side.emb.new_empty(rows, d_model)
        self.scratch = [self.h.new_empty(rows, n).numpy() for n in (d_model, 2 * di, di, xdim, di, d_model)]
        self.logits = self.h.new_empty(rows, side.head[0].shape[0])
        self.act_b = np.repeat(np.arange(batch, dtype=np.int64), n_nodes)
        self.act_i = np.tile(np.arange(n_nodes, dtype=np.int64), batch)
        self.work = w0.in_w.numel() * rows * len(plan.layers)
        self.n_stages = 5 * len(plan.layers) + 2
        self.counters: dict[int, np.ndarray] = {}

    def run(self, side: _Side, nodes: Tensor) -> np.ndarray:
        """nodes (B, T) -> logits (B, T, V) (a view of this object's buffer)."""
        from ..ops import _numba_decode as D
        from . import _numba_spec as S

        torch.index_select(side.emb, 0, nodes.view(-1), out=self.h)
        with kernel_threads(self.work) as threads:
            counters = self.counters.get(threads)
            if counters is None:
                counters = self.counters[threads] = np.zeros(D.counter_slots(self.n_stages, threads), np.int64)
            counters[:] = 0
            S.verify_tree(self.h.numpy(), side.parents, side.win, self.act_b, self.act_i, side.n_nodes, *side.layers,
                          side.conv_t, *side.scan, side.ssm, side.node_x, side.node_ssm, *self.scratch, *side.head,
                          self.logits.numpy(), counters, threads)
        return self.logits.numpy().reshape(nodes.shape[0], side.n_nodes, -1)


@torch.no_grad()
def fused_rounds(plans: tuple[MambaStackPlan, MambaStackPlan], models: tuple[CausalLM, CausalLM],
                 tree: tuple[int, int], last: Tensor, states: tuple[ModelState, ModelState], out: Tensor,
                 count: Tensor, done: Tensor, eos: Tensor | None, max_new: int, stats) -> None:
    """Decode every row of ``out`` (B, max_new) to the end: last (B,) the last emitted tokens, states the two
    models' states after everything emitted but ``last``; count (B,) tokens emitted so far, done (B,) rows
    finished, eos the EOS ids or None (all updated in place, as ``stats``, a SpecStats)."""
    from . import _numba_spec as S

    branches, depth = tree
    tt = _full_tree(branches, depth)
    tgt, dft = (_Side(m, p, s, tt) for m, p, s in zip(models, plans, states, strict=True))
    active = np.arange(last.shape[0], dtype=np.int64)
    last_np = last.numpy().astype(np.int64)
    out_np, count_np, done_np = out.numpy(), count.numpy(), done.numpy()
    eos_np = None if eos is None else eos.numpy()
    verify = nodes = toks = n = None
    while True:
        keep = ~done_np[active]
        if not keep.any():
            return
        if verify is None or not keep.all():
            if not keep.all():
                rows = np.nonzero(keep)[0]
                active, last_np = active[rows], last_np[rows]
                tgt.keep(rows)
                dft.keep(rows)
            m = active.shape[0]
            verify = _Verify(tgt, m)
            nodes = torch.empty((m, tt.size), dtype=torch.long)
            toks = np.empty((m, depth + 1), dtype=np.int64)
            n = np.empty(m, dtype=np.int64)
        S.draft_tree(last_np, branches, depth, dft.emb.numpy(), dft.parents, dft.win, *dft.layers, dft.conv_t,
                     *dft.scan, dft.ssm, *dft.head, nodes.numpy(), dft.node_x, dft.node_ssm)
        logits = verify.run(tgt, nodes)
        S.accept_round(nodes.numpy(), logits, tgt.parents, tgt.win, tgt.node_x, tgt.node_ssm, tgt.conv_t, tgt.ssm,
                       dft.win, dft.node_x, dft.node_ssm, dft.conv_t, dft.ssm, toks, n)
        m = active.shape[0]
        stats.passes += 1
        stats.row_passes += m
        stats.drafted += m * depth
        stats.accepted += int(n.sum()) - m
        for i in range(m):
            row = active[i]
            c = int(count_np[row])
            new = toks[i, :min(int(n[i]), max_new - c)]
            if eos_np is not None:
                hit = np.nonzero(np.isin(new, eos_np))[0]
                if hit.size:
                    new = new[:hit[0] + 1]
                    done_np[row] = True
            out_np[row, c:c + new.shape[0]] = new
            count_np[row] = c + new.shape[0]
            stats.emitted += new.shape[0]
            if count_np[row] >= max_new:
                done_np[row] = True
        last_np = toks[np.arange(m), n - 1].copy()
