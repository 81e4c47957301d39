"""S4: the diagonal-plus-low-rank (DPLR) structured state space layer (Gu et al., "Efficiently Modeling Long
Sequences with Structured State Spaces").

Per channel h, the state matrix is A = Λ − P P* in the eigenbasis of the HiPPO matrix's normal part
(:func:`ssmkit.init.nplr`): Λ diagonal (N/2 stored eigenvalues plus their implied conjugates), P of rank r
(1 for LegS/FouT, 2 for LegT), all learnable, as are Δ, B, C and D. Discretisation is bilinear:

    Ā = (I − Δ/2·A)⁻¹(I + Δ/2·A),  B̄ = Δ(I − Δ/2·A)⁻¹B,  s_t = Ā s_{t−1} + B̄ x_t,  y_t = C s_t + D x_t.

Convolution ("conv"): the length-L kernel K_l = C Ā^l B̄ comes from its truncated generating function at the
L-th roots of unity z_k, K̂(z) = C̃(I − Āz)⁻¹B̄ with C̃ = C(I − Ā^L) (Ā^L by repeated squaring of the dense
N×N discrete matrix, once per forward for the given L). With the bilinear Ā this is
K̂(z) = Δ·C̃((1 − z)I − Δ/2(1 + z)A)⁻¹B, evaluated with Cauchy sums over the spectrum of Λ plus the
Woodbury identity for the rank-r term, then K = irfft(K̂). This form has no pole at z = −1. The Cauchy/Woodbury
step runs in float64 whatever the layer dtype: near a pole of a single Cauchy term the Woodbury correction
cancels two large numbers, which float32 cannot afford.

Recurrence ("scan" and ``step``): the conjugate-symmetric N-dimensional complex system is the same as a real
N-dimensional one on (Re s, Im s), where s are the N/2 stored complex state entries; Ā there is a dense real
N×N matrix (computed in float64, then cast), so the scan is a per-step dense recurrence (fine for S4's small
N). "auto" uses conv for stateless calls without ``reset``, scan otherwise; "conv" with a state in or out or a
``reset`` also runs the scan (the result is the same).

init="ptd" (perturb-then-diagonalise HiPPO-LegS, :func:`ssmkit.init.ptd`) makes the layer diagonal: there is
no P, and the S4D machinery (:mod:`ssmkit.layers.s4d`) computes the kernel, scan and step with the bilinear
discretisation. B = V⁻¹B_LegS is rescaled to unit RMS (V is ill-conditioned, so its raw entries are huge) and
any eigenvalue that the perturbation pushed to Re ≥ 0 is reflected to the left half plane.

Output map and ``reverse`` as in :class:`ssmkit.layers.S4D`. State: :class:`S4State`, s: (batch, d_model,
d_state/2) complex.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..init import check_dt_range, log_uniform_dt, nplr, ptd
from ..ops import fft_conv
from ..ops.linear_scan import compute_dtype
from .base import (
    LayerState,
    check_choice,
    check_d_model,
    check_flag,
    flip_reset,
)
from .s4d import (
    MODES,
    OUTPUTS,
    ChannelSSM,
    check_state_size,
    complex_dtype,
    diagonal_kernel,
    diagonal_step,
    discretize,
    make_output,
    run_diagonal,
)

INITS = ("legs", "legt", "fout", "ptd")
RE_FLOOR = 1e-4  # LegT/FouT have Re Λ = 0; start them just inside the stable half plane
FREQ_BLOCK_ELEMS = 1 << 21  # complex elements of the Cauchy matrix (d_model × d_state/2 × freqs) per block


@dataclass
class S4State(LayerState):
    """s: (batch, d_model, d_state/2) complex; the full state is (s, conj(s)) in the NPLR eigenbasis."""

    s: Tensor


# ----------------------------------------------------------------------------------- DPLR machinery
def dplr_real_form(dt: Tensor, Lam: Tensor, P: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """Bilinear discretisation of A = Λ − P P* in the real coordinates (Re s, Im s).

    dt: (H,); Lam, B: (H, N2) complex; P: (r, H, N2) complex -> (Ā (H, N, N), B̄ (H, N)) real, N = 2·N2.
    With T = [[I, iI], [I, −iI]] (full state = T·(Re s, Im s)):
    T⁻¹ diag(Λ, Λ̄) T = [[Re Λ, −Im Λ], [Im Λ, Re Λ]], T⁻¹ P_full P_full* T = 2 p pᵀ with p = (Re P, Im P),
    and T⁻¹ B_full = (Re B, Im B).
    """
    H, N2 = Lam.shape
    re, im = torch.diag_embed(Lam.real), torch.diag_embed(Lam.imag)
    A = torch.cat([torch.cat([re, -im], -1), torch.cat([im, re], -1)], -2)
    p = torch.cat([P.real, P.imag], -1)  # (r, H, N)
    A = A - 2 * torch.einsum("rhi,rhj->hij", p, p)
    eye = torch.eye(2 * N2, dtype=A.dtype, device=A.device)
    half = (dt / 2)[:, None, None] * A
    rhs = torch.cat([eye + half, (dt[:, None] * torch.cat([B.real, B.imag], -1))[..., None]], -1)
    sol = torch.linalg.solve(eye - half, rhs)
    return sol[..., :-1], sol[..., -1]


def c_real(C: Tensor) -> Tensor:
    """Output row in real coordinates: y = 2·Re(C·s) = [2 Re C, −2 Im C]·(Re s, Im s). (H, N2) -> (H, N)."""
    return torch.cat([2 * C.real, -2 * C.imag], -1)


def cauchy_woodbury_kernel(
    dt: Tensor, Lam: Tensor, P: Tensor, B: Tensor, Ct: Tensor, length: int
) -> Tensor:
    """K = irfft(K̂) with K̂(z) = Δ·C̃((1 − z)I − Δ/2(1 + z)(Λ − P P*))⁻¹B at z_k = exp(−2πik/L).

    dt: (H,) real; Lam, B, Ct: (H, N2) complex (C̃ already includes the (I − Ā^L) correction); P: (r, H, N2).
    Sums run over the full spectrum (each stored mode plus its conjugate). Returns (H, length) real.
    With α = 1 − z, β = Δ/2(1 + z), R = diag(1/(α − βΛ)): (αI − βA)⁻¹ = R − βRP(I + βP*RP)⁻¹P*R.
    """
    H, N2 = Lam.shape
    nf = length // 2 + 1
    k = torch.arange(nf, dtype=dt.dtype, device=dt.device)
    z = torch.exp(-2j * math.pi * k / length)
    left = torch.cat([Ct[None], P.conj()], 0)  # (1+r, H, N2): C̃, then the rows of P* (= Q*, Q = P)
    right = torch.cat([B[None], P], 0)  # (1+r, H, N2): B, then the columns of P
    v = left[:, None] * right[None]  # (1+r, 1+r, H, N2)
    F = max(1, min(nf, FREQ_BLOCK_ELEMS // max(1, H * N2)))
    out = []
    for f0 in range(0, nf, F):
        zb = z[f0 : f0 + F]
        alpha = (1 - zb)[None, None, :]  # (1, 1, F)
        beta = (dt[:, None] / 2) * (1 + zb)[None, :]  # (H, F)
        Rz = torch.reciprocal(alpha - beta[:, None, :] * Lam[..., None])  # (H, N2, F)
        Rc = torch.reciprocal(alpha - beta[:, None, :] * Lam.conj()[..., None])
        kk = torch.einsum("ijhn,hnf->ijhf", v, Rz) + torch.einsum("ijhn,hnf->ijhf", v.conj(), Rc)
        k00, k0p, kp0, kpp = kk[0, 0], kk[0, 1:], kk[1:, 0], kk[1:, 1:]  # (H,F), (r,H,F), (r,H,F), (r,r,H,F)
        w = _solve_small(beta * kpp, kp0)  # (I + β P*RP)⁻¹ P*RB: (r, H, F)
        out.append(dt[:, None] * (k00 - beta * (k0p * w).sum(0)))
    return torch.fft.irfft(torch.cat(out, -1), n=length)


def _solve_small(M: Tensor, b: Tensor) -> Tensor:
    """Solve (I + M) w = b for each trailing index. M: (r, r, ...), b: (r, ...) -> (r, ...); closed form for
    r <= 2 (many tiny systems: far cheaper than a batched LU)."""
    r = b.shape[0]
    if r == 1:
        return b / (1 + M[0, 0])
    if r == 2:
        a, bb, c, d = 1 + M[0, 0], M[0, 1], M[1, 0], 1 + M[1, 1]
        det = a * d - bb * c
        return torch.stack([(d * b[0] - bb * b[1]) / det, (a * b[1] - c * b[0]) / det])
    eye = torch.eye(r, dtype=M.dtype, device=M.device)
    w = torch.linalg.solve(eye + M.movedim((0, 1), (-2, -1)), b.movedim(0, -1)[..., None])[..., 0]
    return w.movedim(-1, 0)


def dense_scan(
    x: Tensor, dA: Tensor, dB: Tensor, Cr: Tensor, s0: Tensor | None, reset: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Real dense recurrence u_t = Ā u_{t−1} + B̄ x_t, y_t = C_r·u_t (zeroed before t where reset[:, t]).

    x: (batch, L, H); Ā: (H, N, N); B̄, C_r: (H, N); s0: (batch, H, N) real or None -> (y, final u).
    """
    batch, L, H = x.shape
    u = x.new_zeros(batch, H, dA.shape[-1]) if s0 is None else s0
    keep = None if reset is None else (~reset).to(x.dtype).unbind(1)
    ys = []
    for t, x_t in enumerate(x.unbind(1)):
        if keep is not None:
            u = u * keep[t][:, None, None]
        u = torch.einsum("hij,bhj->bhi", dA, u) + dB * x_t[..., None]
        ys.append((u * Cr).sum(-1))
    return torch.stack(ys, 1), u


def _to_real(s: Tensor) -> Tensor:
    return torch.cat([s.real, s.imag], -1)


def _to_complex(u: Tensor) -> Tensor:
    n2 = u.shape[-1] // 2
    return torch.complex(u[..., :n2], u[..., n2:])


# ----------------------------------------------------------------------------------- the layer
class S4(ChannelSSM):
    """Structured (DPLR) state space layer. See the module docstring for the maths, modes and state.

    Args:
        d_model: channels H (one SSM per channel).
        d_state: state size N (even); N/2 complex modes are stored.
        init: "legs" (default), "legt", "fout" (HiPPO matrices in NPLR form) or "ptd" (diagonal, perturb-then-
            diagonalise LegS).
        mode: "auto" | "conv" | "scan" (may be changed on the instance).
        dt_min, dt_max: range of the log-uniform Δ initialisation.
        reverse: process the sequence right to left (as in S4D).
        output: "gelu_linear" (default), "glu" or "none".
        ptd_eps: relative size of the PTD perturbation (init="ptd" only).

    x: (batch, length, d_model) -> y: (batch, length, d_model).
    """

    state_cls = S4State

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        *,
        init: str = "legs",
        mode: str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        reverse: bool = False,
        output: str = "gelu_linear",
        ptd_eps: float = 1e-4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.d_model = check_d_model(name, d_model)
        self.d_state = check_state_size(name, d_state)
        self.init = check_choice(name, "init", init, INITS)
        self.mode = check_choice(name, "mode", mode, MODES)
        self.output = check_choice(name, "output", output, OUTPUTS)
        self.reverse = check_flag(name, "reverse", reverse)
        dt_min, dt_max = check_dt_range(name, dt_min, dt_max)
        if not (isinstance(ptd_eps, (int, float)) and not isinstance(ptd_eps, bool) and ptd_eps > 0):
            raise ValueError(f"{name}: ptd_eps must be a positive float, got {ptd_eps!r}")
        kw = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        H, N2 = self.d_model, self.d_state // 2

        if self.init == "ptd":
            seed = int(torch.randint(0, 2**31 - 1, ()))
            f = ptd("legs", self.d_state, eps=float(ptd_eps), seed=seed)
            Lam = torch.complex(-f.Lambda.real.abs().clamp(min=RE_FLOOR), f.Lambda.imag)
            B = f.B / f.B.abs().pow(2).mean().sqrt()
            P = None
        else:
            f = nplr(self.init, self.d_state)
            Lam = torch.complex(f.Lambda.real.clamp(max=-RE_FLOOR), f.Lambda.imag)
            B, P = f.B, f.P
        self.rank = 0 if P is None else P.shape[0]
        C = torch.randn(H, N2, dtype=torch.complex128)
        self.log_dt = nn.Parameter(torch.log(log_uniform_dt(H, dt_min, dt_max)).to(**kw))
        self.Lambda_log_re = nn.Parameter(torch.log(-Lam.real).expand(H, N2).clone().to(**kw))
        self.Lambda_im = nn.Parameter(Lam.imag.expand(H, N2).clone().to(**kw))
        if P is not None:
            self.P = nn.Parameter(torch.view_as_real(P[:, None].expand(-1, H, -1).clone()).to(**kw))
        self.B = nn.Parameter(torch.view_as_real(B.expand(H, N2).clone()).to(**kw))
        self.C = nn.Parameter(torch.view_as_real(C).to(**kw))
        self.D = nn.Parameter(torch.randn(H, dtype=torch.float64).to(**kw))
        self.out = make_output(H, self.output, **kw)
        self._dense_cache: tuple | None = None

    # ------------------------------------------------------------------------------- parameters
    @property
    def diagonal(self) -> bool:
        """True for init="ptd": no low-rank term, the S4D machinery runs the layer."""
        return self.rank == 0

    def ssm_parameters(
        self, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        """(Δ (H,), Λ (H, N2), P (r, H, N2) or None, B, C (H, N2)) in real ``dtype`` (default: compute)."""
        rdt = dtype or compute_dtype(self.log_dt.dtype)
        Lam = torch.complex(-torch.exp(self.Lambda_log_re.to(rdt)), self.Lambda_im.to(rdt))
        P = None if self.diagonal else torch.view_as_complex(self.P.to(rdt))
        B = torch.view_as_complex(self.B.to(rdt))
        C = torch.view_as_complex(self.C.to(rdt))
        return torch.exp(self.log_dt.to(rdt)), Lam, P, B, C

    def _dense(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """float64 (Δ, Λ, P, B, C, Ā_real, B̄_real) for the DPLR layer.

        Without autograd (generation, evaluation) the result is cached until a parameter changes (in place, or
        replaced), so ``step`` does not redo the N×N solve per token.
        """
        key = None
        if not torch.is_grad_enabled():
            key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self._ssm_params())
            if self._dense_cache is not None and self._dense_cache[0] == key:
                return self._dense_cache[1]
        dt, Lam, P, B, C = self.ssm_parameters(torch.float64)
        dA, dB = dplr_real_form(dt, Lam, P, B)
        out = (dt, Lam, P, B, C, dA, dB)
        self._dense_cache = None if key is None else (key, out)
        return out

    def _ssm_params(self) -> list[Tensor]:
        return [self.log_dt, self.Lambda_log_re, self.Lambda_im, self.P, self.B, self.C]

    def kernel(self, length: int) -> Tensor:
        """The SSM kernel K_l = C Ā^l B̄ for l < length: (d_model, length) real, without D."""
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"{type(self).__name__}.kernel: length must be a positive int, got {length!r}")
        rdt = compute_dtype(self.log_dt.dtype)
        if self.diagonal:
            dt, Lam, _, B, C = self.ssm_parameters()
            _, log_dA, dB = discretize(dt, Lam, B, "bilinear")
            return diagonal_kernel(log_dA, C * dB, length)
        dt, Lam, P, B, C, dA, _ = self._dense()
        Cr = c_real(C)
        Ct_r = Cr - torch.einsum("hi,hij->hj", Cr, torch.linalg.matrix_power(dA, length))
        n2 = Lam.shape[-1]
        Ct = torch.complex(Ct_r[:, :n2], -Ct_r[:, n2:]) / 2
        return cauchy_woodbury_kernel(dt, Lam, P, B, Ct, length).to(rdt)

    # ------------------------------------------------------------------------------- contract
    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> S4State:
        """Zero state s: (batch_size, d_model, d_state/2), complex version of ``dtype`` (default: params)."""
        ct = complex_dtype(dtype or self.log_dt.dtype)
        return S4State(s=torch.zeros(batch_size, self.d_model, self.d_state // 2, dtype=ct,
                                     device=self.log_dt.device))

    def _ssm(self, xc: Tensor, s0: Tensor | None, reset: Tensor | None, mode: str,
             want_state: bool) -> tuple[Tensor, Tensor | None]:
        if self.diagonal:
            dt, Lam, _, B, C = self.ssm_parameters()
            dA, log_dA, dB = discretize(dt, Lam, B, "bilinear")
            return run_diagonal(xc, dA, log_dA, dB, C, s0=s0, reset=reset, mode=mode, want_state=want_state,
                                reverse=self.reverse)
        return self._run_dplr(xc, s0, reset, mode, want_state)

    def _run_dplr(
        self, x: Tensor, s0: Tensor | None, reset: Tensor | None, mode: str, want_state: bool
    ) -> tuple[Tensor, Tensor | None]:
        if self.reverse:
            x, reset = x.flip(1), flip_reset(reset)
        stateless = s0 is None and not want_state and reset is None
        if mode != "scan" and stateless:
            y, s = fft_conv(x, self.kernel(x.shape[1])), None
        else:
            _, _, _, _, C, dA, dB = self._dense()
            rdt = x.dtype
            u0 = None if s0 is None else _to_real(s0)
            y, u = dense_scan(x, dA.to(rdt), dB.to(rdt), c_real(C).to(rdt), u0, reset)
            s = _to_complex(u)
        return (y.flip(1) if self.reverse else y), s

    def _ssm_step(self, xc: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        if self.diagonal:
            dt, Lam, _, B, C = self.ssm_parameters()
            dA, _, dB = discretize(dt, Lam, B, "bilinear")
            return diagonal_step(xc, s, dA, dB, C)
        rdt = xc.dtype
        _, _, _, _, C, dA, dB = self._dense()
        u = torch.einsum("hij,bhj->bhi", dA.to(rdt), _to_real(s)) + dB.to(rdt) * xc[..., None]
        return (u * c_real(C).to(rdt)).sum(-1), _to_complex(u)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, init={self.init!r}, rank={self.rank}, "
                f"mode={self.mode!r}, reverse={self.reverse}, output={self.output!r}")


__all__ = ["S4", "S4State", "INITS"]
