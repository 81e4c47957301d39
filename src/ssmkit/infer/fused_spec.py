"""Fused draft and verify passes for pure-Mamba models (one numba launch each; kernels in :mod:`._numba_spec`).

A speculative round of chain or tree drafts on pure-Mamba models (the stacks :mod:`ssmkit.models.fused_decode`
fuses: ``mamba`` mixers with RMSNorm, no MLP, no multipliers; float32/float64; no gradients) is two launches:

    nodes, dsnaps = fused_draft(draft, root, branches, depth, draft_state)   # (B, T) tokens, the draft's tree
    logits, tsnaps = fused_verify(target, nodes, tree, target_state)          # (B, T, vocab)
    state = tsnaps.select(node)                                                # the state after root..node[b]

The verify pass reads the target's weights once for all T nodes of all rows (the projections take every node as
a row; the conv and the scan follow each node's path), so it costs about one decode step while decoding is bound
by reading the weights. A chain of k drafts is the tree (1, k). ``fused_plan`` returns None for any model or call
the kernels do not cover; callers then use :mod:`ssmkit.infer.multitoken` / :mod:`ssmkit.infer.tree`.
"""

from __future__ import annotations

import functools
import weakref

import numpy as np
import torch
from torch import Tensor

from ..layers.mamba import MambaState
from ..models.fused_decode import stack_plan
from ..models.heads import CausalLM
from ..models.outputs import ModelState
from ..ops.mamba_step import MambaStackPlan
from ..ops.threads import kernel_threads
from .tree import TokenTree, _window_index


def fused_plan(model: CausalLM, state: ModelState) -> MambaStackPlan | None:
    """The model's fused stack plan (with its LM head) if the fused kernels can run it from ``state``, else None."""
    backbone, cfg = model.backbone, model.config
    if (backbone.embedding is None or cfg.embedding_multiplier != 1.0 or cfg.residual_multiplier != 1.0
            or cfg.logits_scaling != 1.0 or torch.is_grad_enabled()):
        return None
    plan = stack_plan(backbone, model.lm_head)
    if (not isinstance(plan, MambaStackPlan) or not plan.fusable or plan.head is None
            or getattr(plan, "act_quant", False)):  # quantized activations: the decode kernel's own path
        return None
    emb = backbone.embedding.weight
    if backbone.residual_dtype != plan.dtype or emb.dtype != plan.dtype or emb.device.type != "cpu":
        return None
    if not all(type(s) is MambaState and s.conv.dtype == plan.dtype and s.ssm.dtype == plan.dtype
               for s in state.layers):
        return None
    return plan


@functools.cache
def _tables(tree: TokenTree, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(parents (T,) int64, conv windows (T, width) int64: see :mod:`._numba_spec`)."""
    return np.asarray(tree.parents, dtype=np.int64), _window_index(tree, width).numpy().copy()


@functools.cache
def _full_tree(branches: int, depth: int) -> TokenTree:
    return TokenTree.full(branches, depth)


class FusedSnapshots:
    """Every node's state from a fused pass: conv inputs (L, B, T, Di), SSM states (L, B, T, N, Di) (state-major)."""

    def __init__(self, conv: Tensor, node_x: Tensor, node_ssm: Tensor, win: np.ndarray) -> None:
        self.conv, self.node_x, self.node_ssm, self.win_np = conv, node_x, node_ssm, win

    def select(self, node: Tensor, rows: Tensor | None = None) -> ModelState:
        """The state after the path root..node[i] of pass row rows[i] (default: every row); node (m,) int64."""
        batch, n_nodes = self.node_ssm.shape[1:3]
        if rows is None:
            rows = torch.arange(batch)
        if node.dtype != torch.long or node.shape != rows.shape or bool(((node < 0) | (node >= n_nodes)).any()):
            raise ValueError(f"node must be int64 of shape {tuple(rows.shape)} in [0, {n_nodes}), got "
                             f"{node.tolist()}")
        if rows.dtype != torch.long or rows.ndim != 1 or bool(((rows < 0) | (rows >= batch)).any()):
            raise ValueError(f"rows must be a 1-D int64 tensor in [0, {batch}), got {rows.tolist()}")
        from . import _numba_spec as S

        n_layers, _, di, km1 = self.conv.shape
        conv = self.conv.new_empty((n_layers, node.shape[0], di, km1))
        ssm = self.node_ssm.new_empty((n_layers, node.shape[0], di, self.node_ssm.shape[3]))
        S.select_states(self.conv.numpy(), self.node_x.numpy(), self.node_ssm.numpy(), self.win_np,
                        node.contiguous().numpy(), rows.contiguous().numpy(), conv.numpy(), ssm.numpy())
        return ModelState([MambaState(conv=c, ssm=s) for c, s in zip(conv.unbind(0), ssm.unbind(0), strict=True)])


def _stacked_states(state: ModelState) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """(conv (L, B, Di, K - 1), then for the kernels the SSM state (L, B, N, Di) and the conv state (L, B, K - 1, Di),
    both transposed)."""
    layers = state.layers
    conv = torch.stack([s.conv for s in layers]).contiguous()
    ssm_t = torch.stack([s.ssm for s in layers]).transpose(2, 3).contiguous().numpy()
    return conv, ssm_t, conv.transpose(2, 3).contiguous().numpy()


_EXTRA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _extra(plan: MambaStackPlan) -> dict:
    """The kernels' own forms of some plan weights (made once per plan): conv_w (K, Di) and dt_w (R, Di)
    transposed, neg_a (N, Di) = -exp(A_log).T, as numba typed Lists per layer."""
    got = _EXTRA.get(plan)
    if got is None:
        from numba.typed import List

        a = plan.arrays
        got = {"conv_w_t": List([np.ascontiguousarray(w.T) for w in a["conv_w"]]),
               "dt_w_t": List([np.ascontiguousarray(w.T) for w in a["dt_w"]]),
               "neg_a": List([np.ascontiguousarray(-np.exp(w).T) for w in a["a_log"]])}
        _EXTRA[plan] = got
    return got


def _layer_arrays(plan: MambaStackPlan) -> tuple:
    a = plan.arrays
    return (a["norm_w"], plan.eps, a["final_w"], plan.final_eps, a["in_w"], a["in_scale"], a["in_b"],
            _extra(plan)["conv_w_t"], a["conv_b"])


def _scan_arrays(plan: MambaStackPlan) -> tuple:
    a, e = plan.arrays, _extra(plan)
    return (a["x_w"], a["x_scale"], e["dt_w_t"], a["dt_b"], e["neg_a"], a["d"], a["out_w"], a["out_scale"],
            a["out_b"])


def _buffers(plan: MambaStackPlan, conv: Tensor, batch: int, n_nodes: int) -> tuple[Tensor, Tensor]:
    n_layers, _, di, _ = conv.shape
    n_state = plan.layers[0].a_log.shape[1]
    node_x = torch.empty((n_layers, batch * n_nodes, di), dtype=plan.dtype)
    node_ssm = torch.empty((n_layers, batch, n_nodes, n_state, di), dtype=plan.dtype)
    return node_x, node_ssm


@torch.no_grad()
def fused_verify(model: CausalLM, plan: MambaStackPlan, nodes: Tensor, tree: TokenTree, state: ModelState
                 ) -> tuple[Tensor, FusedSnapshots]:
    """nodes (B, T) int64 token ids in ``tree`` order (node 0 = the last emitted token) -> (logits (B, T, vocab),
    FusedSnapshots). ``plan`` from :func:`fused_plan` (model, state)."""
    from ..ops import _numba_decode as D
    from . import _numba_spec as S

    batch, n_nodes = nodes.shape
    if n_nodes != tree.size:
        raise ValueError(f"nodes has {n_nodes} nodes but the tree has {tree.size}")
    conv, ssm, conv_t = _stacked_states(state)
    width = conv.shape[3] + 1
    parents, win_np = _tables(tree, width)
    h = model.backbone.embed(nodes.reshape(-1)).contiguous()  # (B T, d_model), row b * T + i
    rows, d_model = h.shape
    node_x, node_ssm = _buffers(plan, conv, batch, n_nodes)
    w0 = plan.layers[0]
    di, xdim = w0.d.shape[0], w0.x_w.shape[0]
    scratch = [h.new_empty(rows, n) for n in (d_model, 2 * di, di, xdim, di, d_model)]
    head_w, head_s, head_b = plan.arrays["head"]
    logits = h.new_empty(rows, head_w.shape[0])
    act_b = torch.arange(batch).repeat_interleave(n_nodes).numpy()
    act_i = torch.arange(n_nodes).repeat(batch).numpy()
    n_layers = len(plan.layers)
    with kernel_threads(w0.in_w.numel() * rows * n_layers) as threads:
        counters = torch.zeros(D.counter_slots(5 * n_layers + 2, threads), dtype=torch.int64)
        S.verify_tree(h.numpy(), parents, win_np, act_b, act_i, n_nodes, *_layer_arrays(plan), conv_t,
                      *_scan_arrays(plan), ssm, node_x.numpy(), node_ssm.numpy(),
                      *(t.numpy() for t in scratch), head_w, head_s, head_b, logits.numpy(), counters.numpy(),
                      threads)
    snaps = FusedSnapshots(conv, node_x.view(n_layers, batch, n_nodes, di), node_ssm, win_np)
    return logits.view(batch, n_nodes, -1), snaps


@torch.no_grad()
def fused_draft(model: CausalLM, plan: MambaStackPlan, root: Tensor, branches: int, depth: int, state: ModelState
                ) -> tuple[Tensor, FusedSnapshots]:
    """The draft's greedy tree: root (B,) int64 -> (nodes (B, T) in TokenTree.full(branches, depth) order, node 0
    the root and node i's children its top-``branches`` next tokens; FusedSnapshots of the draft after every node,
    leaves included). ``plan`` from :func:`fused_plan` (model, state)."""
    from . import _numba_spec as S

    vocab = model.config.vocab_size
    if not 1 <= branches <= vocab:
        raise ValueError(f"branches must lie in [1, vocab_size={vocab}], got {branches}")
    tree = _full_tree(branches, depth)
    conv, ssm, conv_t = _stacked_states(state)
    parents, win_np = _tables(tree, conv.shape[3] + 1)
    batch = root.shape[0]
    node_x, node_ssm = _buffers(plan, conv, batch, tree.size)
    nodes = torch.empty((batch, tree.size), dtype=torch.long)
    head_w, head_s, head_b = plan.arrays["head"]
    emb = model.backbone.embedding.weight.detach()
    S.draft_tree(root.contiguous().numpy(), branches, depth, emb.numpy(), parents, win_np, *_layer_arrays(plan),
                 conv_t, *_scan_arrays(plan), ssm, head_w, head_s, head_b, nodes.numpy(),
                 node_x.numpy(), node_ssm.numpy())
    n_layers, di = conv.shape[0], conv.shape[2]
    return nodes, FusedSnapshots(conv, node_x.view(n_layers, batch, tree.size, di), node_ssm, win_np)
