"""Multi-token steps with per-row rollback: feed k tokens in one parallel pass, then keep any prefix of them.

Speculative decoding verifies k drafted tokens at once and keeps, per row, only the first n of them. The state
after n tokens must then be exactly the state k single steps would have reached after n. This module runs the
pass and returns, beside the logits at every position, a :class:`Snapshots` object that hands out the state after
any per-row number of tokens (ragged rows: row b keeps ``n[b]`` tokens, 0 <= n[b] <= k).

    logits, snaps = forward_snapshots(model, ids, state)       # ids (batch, k) -> logits (batch, k, vocab)
    state = snaps.select(n)                                      # n (batch,) int64: state after n[b] tokens

How each layer family rolls back (chosen per mixer class, most specific first):

* Mamba / Mamba2: the projections and the short conv run over the k positions at once; the recurrence runs
  position by position in PyTorch (the same update ``step`` makes), keeping the state after every position
  (k + 1 states of (d_inner, d_state) per row; k is small); ``select`` picks row b's state at n[b] and slices
  the stored conv input window there. Nothing is recomputed.
* Attention (causal or prefix, no sliding window) and grouped-query attention: the KV cache after all k tokens,
  with row b's last k - n[b] entries cut off and the row shifted right (the cache is right-aligned; ``pos`` masks
  the padding).
* Every other layer (S4, S4D, H3, LongConv, GatedSSM, RG-LRU, sliding-window attention): ``select`` runs the
  layer's own forward over each row's kept prefix from the stored initial state (rows grouped by n), which is
  exact by the layer contract (split sequences equal whole ones) and costs one extra pass of that mixer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers.attention import Attention, AttentionState
from ..layers.base import LayerState, SequenceLayer
from ..layers.gqa import GQAttention
from ..layers.mamba import Mamba, MambaState
from ..layers.mamba2 import Mamba2, Mamba2State
from ..models.heads import CausalLM
from ..models.outputs import ModelState
from .states import _merge_layer


def _index(state: LayerState, rows: Tensor) -> LayerState:
    return state.map(lambda t: t.index_select(0, rows))


def _check_counts(n: object, batch: int, k: int) -> Tensor:
    if not isinstance(n, Tensor) or n.dtype != torch.long or tuple(n.shape) != (batch,):
        got = f"{tuple(n.shape)} {n.dtype}" if isinstance(n, Tensor) else type(n).__name__
        raise ValueError(f"n must be an int64 tensor of shape ({batch},), got {got}")
    if batch and bool(((n < 0) | (n > k)).any()):
        raise ValueError(f"n must lie in [0, {k}] (tokens fed in the pass), got {n.tolist()}")
    return n


class LayerSnapshots:
    """Generic rollback: the layer's forward over each row's kept prefix from the initial state."""

    def __init__(self, layer: SequenceLayer, x: Tensor, state: LayerState) -> None:
        self.layer, self.x, self.state = layer, x, state

    def run(self) -> Tensor:
        y, _ = self.layer(self.x, self.state, return_final_state=True)
        return y

    def select(self, n: Tensor, rows: Tensor) -> LayerState:
        """The state of snapshot rows ``rows`` (m,) after ``n`` (m,) of the k tokens."""
        parts, where = [], []
        for v in torch.unique(n).tolist():
            pick = (n == v).nonzero().squeeze(1)
            src = rows[pick]
            s = _index(self.state, src)
            if v > 0:
                _, s = self.layer(self.x[src, :v], s, return_final_state=True)
            parts.append(s)
            where.append(pick)
        return _merge_layer(parts, where, n.shape[0], type(self.layer).__name__)


def _conv_window(window: Tensor, n: Tensor, rows: Tensor, width: int) -> Tensor:
    """window (batch, channels, width + k) -> (m, channels, width): entries n[i] .. n[i] + width - 1 of row
    rows[i] (the last ``width`` conv inputs after n[i] new tokens)."""
    w = window.index_select(0, rows)
    idx = n[:, None] + torch.arange(width, device=w.device)
    return w.gather(2, idx[:, None, :].expand(-1, w.shape[1], -1))


def _kept(n: Tensor, k: int) -> Tensor:
    """(m, k) bool: position t is kept in row i when t < n[i]."""
    return torch.arange(k, device=n.device)[None, :] < n[:, None]


class _ScanSnapshots(LayerSnapshots):
    """Shared by Mamba and Mamba2: the conv input window and the recurrent state after every position."""

    def _conv(self, xc: Tensor) -> Tensor:
        """The short conv over the stored window: xc (batch, k, channels) -> (batch, k, channels)."""
        conv = self.layer.conv1d
        self.window = torch.cat([self.state.conv, xc.transpose(1, 2)], dim=2)
        return F.conv1d(self.window, conv.weight, conv.bias, groups=self.window.shape[1]).transpose(1, 2)

    def _scan(self, decay: Tensor, inject: Tensor, h: Tensor) -> Tensor:
        """h_t = decay_t * h_{t-1} + inject_t for t < k (decay broadcastable to inject (batch, k, ...)): the
        states (batch, k + 1, ...) with the initial one first (the recurrence ``step`` runs, position by
        position)."""
        states = [h]
        for t in range(inject.shape[1]):
            h = torch.addcmul(inject[:, t], decay[:, t], h)
            states.append(h)
        self.states = torch.stack(states, 1)
        return self.states[:, 1:]

    def _states_at(self, n: Tensor, rows: Tensor) -> Tensor:
        return self.states[rows, n]


class MambaSnapshots(_ScanSnapshots):
    """Mamba: the scan runs position by position in PyTorch (k is small), keeping every state."""

    def run(self) -> Tensor:
        m, s, x = self.layer, self.state, self.x
        m._check_state(s, x)
        xi, z = m.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self._conv(xi))
        dt_r, B, C = m.x_proj(u).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
        delta = F.softplus(F.linear(dt_r, m.dt_proj.weight) + m.dt_proj.bias)  # (batch, k, d_inner)
        acc = s.ssm.dtype
        delta, u_acc = delta.to(acc), u.to(acc)
        decay = torch.exp(delta[..., None] * -torch.exp(m.A_log.to(acc)))  # (batch, k, d_inner, N)
        inject = (delta * u_acc)[..., None] * B.to(acc)[:, :, None, :]
        h = self._scan(decay, inject, s.ssm)
        y = (h @ C.to(acc)[..., None]).squeeze(-1) + m.D.to(acc) * u_acc
        return m.out_proj((y * F.silu(z.to(acc))).to(x.dtype))

    def select(self, n: Tensor, rows: Tensor) -> MambaState:
        conv = _conv_window(self.window, n, rows, self.layer.d_conv - 1)
        return MambaState(conv=conv, ssm=self._states_at(n, rows).contiguous())


class Mamba2Snapshots(_ScanSnapshots):
    """Mamba-2: the SSD recurrence runs position by position in PyTorch (k is small), keeping every state."""

    def run(self) -> Tensor:
        m, s, x = self.layer, self.state, self.x
        m._check_state(s, x)
        batch, k, _ = x.shape
        H, P, G, N = m.nheads, m.headdim, m.ngroups, m.d_state
        z, xBC, dt = m.in_proj(x).split([m.d_inner, m.conv_dim, H], dim=-1)
        xs, B, C = F.silu(self._conv(xBC)).split([m.d_inner, G * N, G * N], dim=-1)
        acc = s.ssm.dtype
        dt = m._dt(dt).to(acc)  # (batch, k, H)
        decay = torch.exp(dt * -torch.exp(m.A_log.to(acc)))[..., None, None]  # (batch, k, H, 1, 1)
        xh = xs.to(acc).view(batch, k, G, H // G, P)
        Bg = B.to(acc).view(batch, k, G, 1, 1, N)
        inject = ((dt.view(batch, k, G, H // G, 1) * xh)[..., None] * Bg).view(batch, k, H, P, N)
        h = self._scan(decay, inject, s.ssm)  # (batch, k, H, P, N)
        y = (h.view(batch, k, G, H // G, P, N) @ C.to(acc).view(batch, k, G, 1, N, 1)).squeeze(-1)
        y = torch.addcmul(y, xh, m.D.to(acc).view(G, H // G, 1)).reshape(batch, k, m.d_inner)
        return m.out_proj(m.norm(y.to(x.dtype), z))

    def select(self, n: Tensor, rows: Tensor) -> Mamba2State:
        conv = _conv_window(self.window, n, rows, self.layer.d_conv - 1)
        return Mamba2State(conv=conv, ssm=self._states_at(n, rows).contiguous())


class AttentionSnapshots(LayerSnapshots):
    """Causal attention: the cache after all k tokens, cut back per row."""

    def run(self) -> Tensor:
        y, self.final = self.layer(self.x, self.state, return_final_state=True)
        return y

    def select(self, n: Tensor, rows: Tensor) -> AttentionState:
        k = self.x.shape[1]
        keys, vals = self.final.k.index_select(0, rows), self.final.v.index_select(0, rows)
        length = keys.shape[2]
        pos = self.state.pos.index_select(0, rows) + n
        src = torch.arange(length, device=n.device)[None, :] - (k - n)[:, None]  # (m, length)
        ok = src >= 0
        idx = src.clamp(min=0)[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
        keep = ok[:, None, :, None].to(keys.dtype)
        keys, vals = keys.gather(2, idx) * keep, vals.gather(2, idx) * keep
        first = length - int(pos.clamp(max=length).max()) if pos.numel() else length
        return AttentionState(k=keys[:, :, first:], v=vals[:, :, first:], pos=pos)


def _snapshot_class(layer: SequenceLayer) -> Callable[..., LayerSnapshots]:
    if type(layer) is Mamba and not layer.reverse and not layer.variant:  # a variant's block is not rebuilt here
        return MambaSnapshots
    if type(layer) is Mamba2 and not layer.reverse:
        return Mamba2Snapshots
    if (type(layer) is Attention and layer.window is None) or type(layer) is GQAttention:
        return AttentionSnapshots
    return LayerSnapshots


class Snapshots:
    """The states a multi-token pass went through, per layer; see :func:`forward_snapshots`."""

    def __init__(self, layers: list[LayerSnapshots], batch: int, k: int) -> None:
        self.layers, self.batch, self.k = layers, batch, k

    def select(self, n: Tensor, rows: Tensor | None = None) -> ModelState:
        """The ModelState after ``n[i]`` of the k tokens for snapshot row ``rows[i]`` (default: every row).

        n: (m,) int64 in [0, k]; rows: (m,) int64 row indices of the pass (may repeat or reorder rows)."""
        if rows is None:
            rows = torch.arange(self.batch, device=n.device)
        n = _check_counts(n, rows.shape[0], self.k)
        return ModelState([snap.select(n, rows) for snap in self.layers])


@torch.no_grad()
def forward_snapshots(model: CausalLM, ids: Tensor, state: ModelState) -> tuple[Tensor, Snapshots]:
    """Feed ``ids`` (batch, k) from ``state`` in one pass: -> (logits (batch, k, vocab), Snapshots).

    Equals k single ``model.step`` calls (logits at every position; ``select`` gives the state after any
    per-row number of them). The model must be causal (no bidirectional layers)."""
    if not isinstance(model, CausalLM):
        raise TypeError(f"model must be an ssmkit CausalLM, got {type(model).__name__}")
    backbone = model.backbone
    ids = backbone.check_inputs(ids, "ids")
    states = backbone._check_state(state).layers
    batch, k = ids.shape
    h = backbone.embed(ids)
    snaps = []
    for block, s in zip(backbone.blocks, states, strict=True):
        if not block.can_step:
            raise ValueError(f"layer {block.index} ({block.mixer_name}) is bidirectional; multi-token steps "
                             f"need causal layers")
        snap = _snapshot_class(block.mixer)(block.mixer, block.norm(h), s)
        h = h + block.scale_output(snap.run()).to(h.dtype)
        h = block._mlp(h)
        snaps.append(snap)
    logits = model.lm_head(backbone.final_hidden(h))
    return logits, Snapshots(snaps, batch, k)
