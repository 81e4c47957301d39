"""The streaming-store state row (ssmkit.ops._numba_stream.ssd_row) in float32 and float64 against numpy."""

import numba as nb
import numpy as np
import pytest

from ssmkit.ops import _numba_stream as S


@nb.njit(cache=True)
def _rows(ss, sn, x, n, da, dx):
    """ssd_row over every row of n items (x: B at [0, n), C at [n, 2 n)), then the fence; the readouts."""
    out = np.zeros(ss.shape[0] // n, dtype=ss.dtype)
    for r in range(out.shape[0]):
        out[r] = S.ssd_row(ss, sn, r * n, x, 0, n, da[r], dx[r], n)
    S.store_fence()
    return out


def _aligned(n_items: int, dtype) -> np.ndarray:
    """A zeroed 1-D array whose data starts on a 64-byte line."""
    raw = np.zeros(n_items + 64, dtype=dtype)
    skip = (-raw.ctypes.data % S.VECTOR_BYTES) // raw.itemsize
    return raw[skip:skip + n_items]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [16, 64])
def test_ssd_row_stores_and_reads_out_like_numpy(dtype, n):
    rng = np.random.default_rng(n)
    rows = 5
    ss = rng.standard_normal(rows * n).astype(dtype)
    x = rng.standard_normal(2 * n).astype(dtype)
    da, dx = rng.uniform(0.1, 1, rows).astype(dtype), rng.standard_normal(rows).astype(dtype)
    sn = _aligned(rows * n, dtype)
    assert sn.ctypes.data % S.VECTOR_BYTES == 0 and n % (S.VECTOR_BYTES // sn.itemsize) == 0
    got = _rows(ss, sn, x, n, da, dx)
    s64 = ss.astype(np.float64).reshape(rows, n) * da[:, None] + dx[:, None].astype(np.float64) * x[:n]
    want = s64 @ x[n:].astype(np.float64)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(sn.reshape(rows, n), s64, rtol=tol, atol=tol)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * (1 + np.abs(want).max()))
