"""The contract every ssmkit sequence layer honours, and the checks that enforce it.

    forward(x, initial_state=None, *, reset=None, return_final_state=False) -> y or (y, final_state)
                                                                 x: (batch, length, d_model)
    step(x_t, state) -> (y_t, state)                             x_t: (batch, d_model)
    init_state(batch_size, *, dtype=None) -> state               a LayerState dataclass

The state keywords are the ops' (``initial_state``, ``return_final_state``); the old ``state=`` and
``return_state=`` keywords still work with a DeprecationWarning (:func:`state_kwargs`).

Mixed precision: outside ``torch.autocast`` x must have the parameters' dtype (TypeError otherwise). Inside
``torch.autocast`` a float32 layer also accepts x in the autocast dtype; its projections run in that dtype
(torch's autocast) and everything else (short convolutions, scans, SSM kernels, norms, gates, states) in
float32 (:func:`to_compute`, :func:`no_autocast`); parameters and their gradients stay float32.

States are small dataclasses of tensors (subclasses of :class:`LayerState`). A state is checked against the layer's
own ``init_state`` on every call, so a state from another layer or batch size fails with a named error.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

from ..ops._checks import reverse_reset


@dataclass
class LayerState:
    """Base for per-layer recurrent states. Subclasses declare tensor (or nested LayerState) fields."""

    def map(self, fn):
        """A new state with ``fn`` applied to every tensor (recursing into nested states)."""
        vals = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            vals[f.name] = v.map(fn) if isinstance(v, LayerState) else (fn(v) if isinstance(v, Tensor) else v)
        return type(self)(**vals)

    def tensors(self) -> dict[str, Tensor]:
        """Flat {name: tensor} view, nested names joined by '.'."""
        out: dict[str, Tensor] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, LayerState):
                out.update({f"{f.name}.{k}": t for k, t in v.tensors().items()})
            elif isinstance(v, Tensor):
                out[f.name] = v
        return out


def cut_at_segment_start(state: LayerState, reset: Tensor | None) -> LayerState:
    """Right-to-left chunks: zero the carried state of rows whose chunk starts a segment (reset[:, 0]), since
    the chunk to the left belongs to another segment."""
    if reset is None:
        return state
    keep = ~reset[:, 0]
    return state.map(lambda t: t * keep.view(-1, *([1] * (t.ndim - 1))).to(t.dtype))


class SequenceLayer(nn.Module):
    """Base class: input checks, state checks and the default ``step`` (forward over one token).

    Subclasses set ``self.d_model`` and implement ``forward`` and ``init_state``; they override ``step`` with a
    true O(1) recurrence where the default (a length-1 forward) would not be one.
    """

    d_model: int
    can_step: bool = True

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype of the layer's floating-point weights (parameters, else buffers such as the scales of
        int8-quantized projections)."""
        return self._first_float().dtype

    @property
    def param_device(self) -> torch.device:
        return self._first_float().device

    def check_dtype(self, x: Tensor, name: str = "x") -> None:
        """TypeError unless ``x`` has the layer's parameter dtype (nothing is cast silently), or, inside
        ``torch.autocast`` for x's device with float32 parameters, the autocast dtype."""
        if x.dtype == self.param_dtype or (x.dtype == autocast_dtype(x) and self.param_dtype == torch.float32):
            return
        raise TypeError(f"{type(self).__name__}: {name} has dtype {x.dtype} but the layer's parameters are "
                        f"{self.param_dtype}; cast the input or the layer explicitly")

    def act_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype of the layer's activations and states for input x: float32 under autocast, else x's."""
        return torch.float32 if self.under_autocast(x) else x.dtype

    def under_autocast(self, x: Tensor) -> bool:
        """True inside ``torch.autocast`` for x's device with float32 parameters: the layer then runs its
        projections in the autocast dtype (torch's autocast does that) and everything else (convolutions,
        scans, norms, gates, states) in float32; see :func:`to_compute`."""
        return autocast_dtype(x) is not None and self.param_dtype == torch.float32

    def _first_float(self) -> Tensor:
        for t in itertools.chain(self.parameters(), self.buffers()):
            if t.is_floating_point():
                return t
        raise RuntimeError(f"{type(self).__name__} holds no floating-point weights")

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> LayerState:
        raise NotImplementedError

    def step(self, x_t: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        """One token: x_t (batch, d_model) -> (y_t (batch, d_model), new state)."""
        self.check_step_input(x_t)
        y, state = self.forward(x_t.unsqueeze(1), state, return_final_state=True)
        return y.squeeze(1), state

    # ---------------------------------------------------------------------------------------- checks
    def check_input(self, x: object, name: str = "x") -> Tensor:
        """x must be a floating tensor (batch, length, d_model) with length >= 1."""
        cls = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{cls}: {name} must be a torch.Tensor (batch, length, d_model), got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{cls}: {name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.ndim != 3 or x.shape[-1] != self.d_model or x.shape[1] < 1:
            raise ValueError(
                f"{cls}: {name} must have shape (batch, length>=1, d_model={self.d_model}), got {tuple(x.shape)}"
            )
        return x

    def check_step_input(self, x_t: object) -> Tensor:
        cls = type(self).__name__
        if not self.can_step:
            raise NotImplementedError(f"{cls} cannot step token by token: {self.step_unsupported_reason()}")
        if not isinstance(x_t, Tensor) or x_t.ndim != 2 or x_t.shape[-1] != self.d_model:
            got = tuple(x_t.shape) if isinstance(x_t, Tensor) else type(x_t).__name__
            raise ValueError(f"{cls}.step: x_t must have shape (batch, d_model={self.d_model}), got {got}")
        return x_t

    def step_unsupported_reason(self) -> str:
        return "it has no recurrent form"

    def check_reset(self, reset: object, x: Tensor) -> Tensor | None:
        if reset is None:
            return None
        cls = type(self).__name__
        shape = (x.shape[0], x.shape[1])
        if not isinstance(reset, Tensor) or reset.dtype != torch.bool or tuple(reset.shape) != shape:
            got = (f"{tuple(reset.shape)} {reset.dtype}" if isinstance(reset, Tensor) else type(reset).__name__)
            raise ValueError(f"{cls}: reset must be a bool tensor of shape (batch, length) = {shape}, got {got}")
        return reset

    def expected_state(self, batch_size: int, dtype: torch.dtype | None = None) -> LayerState:
        """``init_state(batch_size, dtype=dtype)``, cached per (batch size, dtype, parameter device/dtype), so that
        checking a state on every ``step`` does not allocate a fresh zero state. Callers must not modify it."""
        p = next(self.parameters(), None)
        key = (batch_size, dtype, None if p is None else (p.device, p.dtype))
        cache = self.__dict__.setdefault("_expected_state_cache", {})
        if key not in cache:
            if len(cache) > 8:
                cache.clear()
            cache[key] = self.init_state(batch_size, dtype=dtype)
        return cache[key]

    def check_state(self, state: object, batch_size: int, dtype: torch.dtype | None = None) -> LayerState:
        """Compare ``state`` with this layer's own ``init_state(batch_size)``: same type, field names and shapes."""
        cls = type(self).__name__
        expected = self.expected_state(batch_size, dtype)
        if type(state) is not type(expected):
            raise TypeError(
                f"{cls}: state must be a {type(expected).__name__} (from {cls}.init_state or a {cls} forward), "
                f"got {type(state).__name__}"
            )
        want, got = expected.tensors(), state.tensors()
        for name, t in want.items():
            g = got.get(name)
            if g is None or tuple(g.shape) != tuple(t.shape):
                raise ValueError(
                    f"{cls}: state.{name} must have shape {tuple(t.shape)} for batch_size={batch_size}, got "
                    f"{None if g is None else tuple(g.shape)}; was this state made by another layer or batch size?"
                )
        return state


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The lower-precision dtype of ``torch.autocast`` when it is enabled for x's device type, else None."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def no_autocast(x: Tensor):
    """Context manager switching ``torch.autocast`` off for x's device type: an SSM core (kernel generation,
    FFT convolution, scan) runs in its compute dtype even inside an autocast region."""
    return torch.autocast(x.device.type, enabled=False)


def to_compute(layer: SequenceLayer, *ts: Tensor | None):
    """Inside ``torch.autocast`` (float32 layer): every floating tensor cast to float32, so that a projection's
    bfloat16/float16 output meets the convolutions, scans and norms in float32, as mamba_ssm runs its scan
    (gradients flow back through the cast). Outside autocast: the tensors unchanged (nothing is cast silently).
    Returns one tensor for one argument, else a tuple."""
    live = next((t for t in ts if t is not None), None)
    on = live is not None and layer.under_autocast(live)
    out = tuple(t.float() if on and t is not None and t.is_floating_point() else t for t in ts)
    return out[0] if len(out) == 1 else out


def flip_reset(reset: Tensor | None) -> Tensor | None:
    """Segment starts of the time-flipped sequence: reset (batch, length) -> (batch, length). A segment
    starting at t means nothing flows from t into t - 1 right to left, so flipped position L - t starts one;
    flipped position 0 never does (the state handed in, the context to the right, flows into it)."""
    return None if reset is None else reverse_reset(reset).flip(1)


def check_state_dtypes(owner: str, state: LayerState, expected: LayerState) -> None:
    """Every state tensor must have the dtype and device of the layer's own ``init_state`` for this input."""
    want = expected.tensors()
    for name, t in state.tensors().items():
        if t.dtype != want[name].dtype or t.device != want[name].device:
            raise TypeError(f"{owner}: state.{name} must have dtype {want[name].dtype} on "
                            f"{want[name].device} for this input, got {t.dtype} on {t.device}")


def check_flag(owner: str, name: str, value: object) -> bool:
    """A flag must be a bool (1, None or a tensor are rejected, not truth-tested)."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a bool, got {type(value).__name__}")
    return value


# deprecated keyword -> its name in the one vocabulary (the ops'), for forwards of layers and models
DEPRECATED_STATE_KWARGS = {"state": "initial_state", "return_state": "return_final_state"}
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _caller_stacklevel() -> int:
    """``warnings.warn`` stacklevel of the first frame outside this module and torch (nn.Module.__call__), so a
    deprecation warning names the line that used the old keyword."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or frame.f_code.co_filename.startswith(_TORCH_DIR)):
        frame, level = frame.f_back, level + 1
    return level


def rename_state_kwargs(owner: str, kwargs: dict) -> dict:
    """Map the deprecated ``state=`` / ``return_state=`` keywords in ``kwargs`` (in place) to ``initial_state=`` /
    ``return_final_state=`` with a DeprecationWarning; both spellings at once is a TypeError."""
    for old, new in DEPRECATED_STATE_KWARGS.items():
        if old in kwargs:
            if new in kwargs:
                raise TypeError(f"{owner}: got both {new}= and its deprecated alias {old}=; give {new}= only")
            warnings.warn(f"{owner}: the keyword {old}= is deprecated; use {new}=", DeprecationWarning,
                          stacklevel=_caller_stacklevel())
            kwargs[new] = kwargs.pop(old)
    return kwargs


F = TypeVar("F", bound=Callable)


def state_kwargs(forward: F) -> F:
    """Decorator for ``forward(self, x, initial_state=None, *, ..., return_final_state=False)`` of a layer or model:
    accepts the deprecated keywords (:func:`rename_state_kwargs`) and rejects a non-bool ``return_final_state``
    with a one-line TypeError."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        owner = f"{type(self).__name__}.forward"
        if "state" in kwargs or "return_state" in kwargs:
            rename_state_kwargs(owner, kwargs)
        if "return_final_state" in kwargs:
            check_flag(owner, "return_final_state", kwargs["return_final_state"])
        return forward(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def check_choice(owner: str, name: str, value: object, choices: tuple[str, ...]) -> str:
    """A string option must be one of ``choices``; the error names the option and lists the accepted values."""
    if value not in choices:
        raise ValueError(f"{owner}: unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value  # type: ignore[return-value]


def check_d_model(owner: str, d_model: object) -> int:
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
        raise ValueError(f"{owner}: d_model must be a positive int, got {d_model!r}")
    return d_model


def linear_weights(module: nn.Module) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(weight, per-row scale or None, bias or None) of a linear layer: an ``nn.Linear`` (float weight) or an
    int8 weight-only layer holding ``qweight`` (out, in) int8 and ``scale`` (out,) (ssmkit.infer's Int8Linear)."""
    if isinstance(module, nn.Linear):
        return module.weight, None, module.bias
    q, scale = getattr(module, "qweight", None), getattr(module, "scale", None)
    if isinstance(q, Tensor) and q.dtype == torch.int8 and isinstance(scale, Tensor):
        return q, scale, getattr(module, "bias", None)
    raise TypeError(f"linear_weights: expected nn.Linear or an int8 linear layer, got {type(module).__name__}")
