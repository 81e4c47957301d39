"""HiPPO matrices (LegS, LegT, FouT) and their normal-plus-low-rank (NPLR) form A = V Λ V* − P P*.

Everything is computed in float64 and returned as float64 / complex128 tensors; callers cast.

Conventions (state size N):
- LegS (scaled Legendre, "How to Train Your HiPPO"):
  A_nk = −√(2n+1)√(2k+1) for n > k, −(n+1) for n = k, 0 for n < k;  B_n = √(2n+1).
- LegT (translated Legendre, sliding window of length θ): with g_n(x) = √(2n+1) P_n(2x − 1) on the window
  x ∈ [0, 1] (x = 1 is the present),
  A_nk = −(1/θ)√(2n+1)√(2k+1) · (1 if k <= n else (−1)^(n−k));  B_n = (1/θ)√(2n+1).
  The state c(t) then holds the coefficients of u on [t − θ, t]: u(t − θy) ≈ Σ_n c_n √(2n+1) P_n(1 − 2y).
- FouT (translated Fourier, window θ; "How to Train Your HiPPO"): basis g(τ) = (1, √2 cos(2πkτ/θ),
  √2 sin(2πkτ/θ)) of the lag τ ∈ [0, θ], laid out in pairs (cos_k, sin_k) at indices (2k, 2k+1),
  k = 0..N/2−1, N even; index 0 is the constant and index 1 (sin_0 ≡ 0) is a dead coordinate that keeps the
  pairing (an unpaired cosine would feed a non-rotating mode into the edge term). With
  e = g(0) = (1, 0, √2, 0, √2, 0, ...):
  A = S − (2/θ) e eᵀ, B = (2/θ) e, where S is the rotation generator S[cos_k, sin_k] = −2πk/θ,
  S[sin_k, cos_k] = 2πk/θ. The −(2/θ)eeᵀ term stands for −u(t − θ): the Fourier reconstruction at the window's
  edge is the average (u(t) + u(t − θ))/2 = eᵀc. The impulse response e^{τA}B then approximates g(τ) on
  [0, θ) and 0 beyond, and u(t − τ) ≈ Σ_n c_n g_n(τ)/θ.

NPLR: A + P Pᵀ = S is normal with constant diagonal (−1/2 for LegS, 0 for LegT and FouT), so
S = V diag(Λ) V* with V unitary. Its eigenvalues come in conjugate pairs; we keep one of each pair: the
returned V has N/2 columns and the full basis is [V, conj(V)] with eigenvalues [Λ, conj(Λ)].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

MEASURES = ("legs", "legt", "fout")


def _check_n(name: str, value: object, *, even: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (2 if even else 1):
        raise ValueError(f"{name} must be a positive{' even' if even else ''} int, got {value!r}")
    if even and value % 2:
        raise ValueError(f"{name} must be even (conjugate pairs are kept in halves), got {value}")
    return value


def _check_measure(measure: object) -> str:
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; expected one of {', '.join(map(repr, MEASURES))}")
    return measure  # type: ignore[return-value]


def hippo_legs(N: int) -> tuple[Tensor, Tensor]:
    """HiPPO-LegS: A (N, N), B (N,), float64."""
    _check_n("N", N)
    n = torch.arange(N, dtype=torch.float64)
    r = torch.sqrt(2 * n + 1)
    A = -torch.tril(r[:, None] * r[None, :], diagonal=-1) - torch.diag(n + 1)
    return A, r.clone()


def hippo_legt(N: int, theta: float = 1.0) -> tuple[Tensor, Tensor]:
    """HiPPO-LegT with window length ``theta``: A (N, N), B (N,), float64."""
    _check_n("N", N)
    n = torch.arange(N, dtype=torch.float64)
    r = torch.sqrt(2 * n + 1)
    diff = n[:, None] - n[None, :]
    sign = torch.where(diff >= 0, torch.ones_like(diff), torch.where(diff.remainder(2) == 0, 1.0, -1.0))
    A = -(r[:, None] * r[None, :]) * sign / theta
    return A, r / theta


def _fout_edge(N: int) -> Tensor:
    """e = g(0): 1 for the constant, √2 for each cosine, 0 for each sine."""
    e = torch.zeros(N, dtype=torch.float64)
    e[0::2] = math.sqrt(2.0)
    e[0] = 1.0
    return e


def hippo_fout(N: int, theta: float = 1.0) -> tuple[Tensor, Tensor]:
    """HiPPO-FouT with window length ``theta``: A (N, N), B (N,), float64; N even."""
    _check_n("N", N, even=True)
    S = torch.zeros(N, N, dtype=torch.float64)
    cos_idx = torch.arange(0, N, 2)  # cos_k at 2k, sin_k at 2k+1
    k = (cos_idx // 2).to(torch.float64)
    S[cos_idx, cos_idx + 1] = -2 * math.pi * k / theta
    S[cos_idx + 1, cos_idx] = 2 * math.pi * k / theta
    e = _fout_edge(N)
    return S - (2 / theta) * e[:, None] * e[None, :], (2 / theta) * e


def hippo(measure: str, N: int) -> tuple[Tensor, Tensor]:
    """The HiPPO matrices (A (N, N), B (N,)) of ``measure`` in {'legs', 'legt', 'fout'}, float64."""
    return {"legs": hippo_legs, "legt": hippo_legt, "fout": hippo_fout}[_check_measure(measure)](N)


def low_rank(measure: str, N: int) -> Tensor:
    """The real P (rank, N) such that A + P Pᵀ is normal (rank 1 for LegS and FouT, 2 for LegT)."""
    _check_measure(measure)
    _check_n("N", N)
    n = torch.arange(N, dtype=torch.float64)
    if measure == "legs":
        return torch.sqrt(n + 0.5)[None]
    if measure == "legt":
        r = torch.sqrt(2 * n + 1)
        odd, even = r.clone(), r.clone()
        odd[0::2] = 0.0
        even[1::2] = 0.0
        return torch.stack([odd, even])  # sum over both rows: r_n r_k when n, k have equal parity
    return math.sqrt(2.0) * _fout_edge(N)[None]


@dataclass
class NPLR:
    """A = V diag(Λ) V* − P Pᵀ with the conjugate halves dropped.

    Lambda: (N/2,) complex eigenvalues of the normal part (one of each conjugate pair).
    P: (rank, N/2) complex, V* P_orig;  B: (N/2,) complex, V* B_orig;
    V: (N, N/2) complex, orthonormal columns.
    P_real: (rank, N) the low-rank factor in the original basis. The full basis is [V, conj(V)].
    """

    Lambda: Tensor
    P: Tensor
    B: Tensor
    V: Tensor
    P_real: Tensor


def _skew_half_eig(Sk: Tensor) -> tuple[Tensor, Tensor]:
    """Real skew-symmetric Sk (N, N), N even -> (w (N/2,) real >= 0, V (N, N/2)) with Sk V = i V diag(w).

    The columns of [V, conj(V)] are an orthonormal eigenbasis of Sk. Zero eigenvalues come from a real basis
    of the null space, paired as (u1 + i u2)/√2 so that each kept vector's conjugate is also an eigenvector.
    """
    N = Sk.shape[0]
    mu, U = torch.linalg.eigh(-1j * Sk.to(torch.complex128))  # Hermitian; eigenvalues in ± pairs
    tol = 1e-9 * max(1.0, float(torch.linalg.matrix_norm(Sk, 2)))
    pos = mu > tol
    zero = mu.abs() <= tol
    cols, vals = [U[:, pos]], [mu[pos]]
    nz = int(zero.sum())
    if nz:
        if nz % 2:
            raise ValueError(f"the skew part has an odd-dimensional null space ({nz}); use an even N")
        Z = U[:, zero]
        basis, s, _ = torch.linalg.svd(torch.cat([Z.real, Z.imag], 1), full_matrices=False)
        R = basis[:, :nz]  # real orthonormal basis of the null space
        cols.append((R[:, 0::2] + 1j * R[:, 1::2]) / math.sqrt(2.0))
        vals.append(torch.zeros(nz // 2, dtype=mu.dtype))
    w, V = torch.cat(vals), torch.cat(cols, 1)
    if V.shape[1] != N // 2:
        raise ValueError(f"could not split the spectrum of the skew part into {N // 2} conjugate pairs")
    order = torch.argsort(w)
    return w[order], V[:, order]


def nplr(measure: str, N: int) -> NPLR:
    """NPLR form of the HiPPO matrix ``measure`` ('legs', 'legt', 'fout') of even size N."""
    _check_n("N", N, even=True)
    A, B = hippo(measure, N)
    P = low_rank(measure, N)
    S = A + P.T @ P
    d = torch.diagonal(S)
    if not torch.allclose(d, d.mean().expand_as(d), atol=1e-10):
        raise AssertionError(f"{measure}: A + P Pᵀ does not have a constant diagonal")
    Sk = S - torch.diag(d)
    if not torch.allclose(Sk, -Sk.T, atol=1e-9):
        raise AssertionError(f"{measure}: A + P Pᵀ minus its diagonal is not skew-symmetric")
    Sk = 0.5 * (Sk - Sk.T)
    w, V = _skew_half_eig(Sk)
    Lambda = torch.complex(d.mean().expand_as(w).clone(), w)
    Vh = V.conj().T
    Pc = P.to(torch.complex128) @ Vh.T  # (rank, N/2): V* applied to each row
    return NPLR(Lambda=Lambda, P=Pc, B=Vh @ B.to(torch.complex128), V=V, P_real=P)


def nplr_dense(Lambda: Tensor, P: Tensor, V: Tensor) -> Tensor:
    """Rebuild the N×N matrix [V, V̄] diag([Λ, Λ̄]) [V, V̄]* − P_full P_full* in the original basis.

    Lambda: (N/2,), P: (rank, N/2) in the eigenbasis, V: (N, N/2). Returns complex (N, N).
    """
    Vf = torch.cat([V, V.conj()], 1)
    Lf = torch.cat([Lambda, Lambda.conj()])
    Pf = torch.cat([P, P.conj()], 1) @ Vf.T  # back to the original basis, (rank, N)
    return Vf @ torch.diag(Lf) @ Vf.conj().T - Pf.T @ Pf.conj()
