"""Plain, obviously-correct loop versions of every op: the oracles the fast paths are tested against.

They follow the definitions step by step, run in float64 when given float64, and are differentiable through
autograd. They are slow (a Python loop over time) and meant only for tests and small checks. They validate
nothing: call the public ops for checked arguments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import reverse_reset
from .reference_mamba2 import mamba2_stack_step, mamba2_step  # noqa: F401  (the Mamba-2 decode oracles)
from .reference_mamba3 import mamba3  # noqa: F401  (Mamba-3's oracle lives in its own file)


def _acc(t: Tensor) -> torch.dtype:
    """Accumulation dtype: at least float32 (complex64 for complex)."""
    if t.is_complex():
        return torch.complex128 if t.dtype == torch.complex128 else torch.complex64
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _time_order(length: int, reverse: bool) -> list[int]:
    return list(range(length - 1, -1, -1)) if reverse else list(range(length))


def linear_scan(
    a: Tensor,
    b: Tensor,
    *,
    initial_state: Tensor | None = None,
    reset: Tensor | None = None,
    reverse: bool = False,
    return_final_state: bool = False,
):
    """h_t = a_t * h_{t-1} + b_t over dim 1. a, b: (batch, length, *channels) -> h like b."""
    acc = _acc(b)
    a_t, b_t = a.to(acc).unbind(1), b.to(acc).unbind(1)
    r = reverse_reset(reset) if reverse else reset
    h = torch.zeros_like(b_t[0]) if initial_state is None else initial_state.to(acc)
    out: list[Tensor | None] = [None] * b.shape[1]
    for t in _time_order(b.shape[1], reverse):
        keep = h if r is None else h * (~r[:, t]).reshape(-1, *([1] * (h.ndim - 1))).to(h.real.dtype)
        h = a_t[t] * keep + b_t[t]
        out[t] = h
    y = torch.stack(out, 1).to(b.dtype)
    return (y, h) if return_final_state else y


def _expand_groups(M: Tensor, dim: int) -> Tensor:
    """(batch, length, N) or (batch, length, groups, N) -> (batch, length, dim, N)."""
    if M.ndim == 3:
        return M.unsqueeze(2).expand(-1, -1, dim, -1)
    return M.repeat_interleave(dim // M.shape[2], dim=2)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    *,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    reset: Tensor | None = None,
    reverse: bool = False,
    return_final_state: bool = False,
):
    """Mamba's S6, one step at a time.

    dt = softplus(delta + delta_bias); h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t; y_t = C_t h_t + D u_t;
    out = y * silu(z). u, delta, z: (batch, length, dim); A: (dim, N); B, C: (batch, length[, groups], N);
    state: (batch, dim, N). Complex A, B, C (and state): y_t = 2 Re(C_t · h_t) + D u_t.
    """
    acc = _acc(u)
    sacc = _acc(A) if A.is_complex() else acc  # the state's dtype
    dim = u.shape[2]
    dt = delta.to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)
    if delta_softplus:
        dt = F.softplus(dt)
    Af = A.to(sacc)
    Bx, Cx = _expand_groups(B.to(sacc), dim), _expand_groups(C.to(sacc), dim)
    uf = u.to(acc)
    r = reverse_reset(reset) if reverse else reset
    h = u.new_zeros(u.shape[0], dim, A.shape[1], dtype=sacc) if initial_state is None else initial_state.to(sacc)
    dts, us, Bs, Cs = dt.unbind(1), uf.unbind(1), Bx.unbind(1), Cx.unbind(1)
    ys: list[Tensor | None] = [None] * u.shape[1]
    for t in _time_order(u.shape[1], reverse):
        decay = torch.exp(dts[t].unsqueeze(-1) * Af)
        if r is not None:
            decay = decay * (~r[:, t]).to(acc).reshape(-1, 1, 1)
        h = decay * h + (dts[t] * us[t]).unsqueeze(-1) * Bs[t]
        ys[t] = (h * Cs[t]).sum(-1)
    y = torch.stack(ys, 1)
    if y.is_complex():
        y = 2 * y.real
    if D is not None:
        y = y + uf * D.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    y = y.to(u.dtype)
    return (y, h) if return_final_state else y


def ssd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    reset: Tensor | None = None,
    reverse: bool = False,
    return_final_state: bool = False,
):
    """Mamba-2's SSD as a recurrence. x: (batch, length, heads, head_dim); dt: (batch, length, heads);
    A: (heads,); B, C: (batch, length, groups, N); D: (heads,); state: (batch, heads, head_dim, N).

    h_t = exp(dt_t A) h_t-1 + dt_t x_t B_t^T;  y_t = h_t C_t + D x_t.
    """
    acc = _acc(x)
    batch, length, heads, head_dim = x.shape
    rep = heads // B.shape[2]
    Bh = B.to(acc).repeat_interleave(rep, dim=2)
    Ch = C.to(acc).repeat_interleave(rep, dim=2)
    xf, dtf, Af = x.to(acc), dt.to(acc), A.to(acc)
    r = reverse_reset(reset) if reverse else reset
    h = x.new_zeros(batch, heads, head_dim, B.shape[3], dtype=acc) if initial_state is None else initial_state.to(acc)
    xs, dts, Bs, Cs = xf.unbind(1), dtf.unbind(1), Bh.unbind(1), Ch.unbind(1)
    ys: list[Tensor | None] = [None] * length
    for t in _time_order(length, reverse):
        decay = torch.exp(dts[t] * Af)
        if r is not None:
            decay = decay * (~r[:, t]).to(acc).unsqueeze(-1)
        h = decay[..., None, None] * h + (dts[t][..., None] * xs[t]).unsqueeze(-1) * Bs[t].unsqueeze(2)
        ys[t] = (h * Cs[t].unsqueeze(2)).sum(-1)
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + xf * D.to(acc)[:, None]
    y = y.to(x.dtype)
    return (y, h) if return_final_state else y


def ssd_quadratic(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, D: Tensor | None = None) -> Tensor:
    """SSD's "attention form": y = (L ∘ C B^T)(dt x), with L_ts = exp(sum_{s<r<=t} dt_r A) for s <= t."""
    acc = _acc(x)
    heads = x.shape[2]
    rep = heads // B.shape[2]
    Bh = B.to(acc).repeat_interleave(rep, dim=2)
    Ch = C.to(acc).repeat_interleave(rep, dim=2)
    a = dt.to(acc) * A.to(acc)  # (b, l, h)
    cum = torch.cumsum(a, 1)
    seg = cum.unsqueeze(2) - cum.unsqueeze(1)  # (b, t, s, h): sum_{s<r<=t}
    length = x.shape[1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=x.device))
    Lmat = torch.where(causal[None, :, :, None], torch.exp(seg), torch.zeros((), dtype=acc, device=x.device))
    scores = torch.einsum("bthn,bshn->btsh", Ch, Bh) * Lmat
    y = torch.einsum("btsh,bsh,bshp->bthp", scores, dt.to(acc), x.to(acc))
    if D is not None:
        y = y + x.to(acc) * D.to(acc)[:, None]
    return y.to(x.dtype)


def fft_conv(u: Tensor, k: Tensor, *, D: Tensor | None = None, bidirectional: bool = False) -> Tensor:
    """Direct convolution, one lag at a time. u: (batch, length, channels); k: (channels, K), or (2, channels, K)
    when bidirectional (k[0] causal, k[1] anti-causal; both include lag 0).

    y_t = sum_{s=0}^{K-1} k[s] u_{t-s}  (+ sum_s k1[s] u_{t+s} when bidirectional)  + D u_t.
    """
    acc = _acc(u)
    uf = u.to(acc)
    length = u.shape[1]
    kf = k.to(acc)
    fwd, bwd = (kf[0], kf[1]) if bidirectional else (kf, None)
    y = torch.zeros_like(uf)
    for s in range(min(fwd.shape[-1], length)):
        y = y + F.pad(uf[:, : length - s] * fwd[:, s], (0, 0, s, 0))
        if bwd is not None:
            y = y + F.pad(uf[:, s:] * bwd[:, s], (0, 0, 0, s))
    if D is not None:
        y = y + uf * D.to(acc)
    return y.to(u.dtype)


def direct_conv_matrix(u: Tensor, k: Tensor) -> Tensor:
    """O(L^2) causal convolution through an explicit Toeplitz matrix. u: (batch, length, channels); k: (channels, K)."""
    length, K = u.shape[1], k.shape[-1]
    idx = torch.arange(length, device=u.device)
    lag = idx[:, None] - idx[None, :]  # (t, s)
    valid = (lag >= 0) & (lag < K)
    T = torch.where(valid[None], k[:, lag.clamp(0, K - 1)], torch.zeros((), dtype=k.dtype, device=k.device))
    return torch.einsum("cts,bsc->btc", T, u.to(k.dtype))


def int8_linear(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """Oracle of :func:`ssmkit.ops.int8_linear`: dequantize (in x's dtype, e.g. float64) and multiply."""
    w = q.to(x.dtype) * scale.to(x.dtype)[:, None]
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def q8_activations(x: Tensor, block: int = 32) -> Tensor:
    """Oracle of the integer-activation products' input (:mod:`ssmkit.ops.q8_act`): each block of ``block``
    inputs of x (..., K) (the last one shorter if K is not a multiple) becomes round(x / d) * d with
    d = max|x_block| / 127 (all zeros for an all-zero block), in x's dtype."""
    out = torch.zeros_like(x)
    for k0 in range(0, x.shape[-1], block):
        xb = x[..., k0:k0 + block]
        d = xb.abs().amax(-1, keepdim=True) / 127
        nonzero = (d > 0).expand_as(xb)
        out[..., k0:k0 + block][nonzero] = (torch.round(xb / d) * d)[nonzero]
    return out


def q8_linear(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """Oracle of a quantized linear with integer activations: F.linear of :func:`q8_activations` (x) and the
    dequantized weight (int8 with per-row scale, or packed int4 with a 2-D group scale), in x's dtype."""
    from .reference_mamba2 import _lin

    return _lin(q8_activations(x.reshape(-1, x.shape[-1])), weight, scale, bias).reshape(*x.shape[:-1], -1)


def mamba_step(x: Tensor, w, conv_state: Tensor, ssm_state: Tensor, act_quant: bool = False
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Oracle of :func:`ssmkit.ops.mamba_step` (w: a MambaStepWeights), one formula per line in x's dtype;
    ``act_quant``: quantized weights multiply :func:`q8_activations` of their input."""
    dt_ = x.dtype

    def lin(v: Tensor, weight: Tensor, scale: Tensor | None, bias: Tensor | None) -> Tensor:
        if act_quant and scale is not None:
            return q8_linear(v, weight, scale, bias)
        wf = weight.to(dt_) if scale is None else weight.to(dt_) * scale.to(dt_)[:, None]
        out = torch.einsum("bk,ok->bo", v, wf)
        return out if bias is None else out + bias.to(dt_)

    def silu(v: Tensor) -> Tensor:
        return v * torch.sigmoid(v)

    di, rank, n = w.d.shape[0], w.dt_w.shape[1], w.a_log.shape[1]
    xz = lin(x, w.in_w, w.in_scale, w.in_b)
    x_in, z = xz[:, :di], xz[:, di:]
    window = torch.cat([conv_state.to(dt_), x_in[:, :, None]], dim=2)  # oldest first, newest last
    conv = torch.einsum("bck,ck->bc", window, w.conv_w.to(dt_))
    u = silu(conv if w.conv_b is None else conv + w.conv_b.to(dt_))
    proj = lin(u, w.x_w, w.x_scale, None)
    dt_low, B, C = proj[:, :rank], proj[:, rank:rank + n], proj[:, rank + n:]
    dt = F.softplus(lin(dt_low, w.dt_w, None, w.dt_b))
    A = -torch.exp(w.a_log.to(dt_))  # (Di, N)
    h = torch.exp(dt[:, :, None] * A) * ssm_state.to(dt_) + (dt * u)[:, :, None] * B[:, None, :]
    y = (h * C[:, None, :]).sum(-1) + w.d.to(dt_) * u
    y = y * silu(z)
    return lin(y, w.out_w, w.out_scale, w.out_b), window[:, :, 1:], h


def mamba_stack_step(h: Tensor, layers, norm_weights, eps: float, final_weight: Tensor | None, final_eps: float,
                     conv_states, ssm_states, head=None, act_quant: bool = False):
    """Oracle of :func:`ssmkit.ops.mamba_stack_step`: h <- h + mamba_step(rmsnorm(h)) block by block, the final
    RMSNorm, then the optional head (weight, scale or None, bias or None). Returns (hidden, convs, ssms, logits).
    ``act_quant``: quantized weights multiply :func:`q8_activations` of their input."""

    def rms(v: Tensor, w: Tensor | None, e: float) -> Tensor:
        return v if w is None else v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + e) * w.to(v.dtype)

    convs, ssms = [], []
    for i, w in enumerate(layers):
        y, c, s = mamba_step(rms(h, None if norm_weights is None else norm_weights[i], eps), w, conv_states[i],
                             ssm_states[i], act_quant)
        h = h + y
        convs.append(c)
        ssms.append(s)
    hidden = rms(h, final_weight, final_eps)
    logits = None
    if head is not None:
        hw, hs, hb = head
        if act_quant and hs is not None:
            logits = q8_linear(hidden, hw, hs, hb)
        else:
            wf = hw.to(h.dtype) if hs is None else hw.to(h.dtype) * hs.to(h.dtype)[:, None]
            logits = torch.einsum("bk,vk->bv", hidden, wf) + (0 if hb is None else hb.to(h.dtype))
    return hidden, convs, ssms, logits
