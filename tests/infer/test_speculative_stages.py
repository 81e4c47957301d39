"""The fused verify pass's building blocks on their own: the node-row products (4 x 4 and 6 x 4 register blocks,
partial last blocks) against numpy, and the float32 scan (vectorised exp and softplus) against the float64 one
(libm), which the whole-pass tests check against stepping; the float64 scan against a numpy recurrence (dt ranks
that take the 4-row unrolled dt projection and its tail)."""

from __future__ import annotations

import numpy as np
import pytest

from ssmkit.infer import _numba_spec_stages as S


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 9, 10, 13])
def test_node_row_products_equal_numpy(rows):
    rng = np.random.default_rng(rows)
    x, w, bias = rng.standard_normal((rows, 37)), rng.standard_normal((11, 37)), rng.standard_normal(11)
    out = np.full((rows, 11), np.nan)
    S._gemm(x, w, np.empty(0), bias, 2, 11, out, np.empty(rows))  # weight rows [2, 11): two 4-blocks and a tail
    np.testing.assert_allclose(out[:, 2:], x @ w[2:].T + bias[2:], rtol=1e-12, atol=1e-12)
    assert np.isnan(out[:, :2]).all()  # rows outside [o_lo, o_hi) untouched


def _scan_inputs(dtype, rng, rank: int = 3):
    batch, n_nodes, di, n_state = 2, 4, 37, 5
    parents = np.array([-1, 0, 0, 1], dtype=np.int64)  # a small tree
    act_b = np.repeat(np.arange(batch), n_nodes)
    act_i = np.tile(np.arange(n_nodes), batch)
    rows = batch * n_nodes
    f = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    n_work, n_bits = S.scan_scratch(n_state, 21)
    args = dict(wdt_t=f(rank, di), bdt=f(di), neg_a_t=-np.exp(f(n_state, di)), dsk=f(di), ss=f(batch, n_state, di),
                sn=np.zeros((batch, n_nodes, n_state, di), dtype), parents=parents, act_b=act_b, act_i=act_i,
                xdbl=f(rows, rank + 2 * n_state), xz=4 * f(rows, 2 * di), u=f(rows, di), y=np.zeros((rows, di), dtype),
                work=np.full(n_work, np.nan, dtype), bits=np.zeros(n_bits, np.int32))
    args["bdt"][:3] = [30.0, -30.0, 0.0]  # softplus far out on both sides
    return args


def test_float32_scan_equals_float64():
    rng = np.random.default_rng(0)
    a64 = _scan_inputs(np.float64, rng)
    a32 = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in a64.items()}
    for lo, hi in ((0, 16), (16, 37)):  # two channel chunks (scratch for up to 21), as the threads split them
        S._scan(lo, hi, *a64.values())
        S._scan(lo, hi, *a32.values())
    assert np.abs(a64["y"]).max() > 0.1
    np.testing.assert_allclose(a32["y"], a64["y"], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(a32["sn"], a64["sn"], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("rank", [3, 4, 9])
def test_scan_equals_numpy_recurrence(rank):
    """Each node's state from its parent's: dt = softplus(x_dt . W_dt + b), h = exp(dt A) h_parent + dt u B,
    y = (h . C + D u) silu(z); channels in two chunks."""
    a = _scan_inputs(np.float64, np.random.default_rng(rank), rank)
    for lo, hi in ((0, 16), (16, 37)):
        S._scan(lo, hi, *a.values())
    di, n_state = a["u"].shape[1], a["neg_a_t"].shape[0]
    for r, (b, i) in enumerate(zip(a["act_b"], a["act_i"], strict=True)):
        p = a["parents"][i]
        prev = a["ss"][b] if p < 0 else a["sn"][b, p]
        x = a["xdbl"][r]
        dt = np.logaddexp(0.0, x[:rank] @ a["wdt_t"] + a["bdt"])
        bm, cm = x[rank:rank + n_state], x[rank + n_state:]
        h = np.exp(dt * a["neg_a_t"]) * prev + (dt * a["u"][r]) * bm[:, None]
        z = a["xz"][r, di:]
        y = (cm @ h + a["dsk"] * a["u"][r]) * z / (1 + np.exp(-z))
        np.testing.assert_allclose(a["sn"][b, i], h, rtol=1e-10, atol=1e-12, err_msg=f"state of row {b} node {i}")
        np.testing.assert_allclose(a["y"][r], y, rtol=1e-10, atol=1e-12, err_msg=f"y of row {b} node {i}")
