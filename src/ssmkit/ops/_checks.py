"""Argument validation shared by the ops: every failure names the argument, what it got and what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def check_tensor(name: str, x: object, *, ndim: int | Sequence[int] | None = None, what: str = "") -> Tensor:
    """Require ``x`` to be a floating or complex tensor of one of the given ranks."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' ' + what if what else ''}, got {type(x).__name__}")
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"{name} must be a floating-point or complex tensor, got dtype {x.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            ranks = (f">= {ndim.start}" if isinstance(ndim, range) else " or ".join(str(r) for r in allowed))
            raise ValueError(
                f"{name} must have rank {ranks}{' ' + what if what else ''}, got shape {tuple(x.shape)}"
            )
    return x


def check_shape(name: str, x: Tensor, expected: Sequence[int], what: str = "") -> None:
    """Require ``x.shape == expected`` exactly (no broadcasting)."""
    if tuple(x.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {tuple(expected)}{' ' + what if what else ''}, got {tuple(x.shape)}"
        )


def check_same(ref_name: str, ref: Tensor, **others: Tensor | None) -> None:
    """Require every tensor in ``others`` to share ``ref``'s device and dtype (nothing is cast silently)."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{name} is on device {t.device} but {ref_name} is on {ref.device}; move them together")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; cast them explicitly")


_HALF = (torch.float16, torch.bfloat16)


def check_params(act_name: str, act: Tensor, **params: Tensor | None) -> None:
    """Mixed precision as in mamba_ssm: each parameter has the activations' dtype or, when the activations are
    16-bit (float16/bfloat16), float32. Anything else (e.g. float64 parameters with float32 activations) is a
    TypeError: nothing is cast down silently. Devices must match."""
    for name, t in params.items():
        if t is None:
            continue
        if t.device != act.device:
            raise ValueError(f"{name} is on device {t.device} but {act_name} is on {act.device}; move them together")
        if t.dtype != act.dtype and not (act.dtype in _HALF and t.dtype == torch.float32):
            raise TypeError(f"{name} has dtype {t.dtype} but {act_name} has dtype {act.dtype}; parameters must "
                            f"have the activations' dtype, or float32 with 16-bit activations")


def check_reset(reset: object, batch: int, length: int, device: torch.device) -> Tensor | None:
    """Validate a ``reset`` mask: a bool tensor of shape (batch, length) on ``device``."""
    if reset is None:
        return None
    if not isinstance(reset, Tensor):
        raise TypeError(f"reset must be a bool torch.Tensor of shape ({batch}, {length}), got {type(reset).__name__}")
    if reset.dtype != torch.bool:
        raise TypeError(f"reset must have dtype torch.bool, got {reset.dtype}")
    if tuple(reset.shape) != (batch, length):
        raise ValueError(f"reset must have shape (batch, length) = ({batch}, {length}), got {tuple(reset.shape)}")
    if reset.device != device:
        raise ValueError(f"reset is on device {reset.device} but the inputs are on {device}")
    return reset


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def reverse_reset(reset: Tensor | None) -> Tensor | None:
    """Reset mask for a right-to-left scan, expressed in left-to-right positions.

    ``reset[:, t]`` marks the start of a segment at ``t``. A reverse scan must not carry state from ``t`` into
    ``t - 1``, so the state is zeroed before reverse step ``t`` exactly when ``reset[:, t + 1]`` is True.
    """
    if reset is None:
        return None
    shifted = torch.zeros_like(reset)
    shifted[:, :-1] = reset[:, 1:]
    return shifted
