"""Sequence parallelism for S4 with its DPLR (non-diagonal) state: a dense per-channel transition.

S4's DPLR layer is linear time-invariant with a dense discrete transition Ā (d_model, N, N) in the real
coordinates u = (Re s, Im s) of its state s (N = d_state). A shard of L_r tokens therefore maps its initial state to

    u_final = T_r u_0 + b_r,    T_r = Ā^{L_r} (0 in rows whose shard has a reset),

with b_r the final state from u_0 = 0. T_r does not depend on the data: one step of the layer with zero input
from the N real basis states gives Ā (a length-1 run of N rows, read off the layer's own forward, no internals),
and ``torch.linalg.matrix_power`` raises it to L_r (O(N³ log L_r) per channel). b_r is one no-grad pass of the
batch from zero (in pieces of SUMMARY_CHUNK tokens). The per-row (T_r, b_r) are all-gathered: P · batch ·
d_model · (N² + N) values, whatever L is; the scan runs as matrix-vector products, and the backward's state
gradients run the transposes, G_r = a_r + T_r^T G_{r+1}, in the same real coordinates (torch's complex gradient
convention: grad = dL/dRe + i dL/dIm).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor

from ..layers.base import SequenceLayer
from ..layers.s4 import S4


def is_dense(layer: SequenceLayer) -> bool:
    """True for layers whose state transition is a dense matrix per channel (S4 with a DPLR state)."""
    return isinstance(layer, S4) and not layer.diagonal


def to_real(s: Tensor) -> Tensor:
    """Complex (..., N/2) -> real (..., N): (Re s, Im s)."""
    return torch.cat([s.real, s.imag], -1)


def to_complex(u: Tensor) -> Tensor:
    n2 = u.shape[-1] // 2
    return torch.complex(u[..., :n2], u[..., n2:])


def one_step(layer: SequenceLayer, zero_state, name: str, local) -> Tensor:
    """Ā (d_model, N, N) in real coordinates: the final states of one zero-input step from the N basis states."""
    s = getattr(zero_state, name)  # (batch, H, N2) complex
    _, H, n2 = s.shape
    eye = torch.eye(n2, dtype=s.dtype, device=s.device)
    basis = torch.cat([eye, 1j * eye])[:, None, :].expand(2 * n2, H, n2).contiguous()  # (N, H, N2)
    state = dataclasses.replace(layer.init_state(2 * n2, dtype=s.real.dtype), **{name: basis})
    x0 = torch.zeros(2 * n2, 1, layer.d_model, dtype=s.real.dtype, device=s.device)
    _, fin = local(layer, x0, state, return_final_state=True)
    return to_real(getattr(fin, name)).permute(1, 2, 0)  # column k: the image of basis state k


def transition(layer: SequenceLayer, zero_state, name: str, length: int, reset: Tensor | None, local) -> Tensor:
    """T_r (batch, H, N, N): Ā^length, zero in rows with a reset in the shard."""
    T = torch.linalg.matrix_power(one_step(layer, zero_state, name, local), length)
    batch = getattr(zero_state, name).shape[0]
    keep = torch.ones(batch, dtype=T.dtype, device=T.device) if reset is None else (~reset.any(1)).to(T.dtype)
    return T[None] * keep[:, None, None, None]


def scan(ms: Tensor, bs: Tensor, upto: int) -> Tensor:
    """u_0 = 0, u_{j+1} = T_j u_j + b_j (real coordinates); ms (P, batch, H, N, N), bs (P, batch, H, N)."""
    u = torch.zeros_like(bs[0])
    for j in range(upto):
        u = (ms[j] @ u[..., None])[..., 0] + bs[j]
    return u


def adjoint(m: Tensor, g: Tensor) -> Tensor:
    """T^T applied to a complex state gradient g (batch, H, N/2), in real coordinates, returned complex."""
    return to_complex((m.transpose(-1, -2) @ to_real(g)[..., None])[..., 0])


def summary(layer: SequenceLayer, x: Tensor, reset: Tensor | None, zero_state, name: str, chunk: int, local,
            cut, gather, rev: bool, group: dist.ProcessGroup | None) -> tuple[Tensor, Tensor]:
    """(the gathered T of every rank (P, batch, H, N, N) in chain order, b (P, batch, H, N/2) complex: the final
    state from ``zero_state``, which holds rank 0's given initial state there). Run under
    no_grad. ``local``, ``cut``, ``gather``: the recurrent module's layer call, reverse cut and ordered all-gather."""
    state = zero_state
    starts = range(0, x.shape[1], chunk)
    for a in (reversed(starts) if rev else starts):
        rc = None if reset is None else reset[:, a:a + chunk]
        _, state = local(layer, x[:, a:a + chunk], state, reset=rc, return_final_state=True)
        state = dataclasses.replace(state, **cut({name: getattr(state, name)}, rc, rev))
    T = transition(layer, zero_state, name, x.shape[1], reset, local)
    ms = gather(T, group, rev)
    bs = gather(getattr(state, name), group, rev)
    return ms, bs
