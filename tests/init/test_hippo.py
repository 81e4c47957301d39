"""HiPPO matrices against their formulas and their defining property (online function reconstruction), and
the NPLR decomposition A = V Λ V* − P Pᵀ."""

from __future__ import annotations

import math

import pytest
import torch

from ssmkit.init import MEASURES, hippo, hippo_fout, hippo_legs, hippo_legt, low_rank, nplr, nplr_dense


def legendre(n: int, x: torch.Tensor) -> torch.Tensor:
    """P_0..P_{n-1} at x by the three-term recurrence: (n, len(x))."""
    P = [torch.ones_like(x), x]
    for k in range(1, n):
        P.append(((2 * k + 1) * x * P[k] - k * P[k - 1]) / (k + 1))
    return torch.stack(P[:n])


def signal(t: torch.Tensor) -> torch.Tensor:
    return torch.sin(3 * t) + 0.5 * torch.cos(7 * t + 1) + 0.3 * t


def run_lti(A: torch.Tensor, B: torch.Tensor, T: float = 3.0, dt: float = 1e-3) -> torch.Tensor:
    """Bilinear-discretised c' = A c + B u(t) from 0 to T with midpoint samples of ``signal``."""
    I = torch.eye(A.shape[0], dtype=torch.float64)
    M = torch.linalg.solve(I - dt / 2 * A, I + dt / 2 * A)
    Bb = torch.linalg.solve(I - dt / 2 * A, dt * B)
    u = signal((torch.arange(round(T / dt), dtype=torch.float64) + 0.5) * dt)
    c = torch.zeros(A.shape[0], dtype=torch.float64)
    for u_k in u:
        c = M @ c + Bb * u_k
    return c


def test_legs_formula():
    N = 7
    A, B = hippo_legs(N)
    for n in range(N):
        assert B[n] == pytest.approx(math.sqrt(2 * n + 1))
        for k in range(N):
            want = -math.sqrt(2 * n + 1) * math.sqrt(2 * k + 1) if n > k else (-(n + 1) if n == k else 0.0)
            assert A[n, k] == pytest.approx(want)


def test_legt_formula():
    N, theta = 6, 2.0
    A, B = hippo_legt(N, theta)
    for n in range(N):
        assert B[n] == pytest.approx(math.sqrt(2 * n + 1) / theta)
        for k in range(N):
            sign = 1.0 if k <= n else (-1.0) ** (n - k)
            assert A[n, k] == pytest.approx(-math.sqrt(2 * n + 1) * math.sqrt(2 * k + 1) * sign / theta)


def test_fout_formula():
    """Pairs (cos_k, sin_k) at (2k, 2k+1): A = S − 2eeᵀ, B = 2e with e = (1, 0, √2, 0, √2, 0, ...)."""
    N = 8
    A, B = hippo_fout(N)
    e = [1.0 if i == 0 else (math.sqrt(2) if i % 2 == 0 else 0.0) for i in range(N)]
    for n in range(N):
        assert B[n] == pytest.approx(2 * e[n])
        for k in range(N):
            rot = 0.0
            if n % 2 == 0 and k == n + 1:
                rot = -2 * math.pi * (n // 2)
            if k % 2 == 0 and n == k + 1:
                rot = 2 * math.pi * (k // 2)
            assert A[n, k] == pytest.approx(rot - 2 * e[n] * e[k])


def test_legt_reconstructs_sliding_window():
    """LegT keeps the Legendre coefficients of the last window: u(t − θy) ≈ Σ c_n √(2n+1) P_n(1 − 2y)."""
    N, T = 24, 3.0
    c = run_lti(*hippo_legt(N), T=T)
    y = torch.linspace(0.02, 0.98, 60, dtype=torch.float64)
    g = legendre(N, 1 - 2 * y) * torch.sqrt(2 * torch.arange(N, dtype=torch.float64) + 1)[:, None]
    err = (c @ g - signal(T - y)).abs().max().item()
    assert err < 1e-4, err


def test_fout_reconstructs_sliding_window():
    """FouT: u(t − τ) ≈ Σ c_n g_n(τ) with the Fourier basis g on the unit window (error shrinks like 1/N)."""
    T = 3.0
    tau = torch.linspace(0.1, 0.9, 50, dtype=torch.float64)
    errs = []
    for N in (16, 64):
        c = run_lti(*hippo_fout(N), T=T)
        rows = []
        for i in range(N):
            k = i // 2
            scale = math.sqrt(2) if k else 1.0
            wave = torch.cos if i % 2 == 0 else torch.sin
            rows.append(scale * wave(2 * math.pi * k * tau))
        errs.append((c @ torch.stack(rows) - signal(T - tau)).abs().max().item())
    assert errs[1] < 0.05 and errs[1] < errs[0] / 2, errs


def test_legs_reconstructs_history():
    """LegS (time-varying c' = (A c + B u)/t) holds the Legendre coefficients of all history on [0, t]."""
    N, T, h = 24, 3.0, 1e-3
    A, B = hippo_legs(N)
    I = torch.eye(N, dtype=torch.float64)
    c = torch.zeros(N, dtype=torch.float64)
    c[0] = signal(torch.tensor(0.0, dtype=torch.float64))
    t = h
    while t < T - 1e-9:
        tm = t + h / 2
        rhs = (I + h / 2 * A / tm) @ c + h * B / tm * signal(torch.tensor(tm, dtype=torch.float64))
        c = torch.linalg.solve(I - h / 2 * A / tm, rhs)
        t += h
    s = torch.linspace(0.02, 0.98, 60, dtype=torch.float64)
    g = legendre(N, 2 * s - 1) * torch.sqrt(2 * torch.arange(N, dtype=torch.float64) + 1)[:, None]
    err = (c @ g - signal(T * s)).abs().max().item()
    assert err < 1e-3, err


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("N", [2, 4, 8, 16, 64])
def test_nplr_reconstructs(measure, N):
    A, B = hippo(measure, N)
    f = nplr(measure, N)
    r = {"legs": 1, "legt": 2, "fout": 1}[measure]
    assert f.Lambda.shape == (N // 2,) and f.P.shape == (r, N // 2) and f.V.shape == (N, N // 2)
    scale = A.abs().max().item()
    assert (nplr_dense(f.Lambda, f.P, f.V) - A).abs().max().item() < 1e-12 * scale * N
    Vf = torch.cat([f.V, f.V.conj()], 1)
    assert torch.allclose(Vf.conj().T @ Vf, torch.eye(N, dtype=torch.complex128), atol=1e-12)
    assert torch.allclose(Vf @ torch.cat([f.B, f.B.conj()]), B.to(torch.complex128), atol=1e-11)
    assert torch.allclose(f.P_real, low_rank(measure, N))
    # A + P Pᵀ is normal: skew-symmetric plus a constant diagonal (−1/2 for LegS, 0 otherwise)
    S = A + f.P_real.T @ f.P_real
    d = -0.5 if measure == "legs" else 0.0
    assert torch.allclose(S - d * torch.eye(N, dtype=torch.float64), -(S - d * torch.eye(N)).T, atol=1e-12)
    assert torch.allclose(f.Lambda.real, torch.full((N // 2,), d, dtype=torch.float64))
    # each eigenpair holds: (A + P Pᵀ) v = λ v
    assert torch.allclose(S.to(torch.complex128) @ f.V, f.V * f.Lambda, atol=1e-10 * max(1, scale))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown measure 'legx'"):
        hippo("legx", 4)
    with pytest.raises(ValueError, match="N must be even"):
        nplr("legs", 5)
    with pytest.raises(ValueError, match="N must be a positive"):
        hippo_legs(0)
    with pytest.raises(ValueError, match="N must be even"):
        hippo_fout(3)
