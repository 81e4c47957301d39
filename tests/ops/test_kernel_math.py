"""The vectorisable float32 exp and softplus used inside the numba kernels, against torch in float64."""

from __future__ import annotations

import numba as nb
import numpy as np
import torch

from ssmkit.ops._numba_kernels import fast_exp, fast_softplus


@nb.njit(fastmath=True)
def _apply_exp(x, out):
    for i in range(x.size):
        out[i] = fast_exp(x[i])


@nb.njit(fastmath=True)
def _apply_softplus(x, out):
    for i in range(x.size):
        out[i] = fast_softplus(x[i])


def _grid() -> np.ndarray:
    return np.concatenate([np.linspace(-80, 80, 40001), np.logspace(-8, 1.9, 2000), -np.logspace(-8, 1.9, 2000)])


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float((np.abs(got - want) / np.abs(want)).max())


def test_softplus_float32_and_float64():
    x = _grid()
    want = torch.nn.functional.softplus(torch.from_numpy(x.astype(np.float32)).double()).numpy()
    out32 = np.empty(x.size, np.float32)
    _apply_softplus(x.astype(np.float32), out32)
    assert _rel_err(out32.astype(np.float64), want) < 5e-7
    out64 = np.empty(x.size)
    _apply_softplus(x, out64)
    assert _rel_err(out64, torch.nn.functional.softplus(torch.from_numpy(x)).numpy()) < 1e-13
    big = np.array([20.5, 50.0, 1e30], np.float32)
    out = np.empty_like(big)
    _apply_softplus(big, out)
    assert np.array_equal(out, big), "identity above 20, like torch"


def test_exp_float32():
    x = np.linspace(-80, 80, 40001).astype(np.float32)
    out = np.empty_like(x)
    _apply_exp(x, out)
    assert _rel_err(out.astype(np.float64), np.exp(x.astype(np.float64))) < 5e-7
