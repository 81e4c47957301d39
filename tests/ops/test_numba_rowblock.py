"""The register-blocked multi-row products of the hybrid decode kernel (ops._numba_rowblock) against numpy in
float64: every input-row count (one, two, three, four, and past), weight-row tails and offsets, with and without
a bias."""

from __future__ import annotations

import numba as nb
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.ops._numba_rowblock import rows_blocked


@nb.njit(cache=True)
def _products(x, w, lo, hi, bias, buf):
    buf[:] = np.nan  # rows of buf past hi - lo must stay untouched
    rows_blocked(x, w, lo, hi, bias, buf)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 11), k=st.integers(1, 37), n_out=st.integers(1, 23), data=st.data(), bias=st.booleans())
def test_rows_blocked_matches_numpy(rows, k, n_out, data, bias):
    lo = data.draw(st.integers(0, n_out - 1))
    hi = data.draw(st.integers(lo, n_out))
    rng = np.random.default_rng(rows * 1009 + k * 31 + n_out)
    x, w = rng.standard_normal((rows, k)), rng.standard_normal((n_out, k))
    b = rng.standard_normal(n_out) if bias else np.zeros(0)
    buf = np.empty((hi - lo + 3, rows))
    _products(x, w, lo, hi, b, buf)
    want = (x @ w[lo:hi].T).T + (b[lo:hi, None] if bias else 0)
    np.testing.assert_allclose(buf[:hi - lo], want, rtol=1e-12, atol=1e-12)
    assert np.isnan(buf[hi - lo:]).all()
