"""A stack of Mamba-3 blocks stepped one token in one kernel launch (:mod:`._numba_decode_mamba3`).

    plan = Mamba3StackPlan(layers, norm_weights, final_weight, head=(w, None, b))
    hidden, states, logits = mamba3_stack_step(h, plan, states)

Each block is h <- h + mamba3(rmsnorm(h)), the layer of :class:`ssmkit.layers.Mamba3` (SISO or MIMO of rank R):
in_proj to (z, x, B, C, dt, A, trap, angle rates), RMSNorms on B and C, the SSM step of
:func:`ssmkit.ops.mamba3_step` (equal up to rounding), the silu(z) gate, the MIMO down-projection and
out_proj; then the final RMSNorm and an optional LM head. CPU, float32/float64 float weights, no gradient: the
caller (:mod:`ssmkit.models.fused_decode`) checks :attr:`Mamba3StackPlan.fusable` and otherwise steps block by
block. States per layer are ``(angle (b, H, S), ssm (b, H, P, N), k, x)`` with k (b, [R,] H, N) and
x (b, [R,] H, P) (no R axis for SISO), as :class:`ssmkit.layers.mamba3.Mamba3State` holds them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .mamba_step import WeightsKey, _np, _stacked, check_stack_extras
from .threads import kernel_threads


class Mamba3StepWeights(NamedTuple):
    """A Mamba-3 layer's parameters as the stack kernel takes them (float weights)."""

    in_w: Tensor  # (2 Di + 2 R G N + 3 H + S, d_model): rows (z, x, B, C, dt, A, trap, angles)
    in_b: Tensor | None
    dt_b: Tensor  # (H,)
    b_bias: Tensor  # (H, R, N)
    c_bias: Tensor  # (H, R, N)
    bn_w: Tensor  # (N,) the B RMSNorm's weight
    cn_w: Tensor  # (N,)
    d: Tensor  # (H,)
    mimo_x: Tensor | None  # (H, R, P), None for SISO
    mimo_z: Tensor | None
    mimo_o: Tensor | None
    out_w: Tensor  # (d_model, Di)
    out_b: Tensor | None
    ngroups: int
    headdim: int
    n_angles: int
    a_floor: float
    b_eps: float
    c_eps: float

    def tensors(self) -> list[Tensor]:
        """The tensor fields that are set, in field order."""
        return [t for t in self if isinstance(t, Tensor)]


_FIELDS = ("in_w", "in_b", "dt_b", "b_bias", "c_bias", "bn_w", "cn_w", "d", "mimo_x", "mimo_z", "mimo_o", "out_w",
           "out_b")


def _check_layer(i: int, w: Mamba3StepWeights, d_model: int) -> None:
    H, (_, R, N), P, G, S = w.dt_b.shape[0], w.b_bias.shape, w.headdim, w.ngroups, w.n_angles
    di, rows = H * P, 2 * H * P + 2 * R * G * N + 3 * H + S
    want = {"in_w": (rows, d_model), "in_b": (rows,), "d": (H,), "b_bias": (H, R, N), "c_bias": (H, R, N),
            "bn_w": (N,), "cn_w": (N,), "mimo_x": (H, R, P), "mimo_z": (H, R, P), "mimo_o": (H, R, P),
            "out_w": (d_model, di), "out_b": (d_model,)}
    for name, shape in want.items():
        t = getattr(w, name)
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"Mamba3StackPlan: layers[{i}].{name} must have shape {shape}, got {tuple(t.shape)}")
    if G < 1 or H % G or not 1 <= 2 * S <= N or ((w.mimo_x is None) != (w.mimo_z is None) or
                                                  (w.mimo_x is None) != (w.mimo_o is None)) or (
            w.mimo_x is None and R != 1):
        raise ValueError(f"Mamba3StackPlan: layers[{i}] needs ngroups dividing heads {H}, 1 <= 2 n_angles <= N "
                         f"{N} and all of mimo_x/z/o (or none, rank 1), got ngroups={G}, n_angles={S}")


class Mamba3StackPlan:
    """A stack of Mamba-3 blocks (h <- h + mamba3_l(rmsnorm_l(h)), a final RMSNorm, an optional float head
    (weight (V, d_model), None, bias or None)) prepared for :func:`mamba3_stack_step`: numpy views of the weights,
    built once and reused for every token. The layers share every shape (a_floor and the epsilons may differ)."""

    def __init__(self, layers: list[Mamba3StepWeights], norm_weights: list[Tensor], final_weight: Tensor, *,
                 norm_eps: float = 1e-5, final_eps: float = 1e-5,
                 head: tuple[Tensor, Tensor | None, Tensor | None] | None = None) -> None:
        if not layers or not all(isinstance(w, Mamba3StepWeights) for w in layers):
            raise ValueError("Mamba3StackPlan: layers must be a non-empty list of Mamba3StepWeights")
        first = layers[0]
        d_model = first.in_w.shape[1]
        for i, w in enumerate(layers):
            _check_layer(i, w, d_model)
            for name in _FIELDS:
                a, b = getattr(w, name), getattr(first, name)
                if (a is None) != (b is None) or (a is not None and (a.shape != b.shape or a.dtype != b.dtype)):
                    raise ValueError(f"Mamba3StackPlan: layers[{i}].{name} differs in shape or dtype from "
                                     f"layers[0].{name}")
            if (w.ngroups, w.headdim, w.n_angles) != (first.ngroups, first.headdim, first.n_angles):
                raise ValueError(f"Mamba3StackPlan: layers[{i}] differs in ngroups, headdim or n_angles from layers[0]")
        check_stack_extras("Mamba3StackPlan", len(layers), d_model, norm_weights, final_weight, head)
        if head is not None and head[1] is not None:
            raise ValueError("Mamba3StackPlan: head must have float weights (scale None)")
        self.layers, self.head, self.norm_weights = list(layers), head, list(norm_weights)
        self.eps, self.final_weight, self.final_eps = norm_eps, final_weight, final_eps
        self.mimo = first.mimo_x is not None
        tensors = [t for w in layers for t in w.tensors()] + self.norm_weights + [final_weight]
        tensors += [t for t in (head or ()) if t is not None]
        self.tensors = tensors  # every weight the launch reads
        self.key = WeightsKey(tensors)
        like = first.d
        self.dtype = like.dtype
        self.fusable = (like.dtype in (torch.float32, torch.float64) and all(t.device.type == "cpu" for t in tensors)
                        and all(t.dtype == like.dtype for t in tensors))
        if self.fusable:
            from numba.typed import List

            empty3 = like.new_empty(0, 0, 0)
            self.arrays = {name: List([_np(getattr(w, name) if getattr(w, name) is not None or name[:4] != "mimo"
                                           else empty3, like) for w in layers]) for name in _FIELDS}
            self.arrays["norm"] = List([_np(n, like) for n in self.norm_weights])
            self.arrays["final_w"] = _np(final_weight, like)
            self.arrays["consts"] = torch.tensor([[w.a_floor, w.b_eps, w.c_eps] for w in layers],
                                                 dtype=like.dtype).numpy()
            hw, _, hb = head if head is not None else (like.new_empty(0, d_model), None, None)
            self.arrays["head"] = (_np(hw, like), _np(hb, like))

    def dims(self) -> tuple[int, int, int, int, int, int]:
        """(H, P, R, G, N, S)."""
        w = self.layers[0]
        return w.dt_b.shape[0], w.headdim, w.b_bias.shape[1], w.ngroups, w.b_bias.shape[2], w.n_angles


State = tuple[Tensor, Tensor, Tensor, Tensor]


def _check_states(plan: Mamba3StackPlan, h: Tensor, states: list[State]) -> None:
    H, P, R, G, N, S = plan.dims()
    b = h.shape[0]
    kx = (b, H) if not plan.mimo else (b, R, H)
    want = ((b, H, S), (b, H, P, N), (*kx, N), (*kx, P))
    if len(states) != len(plan.layers):
        raise ValueError(f"mamba3_stack_step: need {len(plan.layers)} layer states, got {len(states)}")
    for i, st in enumerate(states):
        for name, t, shape in zip(("angle", "ssm", "k", "x"), st, want, strict=True):
            if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype != plan.dtype:
                got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"mamba3_stack_step: states[{i}].{name} must be {shape} {plan.dtype}, got {got}")


def mamba3_stack_step(h: Tensor, plan: Mamba3StackPlan, states: list[State]
                      ) -> tuple[Tensor, list[State], Tensor | None]:
    """One token through the stack: h (batch, d_model) embedded inputs -> (final-normed hidden (batch, d_model),
    the new (angle, ssm, k, x) per layer (new tensors; the states passed in are only read), the head's output
    (batch, V) or None). Needs ``plan.fusable`` and h in the plan's dtype on CPU (the caller's dispatch)."""
    if not isinstance(plan, Mamba3StackPlan) or not plan.fusable:
        raise ValueError("mamba3_stack_step: plan must be a fusable Mamba3StackPlan (CPU float32/float64 weights)")
    if not isinstance(h, Tensor) or h.ndim != 2 or h.shape[1] != plan.layers[0].in_w.shape[1] \
            or h.dtype != plan.dtype or h.device.type != "cpu" or h.shape[0] < 1:
        raise ValueError(f"mamba3_stack_step: h must be (batch >= 1, {plan.layers[0].in_w.shape[1]}) {plan.dtype} "
                         f"on CPU, got {tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__}")
    _check_states(plan, h, states)
    from . import _numba_decode as D
    from . import _numba_decode_mamba3 as K

    a, n_layers = plan.arrays, len(plan.layers)
    H, P, R, G, N, S = plan.dims()
    batch, di = h.shape[0], H * P
    th0, h0 = _stacked([s[0] for s in states]), _stacked([s[1] for s in states])
    k0, x0 = _stacked([s[2] for s in states]), _stacked([s[3] for s in states])
    kx = (n_layers, batch, H) if not plan.mimo else (n_layers, batch, R, H)
    th1, h1 = torch.empty_like(th0), torch.empty_like(h0)
    k1, x1 = h.new_empty(*kx, N), h.new_empty(*kx, P)
    resid = h.detach().clone()
    out = torch.empty_like(resid)
    head_w, head_b = a["head"]
    logits = h.new_empty(batch, head_w.shape[0])
    new = (lambda *s: h.new_empty(*s).numpy())  # noqa: E731
    with kernel_threads(plan.layers[0].in_w.numel() * batch * n_layers) as threads:
        counters = torch.zeros(D.counter_slots(K.STAGES * n_layers + 2, threads), dtype=torch.int64)
        K.mamba3_stack(
            resid.numpy(), a["norm"], plan.eps, a["final_w"], plan.final_eps, a["in_w"], a["in_b"], a["dt_b"],
            a["b_bias"], a["c_bias"], a["bn_w"], a["cn_w"], a["d"], a["mimo_x"], a["mimo_z"], a["mimo_o"],
            a["consts"], a["out_w"], a["out_b"], th0.numpy(), h0.numpy(),
            k0.view(n_layers, batch, R, H, N).numpy(), x0.view(n_layers, batch, R, H, P).numpy(), th1.numpy(),
            h1.numpy(), k1.view(n_layers, batch, R, H, N).numpy(), x1.view(n_layers, batch, 1, R, H, P).numpy(),
            new(batch, h.shape[1]), new(batch, di), new(batch, 2 * R * G * N),
            new(batch, 1, R, G, N), new(batch, 1, R, G, N), new(batch, 1, H), new(batch, 1, H), new(batch, 1, H),
            new(batch, 1, H, S), new(batch, di), out.numpy(), head_w, head_b, logits.numpy(), counters.numpy(),
            threads)
    layers = list(zip(th1.unbind(0), h1.unbind(0), k1.unbind(0), x1.unbind(0), strict=True))
    return out, layers, logits if plan.head is not None else None
