"""The weights of a Mamba (S6) block as the decode step takes them (:class:`MambaStepWeights`), and the shape
checks of the step and of a stack plan's norms and head. Used by :mod:`.mamba_step` and the other families' steps.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class MambaStepWeights(NamedTuple):
    """The parameters of a Mamba block as :func:`mamba_step` uses them (shapes as in transformers' MambaMixer)."""

    in_w: Tensor  # (2 Di, d_model)
    in_b: Tensor | None  # (2 Di,)
    conv_w: Tensor  # (Di, K)
    conv_b: Tensor | None  # (Di,)
    x_w: Tensor  # (R + 2N, Di)
    dt_w: Tensor  # (Di, R)
    dt_b: Tensor  # (Di,)
    a_log: Tensor  # (Di, N)
    d: Tensor  # (Di,)
    out_w: Tensor  # (d_model, Di)
    out_b: Tensor | None  # (d_model,)
    # int8 weight-only layers (ssmkit.ops.quantize_int8): in_w / x_w / out_w int8 with these per-row scales;
    # int4 (ssmkit.ops.int4_linear): in_w / x_w / out_w packed (rows, in / 2) with 2-D scales (rows, in / group)
    in_scale: Tensor | None = None  # (2 Di,) or (2 Di, d_model / group)
    x_scale: Tensor | None = None  # (R + 2N,) or (R + 2N, Di / group)
    out_scale: Tensor | None = None  # (d_model,) or (d_model, Di / group)


_OPTIONAL = frozenset({"in_b", "conv_b", "out_b", "in_scale", "x_scale", "out_scale"})


def _shape_error(name: str, want: tuple, got: Tensor | None) -> ValueError:
    desc = "None" if got is None else f"{tuple(got.shape)}"
    return ValueError(f"mamba_step: {name} must have shape {want}, got {desc}")


def check_step_args(x: Tensor, w: MambaStepWeights, conv_state: Tensor, ssm_state: Tensor) -> None:
    """Shapes consistent with each other; raises ValueError naming the argument."""
    if not isinstance(w, MambaStepWeights):
        raise TypeError(f"mamba_step: weights must be a MambaStepWeights, got {type(w).__name__}")
    if not isinstance(x, Tensor) or x.ndim != 2:
        raise ValueError(f"mamba_step: x must be (batch, d_model), got {getattr(x, 'shape', type(x).__name__)}")
    batch, d_model = x.shape
    if w.in_w.ndim != 2 or _cols(w.in_w, w.in_scale) != d_model or w.in_w.shape[0] % 2:
        raise _shape_error("weights.in_w", ("2 * d_inner", d_model), w.in_w)
    di = w.in_w.shape[0] // 2
    if w.conv_w.ndim != 2 or w.conv_w.shape[0] != di:
        raise _shape_error("weights.conv_w", (di, "width"), w.conv_w)
    width = w.conv_w.shape[1]
    if w.a_log.ndim != 2 or w.a_log.shape[0] != di:
        raise _shape_error("weights.a_log", (di, "d_state"), w.a_log)
    n_state = w.a_log.shape[1]
    if w.dt_w.ndim != 2 or w.dt_w.shape[0] != di:
        raise _shape_error("weights.dt_w", (di, "dt_rank"), w.dt_w)
    rank = w.dt_w.shape[1]
    expected = {"in_b": (2 * di,), "conv_b": (di,), "dt_b": (di,), "d": (di,), "out_b": (d_model,)}
    for name, shape in expected.items():
        t = getattr(w, name)
        if t is None and name in _OPTIONAL:
            continue
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            raise _shape_error(f"weights.{name}", shape, t)
    for name, scale, shape in (("in_w", "in_scale", (2 * di, d_model)), ("x_w", "x_scale", (rank + 2 * n_state, di)),
                               ("out_w", "out_scale", (d_model, di))):
        t, sc = getattr(w, name), getattr(w, scale)
        if sc is not None and (not isinstance(sc, Tensor) or sc.ndim not in (1, 2) or sc.shape[0] != shape[0]
                               or (sc.ndim == 2 and not _valid_groups(shape[1], sc.shape[1]))):
            raise ValueError(f"mamba_step: weights.{scale} must be ({shape[0]},) (int8) or ({shape[0]}, groups) "
                             f"with groups dividing {shape[1]} into even groups (int4), got {_desc(sc)}")
        if not isinstance(t, Tensor) or t.ndim != 2 or (t.shape[0], _cols(t, sc)) != shape:
            want = shape if sc is None or sc.ndim == 1 else (shape[0], shape[1] // 2)
            raise _shape_error(f"weights.{name}", want, t)
        if (t.dtype == torch.int8) != (sc is not None):
            given = "given" if sc is not None else "None"
            raise ValueError(f"mamba_step: weights.{name} must be int8 exactly when weights.{scale} is given, "
                             f"got {t.dtype} with {scale} {given}")
    if not isinstance(conv_state, Tensor) or tuple(conv_state.shape) != (batch, di, width - 1):
        raise _shape_error("conv_state", (batch, di, width - 1), conv_state)
    if not isinstance(ssm_state, Tensor) or tuple(ssm_state.shape) != (batch, di, n_state):
        raise _shape_error("ssm_state", (batch, di, n_state), ssm_state)


def _desc(t: object) -> str:
    return f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__


def _cols(w: Tensor, scale: Tensor | None) -> int:
    """The input features of a weight: packed int4 (a 2-D scale) holds two per byte."""
    return 2 * w.shape[1] if isinstance(scale, Tensor) and scale.ndim == 2 else w.shape[1]


def _valid_groups(cols: int, groups: int) -> bool:
    return groups > 0 and cols % groups == 0 and (cols // groups) % 2 == 0


def check_stack_extras(owner: str, n_layers: int, d_model: int, norm_weights: list[Tensor] | None,
                       final_weight: Tensor | None, head: tuple | None) -> None:
    """The block norms, final norm and head of a stack plan fit ``n_layers`` blocks of width ``d_model``."""
    if norm_weights is not None and (len(norm_weights) != n_layers
                                     or any(tuple(n.shape) != (d_model,) for n in norm_weights)):
        raise ValueError(f"{owner}: norm_weights must be {n_layers} tensors of shape ({d_model},)")
    if final_weight is not None and tuple(final_weight.shape) != (d_model,):
        raise ValueError(f"{owner}: final_weight must have shape ({d_model},), got {tuple(final_weight.shape)}")
    if head is not None:
        hw, hs, hb = head
        if (hw.ndim != 2 or _cols(hw, hs) != d_model or (hw.dtype == torch.int8) != (hs is not None)
                or (hs is not None and (hs.ndim not in (1, 2) or hs.shape[0] != hw.shape[0]
                                        or (hs.ndim == 2 and not _valid_groups(d_model, hs.shape[1]))))):
            raise ValueError(f"{owner}: head weight must be (V, {d_model}) (or packed int4 (V, {d_model // 2}) "
                             f"with a (V, groups) scale), int8 exactly when a scale is given, "
                             f"got {tuple(hw.shape)} {hw.dtype}")
