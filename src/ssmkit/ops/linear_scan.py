"""The diagonal linear recurrence h_t = a_t * h_{t-1} + b_t: the core of every SSM in ssmkit."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import Tensor

from . import _numba_kernels as K
from ._checks import check_flag, check_reset, check_same, check_shape, check_tensor, reverse_reset
from ._torch_scan import doubling_scan
from .threads import kernel_threads

_FUSED_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a recurrence accumulates in: float32 for 16-bit inputs, the input dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_state(name: str, state: Tensor | None, expected_shape: tuple[int, ...], ref: Tensor) -> Tensor | None:
    """An initial state must match the expected shape, ``ref``'s device, and ``ref``'s dtype or its compute dtype."""
    if state is None:
        return None
    check_tensor(name, state)
    check_shape(name, state, expected_shape)
    if state.device != ref.device:
        raise ValueError(f"{name} is on device {state.device} but the inputs are on {ref.device}")
    allowed = {ref.dtype, compute_dtype(ref.dtype)}
    if state.dtype not in allowed:
        raise TypeError(f"{name} must have dtype {' or '.join(sorted(map(str, allowed)))}, got {state.dtype}")
    return state


_FUSED = {"enabled": True}


@contextlib.contextmanager
def fused_kernels(enabled: bool):
    """Context manager switching the fused CPU kernels on or off (off = the pure-PyTorch path other devices use).

    >>> with fused_kernels(False):
    ...     y = linear_scan(a, b)  # runs the device-agnostic path, e.g. to compare against the kernel
    """
    old = _FUSED["enabled"]
    _FUSED["enabled"] = bool(enabled)
    try:
        yield
    finally:
        _FUSED["enabled"] = old


def use_fused(*tensors: Tensor) -> bool:
    """Fused numba kernels run on CPU tensors (float32/64; complex too for the linear scan) unless switched off."""
    return _FUSED["enabled"] and all(t.device.type == "cpu" for t in tensors)


class _LinearScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor, reverse: bool) -> Tensor:
        a_, b_, h0_ = a.detach().contiguous(), b.detach().contiguous(), h0.detach().contiguous()
        out = torch.empty_like(b_)
        with kernel_threads(b_.numel()):
            K.linear_scan_fwd(a_.numpy(), b_.numpy(), h0_.numpy(), reverse, out.numpy())
        ctx.save_for_backward(a_, out, h0_)
        ctx.reverse = reverse
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        a, h, h0 = ctx.saved_tensors
        g = g.contiguous()
        ga, gb, gh0 = torch.empty_like(a), torch.empty_like(h), torch.empty_like(h0)
        with kernel_threads(h.numel()):
            K.linear_scan_bwd(a.numpy(), h.numpy(), h0.numpy(), g.numpy(), torch.zeros_like(h0).numpy(),
                              ctx.reverse, ga.numpy(), gb.numpy(), gh0.numpy())
        return ga, gb, gh0, None


def linear_scan(
    a: Tensor,
    b: Tensor,
    *,
    initial_state: Tensor | None = None,
    reset: Tensor | None = None,
    reverse: bool = False,
    return_final_state: bool = False,
):
    """Diagonal linear recurrence h_t = a_t * h_{t-1} + b_t along the length axis.

    Args:
        a: decays, (batch, length, *channels), real or complex.
        b: inputs, same shape and dtype as ``a``.
        initial_state: h_{-1}, (batch, *channels); zeros when None.
        reset: bool (batch, length); True at t starts a new segment: no state flows across it in either direction.
        reverse: scan right to left (h_t = a_t h_{t+1} + b_t); ``initial_state`` then enters at the last position.
        return_final_state: also return the state after the last processed step.

    Returns:
        h with the shape and dtype of ``b``, or ``(h, final_state)``; the final state is in the compute dtype
        (float32 for 16-bit inputs).
    """
    check_tensor("a", a)
    check_tensor("b", b, ndim=range(2, 16), what="(batch, length, *channels)")
    check_shape("a", a, b.shape, "(same as b; nothing is broadcast)")
    check_same("b", b, a=a)
    reverse = check_flag("reverse", reverse)
    check_flag("return_final_state", return_final_state)
    batch, length = b.shape[:2]
    if length == 0:
        raise ValueError("b must have length >= 1 along dim 1, got length 0")
    chan = tuple(b.shape[2:])
    check_state("initial_state", initial_state, (batch, *chan), b)
    reset = check_reset(reset, batch, length, b.device)

    cdt = compute_dtype(b.dtype)
    af, bf = a.to(cdt), b.to(cdt)
    h0 = None if initial_state is None else initial_state.to(cdt)
    if reset is not None:
        r = reverse_reset(reset) if reverse else reset
        af = af.masked_fill(r.reshape(batch, length, *([1] * len(chan))), 0)

    if use_fused(af, bf) and cdt in _FUSED_DTYPES:
        flat = (batch, length, int(np.prod(chan)) if chan else 1)
        h0f = torch.zeros(batch, flat[2], dtype=cdt) if h0 is None else h0.reshape(batch, flat[2])
        h = _LinearScanFn.apply(af.reshape(flat), bf.reshape(flat), h0f, reverse).reshape(b.shape)
    elif reverse:
        h = doubling_scan(af.flip(1), bf.flip(1), h0).flip(1)
    else:
        h = doubling_scan(af, bf, h0)
    final = h[:, 0] if reverse else h[:, -1]
    h = h.to(b.dtype)
    return (h, final) if return_final_state else h
