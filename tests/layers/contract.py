"""Shared checks of the layer contract (see ssmkit.layers.base). Family test files call these."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from ssmkit.layers.base import LayerState, SequenceLayer


def assert_close(actual: Tensor, expected: Tensor, rtol: float, what: str) -> None:
    """Max abs error relative to the expected tensor's scale (max |expected|, at least 1e-3)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    if expected.dtype == torch.bool:
        assert torch.equal(actual, expected), f"{what}: bool tensors differ"
        return
    scale = max(expected.abs().max().item(), 1e-3)
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:.1e} * scale {scale:.3e}"


def tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


def check_step_equivalence(layer: SequenceLayer, x: Tensor) -> None:
    """forward over x equals stepping token by token from init_state."""
    with torch.no_grad():
        y = layer(x)
        state = layer.init_state(x.shape[0], dtype=x.dtype)
        ys = []
        for t in range(x.shape[1]):
            yt, state = layer.step(x[:, t], state)
            ys.append(yt)
    assert_close(torch.stack(ys, 1), y, tol(x.dtype), f"{type(layer).__name__} step vs forward")


def check_split_state(layer: SequenceLayer, x: Tensor, t: int) -> None:
    """forward on [0, t) then on [t, L) with the returned state equals forward on [0, L)."""
    with torch.no_grad():
        y = layer(x)
        y1, s = layer(x[:, :t], return_final_state=True)
        y2, s2 = layer(x[:, t:], s, return_final_state=True)
        _, s_whole = layer(x, return_final_state=True)
    assert_close(torch.cat([y1, y2], 1), y, tol(x.dtype), f"{type(layer).__name__} split at {t}")
    for name, a in s2.tensors().items():
        assert_close(a, s_whole.tensors()[name], tol(x.dtype), f"{type(layer).__name__} final state {name}")


def check_reset_packing(layer: SequenceLayer, seqs: list[Tensor]) -> None:
    """A packed row with reset at each sequence start equals running each sequence alone.

    seqs: list of (1, L_i, d_model). The packed batch holds two rows: the sequences in order and reversed.
    """
    with torch.no_grad():
        alone = [layer(s) for s in seqs]
        rows, resets, outs = [], [], []
        for order in (seqs, seqs[::-1]):
            rows.append(torch.cat(order, 1))
            r = torch.zeros(rows[-1].shape[1], dtype=torch.bool)
            pos = 0
            for s in order:
                r[pos] = True
                pos += s.shape[1]
            resets.append(r)
        packed = layer(torch.cat(rows, 0), reset=torch.stack(resets, 0))
        outs = [torch.cat(alone, 1), torch.cat(alone[::-1], 1)]
    for i in range(2):
        assert_close(packed[i], outs[i][0], tol(seqs[0].dtype), f"{type(layer).__name__} packed row {i}")


def check_contract(layer: SequenceLayer, x: Tensor, t: int | None, seqs: list[Tensor]) -> None:
    """The three invariants at once: step == forward on x, split at t (skipped when None) == whole, and packing
    the sequences ``seqs`` (each (1, L_i, d_model)) with resets == running each alone."""
    check_step_equivalence(layer, x)
    if t is not None:
        check_split_state(layer, x, t)
    check_reset_packing(layer, seqs)


def run_steps(layer: SequenceLayer, x: Tensor, state: LayerState | None = None) -> tuple[Tensor, LayerState]:
    """Step through x in the layer's direction (last to first when ``layer.reverse``): (outputs in the original
    order (batch, length, d_model), the final state)."""
    state = layer.init_state(x.shape[0], dtype=x.dtype) if state is None else state
    order = range(x.shape[1] - 1, -1, -1) if getattr(layer, "reverse", False) else range(x.shape[1])
    ys = {}
    with torch.no_grad():
        for t in order:
            ys[t], state = layer.step(x[:, t], state)
    return torch.stack([ys[t] for t in range(x.shape[1])], 1), state


def check_reverse_contract(layer: SequenceLayer, x: Tensor, t: int, seqs: list[Tensor]) -> None:
    """reverse=True: stepping last-to-first equals forward (outputs and final state); [t, L) first, then its state
    into [0, t), equals the whole (outputs and final state); packing ``seqs`` with resets equals running each
    alone."""
    dt = x.dtype
    with torch.no_grad():
        y, s_whole = layer(x, return_final_state=True)
        ys, s_step = run_steps(layer, x)
        assert_close(ys, y, tol(dt), "reverse step vs forward")
        for name, a in s_step.tensors().items():
            assert_close(a, s_whole.tensors()[name], tol(dt), f"reverse step final state {name}")
        y_right, s = layer(x[:, t:], return_final_state=True)
        y_left, s2 = layer(x[:, :t], s, return_final_state=True)
        assert_close(torch.cat([y_left, y_right], 1), y, tol(dt), "reverse split")
        for name, a in s2.tensors().items():
            assert_close(a, s_whole.tensors()[name], tol(dt), f"reverse split final state {name}")
    check_reset_packing(layer, seqs)


def random_reset(batch: int, length: int, seed: int, p: float = 0.25) -> Tensor:
    """Bool (batch, length) segment starts, each position True with probability p."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, length, generator=g) < p


def check_split_with_reset(layer: SequenceLayer, x: Tensor, reset: Tensor, t: int, rtol: float,
                           state_rtol: dict[str, float]) -> None:
    """Split at t with resets on both sides, the state passed across: outputs within ``rtol`` of the whole
    forward, and every final-state field within its ``state_rtol`` (all fields must be listed)."""
    with torch.no_grad():
        y, s = layer(x, reset=reset, return_final_state=True)
        y1, s1 = layer(x[:, :t], reset=reset[:, :t], return_final_state=True)
        y2, s2 = layer(x[:, t:], s1, reset=reset[:, t:], return_final_state=True)
    assert_close(torch.cat([y1, y2], 1), y, rtol, "split with reset")
    whole = s.tensors()
    assert set(whole) == set(state_rtol), f"state fields {sorted(whole)} != {sorted(state_rtol)}"
    for name, a in s2.tensors().items():
        assert_close(a, whole[name], state_rtol[name], f"{name} state")


def check_gradcheck_with_state(layer: SequenceLayer, x: Tensor, state: LayerState, *, reset: Tensor | None = None,
                               names: Sequence[str] | None = None, **gradcheck_kw) -> None:
    """torch.autograd.gradcheck of forward from ``state`` (a flat LayerState) -- the output and every final-state
    tensor (complex ones as real pairs) -- with respect to x, every initial-state tensor and the parameters
    ``names`` (all by default)."""
    named = dict(layer.named_parameters())
    names = list(named) if names is None else list(names)
    params = [named[n].detach().clone().requires_grad_() for n in names]
    fields = [f.name for f in dataclasses.fields(state)]
    leaves = [getattr(state, f).detach().clone().requires_grad_() for f in fields]
    kwargs = {"return_final_state": True} if reset is None else {"reset": reset, "return_final_state": True}
    n = len(fields)

    def fn(x, *ts):
        s0 = type(state)(**dict(zip(fields, ts[:n], strict=True)))
        y, s = torch.func.functional_call(layer, dict(zip(names, ts[n:], strict=True)), (x, s0), kwargs)
        outs = (getattr(s, f) for f in fields)
        return (y, *(torch.view_as_real(o) if o.is_complex() else o for o in outs))

    x = x.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(fn, (x, *leaves, *params), **gradcheck_kw)


def check_bf16_close_to_f32(layer: SequenceLayer, x: Tensor, rtol: float = 3e-2) -> None:
    """A float32 layer and input cast to bfloat16 give a bfloat16 output within ``rtol`` of the float32 one.
    (The layer is left in bfloat16.)"""
    with torch.no_grad():
        want = layer(x)
        y = layer.to(torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), want, rtol, "bf16 vs fp32")
