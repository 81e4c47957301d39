"""Tree rounds of :func:`ssmkit.infer.speculative_generate` outside the fused loop (greedy): the draft's top-b
tree, the target's verify over it (one pass with a tree form, else every root-to-leaf path as a batch row), and the
longest accepted path."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..models.heads import CausalLM
from ..models.outputs import ModelState
from .multitoken import forward_snapshots
from .tree import TokenTree, forward_tree, tree_supported


@functools.cache
def _tree_tables(branches: int, depth: int) -> tuple[TokenTree, Tensor, Tensor, Tensor]:
    """(tree, parents (T,), depths (T,), leaf_paths (T, depth + 1)): for every node, the root-to-leaf path of its
    first leaf (so the path through the node)."""
    tree = TokenTree.full(branches, depth)
    leaf_paths = []
    for i in range(tree.size):
        leaf = i
        while leaf * branches + 1 < tree.size:  # the first child in breadth-first order of a full tree
            leaf = leaf * branches + 1
        leaf_paths.append(tree.path(leaf))
    return (tree, torch.tensor(tree.parents), torch.tensor(tree.depths()), torch.tensor(leaf_paths))


@torch.no_grad()
def _draft_tree(draft: CausalLM, tree: tuple[int, int], last: Tensor, s_d: ModelState) -> tuple[Tensor, Tensor]:
    """The draft's top-b tokens per level: -> (nodes (m, T) in TokenTree.full order with ``last`` as the root,
    paths (m * b**d, d) root-to-leaf draft tokens, row-major)."""
    b, depth = tree
    m = last.shape[0]
    lg, s = draft.step(last, s_d)
    levels = [last[:, None]]
    paths = torch.empty((m, 0), dtype=torch.long, device=last.device)
    for level in range(depth):
        top = torch.topk(lg, b, dim=-1).indices  # (rows, b), best first
        paths = torch.cat([paths.repeat_interleave(b, 0), top.reshape(-1, 1)], 1)
        levels.append(top.reshape(m, -1))
        if level < depth - 1:
            lg, s = draft.step(top.reshape(-1), s.map(lambda t: t.repeat_interleave(b, 0)))
    return torch.cat(levels, 1), paths


@torch.no_grad()
def _tree_round(plan, draft: CausalLM, tree: tuple[int, int], last: Tensor, s_t: ModelState, s_d: ModelState,
                active: Tensor) -> tuple[Tensor, Tensor, ModelState, ModelState]:
    """One round with a tree of drafts (greedy): see the module docstring. Same returns as _chain_round."""
    nodes, paths = _draft_tree(draft, tree, last, s_d)
    if not tree_supported(plan.model):
        return _paths_round(plan, draft, tree, last, s_t, s_d, paths)
    tt, parents, depths, leaf_paths = _tree_tables(*tree)
    logits, snaps = forward_tree(plan.model, nodes, tt, s_t)
    g = torch.argmax(logits, dim=-1)  # (m, T)
    ok = torch.ones_like(nodes, dtype=torch.bool)
    for i in range(1, tt.size):  # parents come first: a node is accepted when its parent is and it matches
        p = int(parents[i])
        ok[:, i] = ok[:, p] & (nodes[:, i] == g[:, p])
    best = torch.argmax(ok.long() * (depths + 1), dim=1)  # the deepest accepted node (the path is unique)
    n = depths[best]
    chosen = nodes.gather(1, leaf_paths[best])  # (m, depth + 1): root, then a path through the best node
    final = g.gather(1, best[:, None]).squeeze(1)
    out = torch.cat([chosen[:, 1:], chosen[:, 1:2]], 1).scatter(1, n[:, None], final[:, None])
    _, dsnaps = forward_snapshots(draft, chosen, s_d)
    return out, n + 1, snaps.select(best), dsnaps.select(n + 1)


@torch.no_grad()
def _paths_round(plan, draft: CausalLM, tree: tuple[int, int], last: Tensor, s_t: ModelState, s_d: ModelState,
                 paths: Tensor) -> tuple[Tensor, Tensor, ModelState, ModelState]:
    """Tree verification for models without a tree form: every root-to-leaf path as its own batch row."""
    b, depth = tree
    m = last.shape[0]
    n_paths = b ** depth
    verify = torch.cat([last.repeat_interleave(n_paths)[:, None], paths], 1)  # (m * P, depth + 1)
    logits, snaps = forward_snapshots(plan.model, verify, s_t.map(lambda t: t.repeat_interleave(n_paths, 0)))
    g = torch.argmax(logits, dim=-1)
    n_all = torch.cumprod((paths == g[:, :depth]).long(), 1).sum(1).view(m, n_paths)
    best = torch.argmax(n_all, dim=1)  # the first longest path
    idx = torch.arange(m, device=last.device) * n_paths + best
    n = n_all.gather(1, best[:, None]).squeeze(1)
    chosen = paths[idx]
    final = g[idx].gather(1, n[:, None]).squeeze(1)
    out = torch.cat([chosen, chosen[:, :1]], 1).scatter(1, n[:, None], final[:, None])
    _, dsnaps = forward_snapshots(draft, torch.cat([last[:, None], chosen], 1), s_d)
    return out, n + 1, snaps.select(n + 1, idx), dsnaps.select(n + 1)
