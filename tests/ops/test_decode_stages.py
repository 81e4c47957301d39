"""Decode-kernel stages: Mamba-2's SSD update (large and small states, aligned or not),
the Mamba plan's exp(A_log) following in-place updates, and the per-stage clock."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

from ssmkit.ops import _numba_decode as D
from ssmkit.ops import _numba_decode_mamba2 as D2
from ssmkit.ops import reference
from ssmkit.ops.mamba_step import cached_plan, mamba_step

from .test_mamba_step import make_weights, states


def _ssd_case(seed: int, rows: int = 2, heads: int = 4, headdim: int = 3, groups: int = 2, n: int = 16):
    g = np.random.default_rng(seed)
    di = heads * headdim
    xbc = g.standard_normal((rows, di + 2 * groups * n))
    dts = np.concatenate([g.random((rows, heads)), g.random((rows, heads))], 1)  # dt, then exp(-dt A)
    return xbc, dts, g.standard_normal(heads), g.standard_normal((rows, di, n)), g.standard_normal((rows, di))


def _ssd_oracle(xbc, dts, dsk, ss, zb, groups):
    rows, di, n = ss.shape
    heads = dsk.shape[0]
    head = np.arange(di) // (di // heads)
    grp = head // (heads // groups)
    bmat = xbc[:, di:di + groups * n].reshape(rows, groups, n)[:, grp]  # (rows, di, n)
    cmat = xbc[:, di + groups * n:].reshape(rows, groups, n)[:, grp]
    x = xbc[:, :di]
    sn = ss * dts[:, heads + head, None] + (dts[:, head] * x)[..., None] * bmat
    y = ((sn * cmat).sum(-1) + dsk[head] * x) * zb / (1 + np.exp(-zb))
    return sn, y


def _run_ssd(xbc, dts, dsk, ss, sn, zb, groups):
    y = np.zeros_like(zb)
    counters = np.zeros(D.counter_slots(1, 1), np.int64)
    D2.ssd_stage(counters, 0, 0, 1, np.zeros(1, np.int64), xbc, dts, dsk, ss, sn, zb, y, groups)
    return y


def test_ssd_update_large_and_small_states():
    """Large and small states, d_state a multiple of the vector or odd, the new state aligned to a cache line or
    one float64 off it: all equal the float64 oracle."""
    for seed, n, heads, big in ((0, 128, 8, True), (1, 16, 4, False), (2, 5, 4, False), (3, 8, 130, True)):
        xbc, dts, dsk, ss, zb = _ssd_case(seed, rows=1, heads=heads, headdim=64, n=n)
        want_sn, want_y = _ssd_oracle(xbc, dts, dsk, ss, zb, 2)
        aligned = torch.empty(ss.shape, dtype=torch.float64).numpy()  # torch allocates 64-byte aligned
        shifted = np.empty(ss.size + 1)[1:].reshape(ss.shape)  # 8 bytes off any 64-byte line
        shifted = shifted if shifted.ctypes.data % 64 else np.empty(ss.size + 2)[2:].reshape(ss.shape)
        assert (ss.nbytes >= 2**19) == big  # the case is as large as its label says
        for sn in (aligned, shifted):
            y = _run_ssd(xbc, dts, dsk, ss, sn, zb, 2)
            np.testing.assert_allclose(sn, want_sn, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(y, want_y, rtol=1e-12, atol=1e-12)


def test_in_place_update_of_a_log_reaches_the_kernel():
    """The Mamba plan holds exp(A_log), a copy: an in-place update of A_log must rebuild it."""
    w = make_weights(8, 16, 4, 2, 4, bias=True, conv_bias=True)
    owner = torch.nn.Module()
    x = torch.randn(2, 8)
    conv, ssm = states(2, 16, 4, 4, torch.float32)
    p1 = cached_plan(owner, w)
    mamba_step(x, w, conv, ssm, owner=owner)
    with torch.no_grad():
        w.a_log.add_(0.7)
    assert cached_plan(owner, w) is not p1
    got = mamba_step(x, w, conv, ssm, owner=owner)
    want = reference.mamba_step(x.double(), w, conv.double(), ssm.double())
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_exp_of_matches_numpy():
    a = np.random.default_rng(3).standard_normal((5, 7))
    np.testing.assert_allclose(D.exp_of(a), np.exp(a), rtol=1e-15)
    np.testing.assert_allclose(D.exp_of(a.astype(np.float32)), np.exp(a).astype(np.float32), rtol=1e-6)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="x86's time-stamp counter; other counters (e.g. ARM's CNTVCT) may tick below 1e8 Hz")
def test_cycle_counter_ticks():
    from ssmkit.ops._numba_atomics import counter_hz

    assert 1e8 < counter_hz() < 1e11
