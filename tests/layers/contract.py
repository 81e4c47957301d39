"""Shared checks of the layer contract (see ssmkit.layers.base). Family test files call these."""

from __future__ import annotations

import torch
from torch import Tensor

from ssmkit.layers.base import SequenceLayer


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
