"""Diagonal state matrices: the S4D initialisations and perturb-then-diagonalise (S4-PTD).

All functions return one eigenvalue of each conjugate pair: complex128 tensors of N/2 entries for a state
size N; the layer that uses them takes 2·Re of its output so the other halves are implied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .hippo import _check_measure, _check_n, hippo, nplr

S4D_INITS = ("legs", "lin", "inv", "real")


def s4d_init(kind: str, N: int) -> tuple[Tensor, Tensor]:
    """S4D initialisation for state size N (even): (A (N/2,), B (N/2,)), complex128, n = 0..N/2−1.

    - lin:  A_n = −1/2 + iπn
    - inv:  A_n = −1/2 + i(N/π)(N/(2n+1) − 1)
    - real: A_n = −(n+1)
    - legs: the diagonal part Λ of HiPPO-LegS in NPLR form, with B = V* B_LegS.
    B is all ones except for legs.
    """
    if kind not in S4D_INITS:
        raise ValueError(f"unknown S4D init {kind!r}; expected one of {', '.join(map(repr, S4D_INITS))}")
    _check_n("N", N, even=True)
    if kind == "legs":
        f = nplr("legs", N)
        return f.Lambda.clone(), f.B.clone()
    n = torch.arange(N // 2, dtype=torch.float64)
    half = torch.full_like(n, -0.5)
    if kind == "lin":
        A = torch.complex(half, math.pi * n)
    elif kind == "inv":
        A = torch.complex(half, (N / math.pi) * (N / (2 * n + 1) - 1))
    else:
        A = torch.complex(-(n + 1), torch.zeros_like(n))
    return A, torch.ones(N // 2, dtype=torch.complex128)


@dataclass
class PTD:
    """Result of perturb-then-diagonalise: A + E = V diag(Λ_full) V⁻¹.

    Lambda: (N/2,) kept eigenvalues; B: (N/2,) the matching entries of V⁻¹ B; V: (N, N/2) the matching
    eigenvectors; E: (N, N) the perturbation used; n_real: how many eigenvalues of A + E were real.
    """

    Lambda: Tensor
    B: Tensor
    V: Tensor
    E: Tensor
    n_real: int


def ptd(measure: str, N: int, *, eps: float = 1e-4, seed: int = 0) -> PTD:
    """Perturb-then-diagonalise the HiPPO matrix ``measure`` (N even).

    E is a real Gaussian matrix scaled to ‖E‖₂ = eps·‖A‖₂. A + E is real, so its eigenvalues come in conjugate
    pairs plus real ones. We keep every eigenvalue with Im > 0 and, of the real ones (sorted), every other
    one, so that N/2 remain; each kept real eigenvalue then stands in for itself and its dropped neighbour
    (the layer's 2·Re doubles it). The eigenvalues are returned in ascending order of their imaginary part.
    A random E of relative size 1e-4 leaves V badly conditioned (cond(V) ~ 1e4 at N = 16), so the entries
    of V⁻¹B are large; a layer using this should rescale B (only the products C_n B_n matter).
    """
    _check_measure(measure)
    _check_n("N", N, even=True)
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    A, B = hippo(measure, N)
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(N, N, generator=g, dtype=torch.float64)
    E = E * (eps * torch.linalg.matrix_norm(A, 2) / torch.linalg.matrix_norm(E, 2))
    w, V = torch.linalg.eig(A + E)
    tol = 1e-10 * float(w.abs().max())
    upper = torch.nonzero(w.imag > tol).flatten()
    real = torch.nonzero(w.imag.abs() <= tol).flatten()
    real = real[torch.argsort(w.real[real])][0::2]
    keep = torch.cat([upper, real])
    if keep.numel() != N // 2:
        raise AssertionError(f"PTD kept {keep.numel()} eigenvalues, expected {N // 2}")
    keep = keep[torch.argsort(w.imag[keep], stable=True)]
    Bt = torch.linalg.solve(V, B.to(torch.complex128))
    Lam = w[keep].clone()
    Lam.imag[Lam.imag.abs() <= tol] = 0.0
    return PTD(Lambda=Lam, B=Bt[keep], V=V[:, keep], E=E, n_real=int((w.imag.abs() <= tol).sum()))
