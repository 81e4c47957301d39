"""S4D diagonal initialisations, perturb-then-diagonalise, and the Δ initialisation."""

from __future__ import annotations

import math

import pytest
import torch

from ssmkit.init import hippo, inverse_softplus, log_uniform_dt, nplr, ptd, s4d_init


def test_s4d_inits_match_formulas():
    N = 10
    for n in range(N // 2):
        A, B = s4d_init("lin", N)
        assert A[n] == pytest.approx(complex(-0.5, math.pi * n))
        A, _ = s4d_init("inv", N)
        assert A[n] == pytest.approx(complex(-0.5, (N / math.pi) * (N / (2 * n + 1) - 1)))
        A, _ = s4d_init("real", N)
        assert A[n] == pytest.approx(complex(-(n + 1), 0.0))
        assert B[n] == 1
    A, B = s4d_init("legs", N)
    f = nplr("legs", N)
    assert torch.equal(A, f.Lambda) and torch.equal(B, f.B)
    assert torch.allclose(A.real, torch.full((N // 2,), -0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown S4D init 'foo'"):
        s4d_init("foo", N)
    with pytest.raises(ValueError, match="even"):
        s4d_init("lin", 7)


def test_s4d_legs_is_diagonal_of_nplr():
    """The S4D-LegS eigenvalues are the spectrum of the normal part A + P Pᵀ of HiPPO-LegS."""
    N = 12
    A, _ = hippo("legs", N)
    P = nplr("legs", N).P_real
    ev = torch.linalg.eigvals(A + P.T @ P)
    lam, _ = s4d_init("legs", N)
    full = torch.cat([lam, lam.conj()])
    full, ev = full[torch.argsort(full.imag)], ev[torch.argsort(ev.imag)]
    assert torch.allclose(full, ev, atol=1e-10)


@pytest.mark.parametrize("N", [8, 16])
def test_ptd(N):
    eps = 1e-4
    r = ptd("legs", N, eps=eps, seed=3)
    A, B = hippo("legs", N)
    assert r.Lambda.shape == (N // 2,) and r.B.shape == (N // 2,) and r.V.shape == (N, N // 2)
    norm = torch.linalg.matrix_norm
    assert norm(r.E, 2).item() == pytest.approx(eps * norm(A, 2).item())
    # kept pairs are eigenpairs of the perturbed matrix, in the upper half plane (or real)
    M = (A + r.E).to(torch.complex128)
    assert torch.allclose(M @ r.V, r.V * r.Lambda, atol=1e-8 * A.abs().max().item())
    assert bool((r.Lambda.imag >= 0).all())
    # B is the matching slice of V⁻¹B: with all pairs complex, [V, V̄] [B, B̄] rebuilds B
    if r.n_real == 0:
        Vf = torch.cat([r.V, r.V.conj()], 1)
        assert torch.allclose(Vf @ torch.cat([r.B, r.B.conj()]), B.to(torch.complex128), atol=1e-6)
    # the perturbation is what moves LegS (real spectrum −1..−N) into conjugate pairs
    assert int((r.Lambda.imag > 1e-6).sum()) >= N // 2 - 2
    # deterministic given the seed; different for another seed
    assert torch.equal(ptd("legs", N, eps=eps, seed=3).Lambda, r.Lambda)
    assert not torch.equal(ptd("legs", N, eps=eps, seed=4).Lambda, r.Lambda)


def test_ptd_bad_args():
    with pytest.raises(ValueError, match="eps"):
        ptd("legs", 8, eps=0.0)
    with pytest.raises(ValueError, match="unknown measure"):
        ptd("chebyshev", 8)


def test_log_uniform_dt():
    dts = log_uniform_dt(20000, 1e-3, 1e-1, generator=torch.Generator().manual_seed(0))
    logs = torch.log10(dts)
    assert logs.min() >= -3 and logs.max() <= -1
    assert abs(logs.mean().item() + 2) < 0.02 and abs(logs.std().item() - 2 / math.sqrt(12)) < 0.02
    with pytest.raises(ValueError, match="dt_min"):
        log_uniform_dt(3, 0.1, 0.01)
    with pytest.raises(ValueError, match="dt_min"):
        log_uniform_dt(3, 0.0, 0.01)


def test_inverse_softplus():
    y = torch.tensor([1e-4, 1e-3, 0.1, 1.0, 30.0], dtype=torch.float64)
    assert torch.allclose(torch.nn.functional.softplus(inverse_softplus(y)), y, rtol=1e-12)
