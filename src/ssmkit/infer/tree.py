"""Tree verification in one pass: every node of a token tree gets its state from its parent (a tree scan for Mamba
and Mamba-2, an ancestor mask for attention), so shared prefixes are computed once.

    tree = TokenTree.full(branches=2, depth=3)                   # node 0 = root, then level by level
    logits, snaps = forward_tree(model, node_ids, tree, state)   # node_ids (batch, nodes) -> (batch, nodes, vocab)
    state = snaps.select(node)                                   # node (batch,): state after the root..node path

Node ``i``'s logits are those a chain model gives after the path root..i, and ``select`` gives exactly the
state k single steps along that path reach. Supported mixers: Mamba, Mamba2 and causal attention without a
sliding window (:func:`tree_supported`); other models are verified as a batch of root-to-leaf paths instead
(see :mod:`ssmkit.infer.speculative`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers.attention import Attention, AttentionState
from ..layers.base import LayerState, SequenceLayer
from ..layers.mamba import Mamba, MambaState
from ..layers.mamba2 import Mamba2, Mamba2State
from ..models.heads import CausalLM
from ..models.outputs import ModelState


@dataclass(frozen=True)
class TokenTree:
    """A tree over nodes 0..T-1 in breadth-first order: parents[i] < i (parents[0] = -1, the root)."""

    parents: tuple[int, ...]

    @staticmethod
    def full(branches: int, depth: int) -> TokenTree:
        """The root, then ``branches`` children per node, ``depth`` levels below the root."""
        parents, level = [-1], [0]
        for _ in range(depth):
            nxt = []
            for p in level:
                for _ in range(branches):
                    nxt.append(len(parents))
                    parents.append(p)
            level = nxt
        return TokenTree(tuple(parents))

    def path(self, i: int) -> list[int]:
        """Nodes root..i."""
        out = []
        while i >= 0:
            out.append(i)
            i = self.parents[i]
        return out[::-1]

    @property
    def size(self) -> int:
        return len(self.parents)

    def depths(self) -> list[int]:
        return [len(self.path(i)) - 1 for i in range(self.size)]

    def levels(self) -> list[list[int]]:
        d = self.depths()
        return [[i for i in range(self.size) if d[i] == lv] for lv in range(max(d) + 1)]


def tree_supported(model: CausalLM) -> bool:
    """True when every mixer has a tree form (Mamba, Mamba2, causal attention without a sliding window)."""
    return all(_tree_class(b.mixer) is not None for b in model.backbone.blocks)


def _window_index(tree: TokenTree, width: int) -> Tensor:
    """(T, width) positions into [the width - 1 conv-state entries, the T nodes]: the last ``width`` inputs of
    each node's path (the node itself last)."""
    rows = []
    for i in range(tree.size):
        seq = list(range(width - 1)) + [width - 1 + j for j in tree.path(i)]
        rows.append(seq[len(seq) - width:])
    return torch.tensor(rows, dtype=torch.long)


class _ScanTree:
    """Mamba / Mamba2 over a tree: conv windows follow each node's path; states follow parents."""

    def __init__(self, layer: SequenceLayer, x: Tensor, state: LayerState, tree: TokenTree) -> None:
        self.layer, self.x, self.state, self.tree = layer, x, state, tree
        layer._check_state(state, x)

    def _conv(self, xc: Tensor) -> Tensor:
        conv = self.layer.conv1d
        width = conv.weight.shape[-1]
        self.ext = torch.cat([self.state.conv, xc.transpose(1, 2)], dim=2)  # (batch, C, W - 1 + T)
        self.index = _window_index(self.tree, width).to(xc.device)
        win = self.ext[:, :, self.index]  # (batch, C, T, W)
        y = (win * conv.weight[:, 0][:, None, :]).sum(-1)
        if conv.bias is not None:
            y = y + conv.bias[:, None]
        return y.transpose(1, 2)

    def _scan(self, decay: Tensor, inject: Tensor, h0: Tensor) -> Tensor:
        """h_i = decay_i * h_parent(i) + inject_i, level by level: -> states (batch, T, ...); self.states has
        the initial state at index 0 and node i at i + 1."""
        batch, T = inject.shape[:2]
        states = torch.empty((batch, T + 1, *inject.shape[2:]), dtype=inject.dtype, device=inject.device)
        states[:, 0] = h0
        par = torch.tensor(self.tree.parents) + 1
        for level in self.tree.levels():
            idx = torch.tensor(level)
            states[:, idx + 1] = torch.addcmul(inject[:, idx], decay[:, idx], states[:, par[idx]])
        self.states = states
        return states[:, 1:]

    def _conv_state(self, node: Tensor, rows: Tensor) -> Tensor:
        idx = self.index[node][:, 1:]  # (m, W - 1)
        ext = self.ext.index_select(0, rows)
        return ext.gather(2, idx[:, None, :].expand(-1, ext.shape[1], -1))


class _MambaTree(_ScanTree):
    def run(self) -> Tensor:
        m, s, x = self.layer, self.state, self.x
        xi, z = m.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self._conv(xi))
        dt_r, B, C = m.x_proj(u).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
        delta = F.softplus(F.linear(dt_r, m.dt_proj.weight) + m.dt_proj.bias)
        acc = s.ssm.dtype
        delta, u_acc = delta.to(acc), u.to(acc)
        decay = torch.exp(delta[..., None] * -torch.exp(m.A_log.to(acc)))
        inject = (delta * u_acc)[..., None] * B.to(acc)[:, :, None, :]
        h = self._scan(decay, inject, s.ssm)
        y = (h @ C.to(acc)[..., None]).squeeze(-1) + m.D.to(acc) * u_acc
        return m.out_proj((y * F.silu(z.to(acc))).to(x.dtype))

    def select(self, node: Tensor, rows: Tensor) -> MambaState:
        return MambaState(conv=self._conv_state(node, rows), ssm=self.states[rows, node + 1].contiguous())


class _Mamba2Tree(_ScanTree):
    def run(self) -> Tensor:
        m, s, x = self.layer, self.state, self.x
        batch, T, _ = x.shape
        H, P, G, N = m.nheads, m.headdim, m.ngroups, m.d_state
        z, xBC, dt = m.in_proj(x).split([m.d_inner, m.conv_dim, H], dim=-1)
        xs, B, C = F.silu(self._conv(xBC)).split([m.d_inner, G * N, G * N], dim=-1)
        acc = s.ssm.dtype
        dt = m._dt(dt).to(acc)
        decay = torch.exp(dt * -torch.exp(m.A_log.to(acc)))[..., None, None]
        xh = xs.to(acc).view(batch, T, G, H // G, P)
        inject = ((dt.view(batch, T, G, H // G, 1) * xh)[..., None] * B.to(acc).view(batch, T, G, 1, 1, N))
        h = self._scan(decay, inject.view(batch, T, H, P, N), s.ssm)
        y = (h.view(batch, T, G, H // G, P, N) @ C.to(acc).view(batch, T, G, 1, N, 1)).squeeze(-1)
        y = torch.addcmul(y, xh, m.D.to(acc).view(G, H // G, 1)).reshape(batch, T, m.d_inner)
        return m.out_proj(m.norm(y.to(x.dtype), z))

    def select(self, node: Tensor, rows: Tensor) -> Mamba2State:
        return Mamba2State(conv=self._conv_state(node, rows), ssm=self.states[rows, node + 1].contiguous())


class _AttentionTree:
    """Causal attention over a tree: a node sees the row's cache and its own ancestors (itself included)."""

    def __init__(self, layer: Attention, x: Tensor, state: AttentionState, tree: TokenTree) -> None:
        self.layer, self.x, self.tree = layer, x, tree
        self.state = layer.check_state(state, x.shape[0], dtype=layer.act_dtype(x))

    def run(self) -> Tensor:
        a, s, x = self.layer, self.state, self.x
        batch, T, _ = x.shape
        q, k, v = a.qkv(x).view(batch, T, 3, a.n_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        depth = torch.tensor(self.tree.depths(), device=x.device)
        if a.rotary:
            pos = s.pos[:, None] + depth[None, :]
            q, k = a._rotate(q, pos), a._rotate(k, pos)
        cache_len = s.k.shape[2]
        self.keys, self.vals = torch.cat([s.k, k], 2), torch.cat([s.v, v], 2)
        cached = torch.arange(cache_len, device=x.device)[None, :] >= cache_len - s.pos.clamp(max=cache_len)[:, None]
        anc = torch.zeros(T, T, dtype=torch.bool, device=x.device)
        for i in range(T):
            anc[i, self.tree.path(i)] = True
        mask = torch.cat([cached[:, None, :].expand(-1, T, -1), anc[None].expand(batch, -1, -1)], 2)
        out = F.scaled_dot_product_attention(q, self.keys, self.vals, attn_mask=mask[:, None])
        return a.out_proj(out.transpose(1, 2).reshape(batch, T, a.d_model))

    def select(self, node: Tensor, rows: Tensor) -> AttentionState:
        cache_len = self.state.k.shape[2]
        paths = [self.tree.path(int(i)) for i in node]
        longest = max(len(p) for p in paths)
        src = torch.tensor([[-1] * (longest - len(p)) + list(range(cache_len)) + [cache_len + j for j in p]
                            for p in paths], dtype=torch.long, device=node.device)  # (m, L), -1 = padding
        keys, vals = self.keys.index_select(0, rows), self.vals.index_select(0, rows)
        idx = src.clamp(min=0)[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
        keep = (src >= 0)[:, None, :, None].to(keys.dtype)
        keys, vals = keys.gather(2, idx) * keep, vals.gather(2, idx) * keep
        pos = self.state.pos.index_select(0, rows) + torch.tensor([len(p) for p in paths], device=node.device)
        first = keys.shape[2] - int(pos.clamp(max=keys.shape[2]).max())
        return AttentionState(k=keys[:, :, first:], v=vals[:, :, first:], pos=pos)


def _tree_class(layer: SequenceLayer):
    if type(layer) is Mamba and not layer.reverse and not layer.variant:  # a variant's block is not rebuilt here
        return _MambaTree
    if type(layer) is Mamba2 and not layer.reverse:
        return _Mamba2Tree
    if type(layer) is Attention and layer.window is None:
        return _AttentionTree
    return None


class TreeSnapshots:
    """The per-node states of a tree pass; see :func:`forward_tree`."""

    def __init__(self, layers: list, tree: TokenTree, batch: int) -> None:
        self.layers, self.tree, self.batch = layers, tree, batch

    def select(self, node: Tensor, rows: Tensor | None = None) -> ModelState:
        """The state after the path root..node[i] for pass row rows[i] (default: every row). node: (m,) int64."""
        if rows is None:
            rows = torch.arange(self.batch, device=node.device)
        if node.dtype != torch.long or node.shape != rows.shape or bool(
            ((node < 0) | (node >= self.tree.size)).any()
        ):
            raise ValueError(f"node must be int64 of shape {tuple(rows.shape)} in [0, {self.tree.size}), got "
                             f"{node.tolist()}")
        return ModelState([snap.select(node, rows) for snap in self.layers])


@torch.no_grad()
def forward_tree(model: CausalLM, ids: Tensor, tree: TokenTree, state: ModelState) -> tuple[Tensor, TreeSnapshots]:
    """Verify a token tree in one pass: ids (batch, T) node tokens in ``tree`` order -> (logits (batch, T, vocab),
    TreeSnapshots). Raises ValueError for a model with a mixer that has no tree form."""
    backbone = model.backbone
    ids = backbone.check_inputs(ids, "ids")
    if ids.shape[1] != tree.size:
        raise ValueError(f"ids has {ids.shape[1]} nodes but the tree has {tree.size}")
    states = backbone._check_state(state).layers
    h = backbone.embed(ids)
    snaps = []
    for block, s in zip(backbone.blocks, states, strict=True):
        cls = _tree_class(block.mixer)
        if cls is None:
            raise ValueError(f"layer {block.index} ({block.mixer_name}) has no tree form; verify the tree as a "
                             f"batch of paths")
        snap = cls(block.mixer, block.norm(h), s, tree)
        h = h + block.scale_output(snap.run()).to(h.dtype)
        h = block._mlp(h)
        snaps.append(snap)
    return model.lm_head(backbone.final_hidden(h)), TreeSnapshots(snaps, tree, ids.shape[0])
