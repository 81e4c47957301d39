"""S4D: a diagonal state space layer (Gu et al., "On the Parameterization and Initialization of Diagonal
SSMs").

Per channel h (d_model of them) and state mode n (d_state/2 complex modes, one of each conjugate pair):

    Ā = exp(ΔA),                 B̄ = (exp(ΔA) − 1)/A · B      (disc="zoh")
    Ā = (1 + ΔA/2)/(1 − ΔA/2),   B̄ = Δ/(1 − ΔA/2) · B        (disc="bilinear")
    s_t = Ā s_{t−1} + B̄ x_t,     y_t = 2·Re(Σ_n C_n s_t,n) + D x_t
    K_l = 2·Re Σ_n C_n B̄_n Ā_n^l  (the same map as a causal convolution, y = K * x + D x)

followed by an output map (``output``): "gelu_linear" (GELU, then Linear(d_model, d_model); default),
"glu" (GELU, Linear(d_model, 2 d_model), GLU, as in the S4 repo's blocks) or "none" (the raw SSM + D x,
e.g. when S4D is a building block such as H3's diagonal SSM).

Parameters (all real): log_dt (d_model,) with Δ = exp(log_dt), log-uniform in [dt_min, dt_max] at init;
A_log_re, A_im (d_model, d_state/2) with A = −exp(A_log_re) + i·A_im (Re A < 0 always); B, C
(d_model, d_state/2, 2), real views of complex tensors; D (d_model,).

Modes:
- "conv": the kernel K, a Vandermonde product computed with the positions split as l = b·T + j, T ≈ √L
  (Ā^l = Ā^(bT)·Ā^j, so one batched matrix product over (L/T × N/2) and (N/2 × T) factors; memory
  O(d_model·N·√L), never a (d_model, N/2, L) tensor), applied with an FFT convolution. An initial state adds
  its contribution 2·Re Σ_n C_n Ā_n^(t+1) s_n directly, and the final state Ā^L s + Σ_t Ā^(L−1−t) B̄ x_t is
  computed with the same factorisation, so state passing is exact in conv mode. ``reset`` cannot be expressed
  as one convolution, so calls with ``reset`` run the scan.
- "scan": the complex diagonal recurrence through :func:`ssmkit.ops.linear_scan`, in chunks of positions
  so the (batch, chunk, d_model, d_state/2) complex tensors stay bounded.
- "auto" (default): conv for calls without ``reset`` that are stateless or at least ``AUTO_CONV_STATE_MIN``
  positions long (the state terms then cost two more factored products, about 1.8x a stateless forward +
  backward instead of about 9x for the scan), scan otherwise (short calls with state, where the scan is faster).

``reverse=True`` runs the layer right to left (an anti-causal kernel / a reversed scan): feed tokens to
``step`` last to first; a state passed to ``forward`` enters at the last position, and the returned state is
the one after the first position. ``reset`` still marks segment starts; nothing flows across them.

State: :class:`S4DState` with s: (batch, d_model, d_state/2) complex (complex64 for float32/16-bit layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..init import S4D_INITS, check_dt_range, log_uniform_dt, s4d_init
from ..ops import fft_conv, linear_scan
from ..ops.linear_scan import compute_dtype
from .base import (
    LayerState,
    SequenceLayer,
    check_choice,
    check_d_model,
    check_flag,
    cut_at_segment_start,
    flip_reset,
    no_autocast,
    state_kwargs,
)

MODES = ("auto", "conv", "scan")
DISCS = ("zoh", "bilinear")
OUTPUTS = ("gelu_linear", "glu", "none")
BLOCK_ELEMS = 1 << 20  # complex elements per scan chunk (batch × chunk × d_model × d_state/2)
VANDERMONDE_BLOCK: int | None = None  # inner block T of the kernel powers; None: ⌈√L⌉
#: "auto" passes state through the convolution from this length on (measured break-even about 512 without grad)
AUTO_CONV_STATE_MIN = 1024


@dataclass
class S4DState(LayerState):
    """s: (batch, d_model, d_state/2) complex state of the diagonal recurrence."""

    s: Tensor


# ----------------------------------------------------------------------------------- shared checks & helpers
def complex_dtype(dtype: torch.dtype) -> torch.dtype:
    """Complex compute dtype for a real parameter/input dtype (complex64 for 16-bit and float32)."""
    return torch.complex128 if compute_dtype(dtype) == torch.float64 else torch.complex64


def check_state_size(owner: str, d_state: object) -> int:
    if isinstance(d_state, bool) or not isinstance(d_state, int) or d_state < 2 or d_state % 2:
        raise ValueError(f"{owner}: d_state must be a positive even int (conjugate pairs), got {d_state!r}")
    return d_state


def make_output(d_model: int, output: str, **kw) -> nn.Module:
    """The pointwise output map: "gelu_linear", "glu" or "none" (see the module docstring)."""
    if output == "gelu_linear":
        return nn.Sequential(nn.GELU(), nn.Linear(d_model, d_model, **kw))
    if output == "glu":
        return nn.Sequential(nn.GELU(), nn.Linear(d_model, 2 * d_model, **kw), nn.GLU(dim=-1))
    return nn.Identity()


# ----------------------------------------------------------------------------------- diagonal SSM machinery
def discretize(dt: Tensor, A: Tensor, B: Tensor, disc: str) -> tuple[Tensor, Tensor, Tensor]:
    """dt: (H,) real; A, B: (H, N2) complex -> (Ā, log Ā, B̄), each (H, N2) complex (exp(log Ā) = Ā)."""
    dtA = dt[:, None] * A
    if disc == "zoh":
        em1 = torch.expm1(dtA)
        return em1 + 1, dtA, em1 / A * B
    half = dtA / 2
    return (1 + half) / (1 - half), torch.log1p(half) - torch.log1p(-half), dt[:, None] / (1 - half) * B


def _split_powers(log_dA: Tensor, length: int) -> tuple[int, int, Tensor, Tensor]:
    """Powers Ā^l for l = b·T + j < length, factored as outer Ā^(bT) times inner Ā^j with T ≈ √length.

    Returns (T, nb, inner (H, N2, T), outer (H, N2, nb)): O(H·N2·√L) memory instead of O(H·N2·L).
    """
    T = VANDERMONDE_BLOCK or math.isqrt(max(0, length - 1)) + 1
    T = max(1, min(T, length))
    nb = -(-length // T)
    r = log_dA.real.dtype
    inner = torch.exp(log_dA[..., None] * torch.arange(T, dtype=r, device=log_dA.device))
    outer = torch.exp(log_dA[..., None] * (T * torch.arange(nb, dtype=r, device=log_dA.device)))
    return T, nb, inner, outer


def _re_bmm(U: Tensor, V: Tensor) -> Tensor:
    """Re(U @ V) for complex U (H, m, n), V (H, n, k), as one real bmm."""
    return torch.bmm(torch.cat([U.real, -U.imag], -1), torch.cat([V.real, V.imag], -2))


def diagonal_kernel(log_dA: Tensor, W: Tensor, length: int) -> Tensor:
    """K_l = 2·Re Σ_n W_n Ā_n^l for l < length. log_dA, W: (H, N2) complex -> (H, length) real.

    With l = b·T + j: K[b, j] = 2·Re Σ_n (W_n Ā_n^(bT)) Ā_n^j, one batched (nb × N2) @ (N2 × T) product.
    """
    T, nb, inner, outer = _split_powers(log_dA, length)
    U = (W[..., None] * outer).transpose(1, 2)  # (H, nb, N2)
    return 2 * _re_bmm(U, inner).reshape(W.shape[0], nb * T)[:, :length]


def diagonal_conv(
    x: Tensor, dA: Tensor, log_dA: Tensor, dB: Tensor, C: Tensor, s0: Tensor | None, want_state: bool
) -> tuple[Tensor, Tensor | None]:
    """Conv mode. x: (batch, L, H) real; Ā, log Ā, B̄, C: (H, N2); s0: (batch, H, N2) or None.

    Returns y = K * x + 2·Re Σ_n C_n Ā_n^(t+1) s0_n  (batch, L, H) and the final state (or None).
    """
    batch, L, H = x.shape
    N2 = dA.shape[-1]
    y = fft_conv(x, diagonal_kernel(log_dA, C * dB, L))
    if s0 is None and not want_state:
        return y, None
    T, nb, inner, outer = _split_powers(log_dA, L)
    if s0 is not None:
        U = (C * dA * s0)[..., None] * outer  # (batch, H, N2, nb)
        U = U.permute(1, 0, 3, 2).reshape(H, batch * nb, N2)
        extra = 2 * _re_bmm(U, inner).reshape(H, batch, nb * T)[..., :L]
        y = y + extra.permute(1, 2, 0)
    if not want_state:
        return y, None
    # final state: Σ_r Ā^r B̄ x_{L-1-r}, with r = b·T + j
    xr = F.pad(x.flip(1), (0, 0, 0, nb * T - L))  # (batch, nb·T, H)
    X = xr.reshape(batch, nb, T, H).permute(3, 0, 1, 2).reshape(H, batch * nb, T)
    inner_t = inner.transpose(1, 2)  # (H, T, N2)
    S = torch.complex(torch.bmm(X, inner_t.real), torch.bmm(X, inner_t.imag)).reshape(H, batch, nb, N2)
    acc = (S * outer.transpose(1, 2)[:, None]).sum(2).permute(1, 0, 2)  # (batch, H, N2)
    s = dB * acc
    if s0 is not None:
        s = s + torch.exp(log_dA * L) * s0
    return y, s


def diagonal_scan(
    x: Tensor, dA: Tensor, dB: Tensor, C: Tensor, s0: Tensor | None, reset: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Scan mode: s_t = Ā s_{t−1} + B̄ x_t, y_t = 2·Re Σ_n C_n s_t,n, chunked along the length.

    x: (batch, L, H) real; Ā, B̄, C: (H, N2) complex; s0: (batch, H, N2) or None; reset: (batch, L) or None.
    """
    batch, L, H = x.shape
    N2 = dA.shape[-1]
    T = max(1, min(L, BLOCK_ELEMS // max(1, batch * H * N2)))
    ys, s = [], s0
    xs = x.split(T, 1)
    rs = [None] * len(xs) if reset is None else reset.split(T, 1)
    for xc, rc in zip(xs, rs, strict=True):
        b = xc.to(dA.dtype)[..., None] * dB
        h, s = linear_scan(dA.expand_as(b), b, initial_state=s, reset=rc, return_final_state=True)
        ys.append(2 * torch.einsum("blhn,hn->blh", h, C).real)
    return torch.cat(ys, 1), s


def run_diagonal(
    x: Tensor,
    dA: Tensor,
    log_dA: Tensor,
    dB: Tensor,
    C: Tensor,
    *,
    s0: Tensor | None,
    reset: Tensor | None,
    mode: str,
    want_state: bool,
    reverse: bool,
) -> tuple[Tensor, Tensor | None]:
    """The diagonal SSM (without D) over a whole sequence in ``mode``; see the module docstring.

    x: (batch, L, H) real compute dtype; returns y (batch, L, H) and the final state (batch, H, N2) or None.
    """
    if reverse:
        x, reset = x.flip(1), flip_reset(reset)
    stateless = s0 is None and not want_state
    use_conv = mode == "conv" or (mode == "auto" and (stateless or x.shape[1] >= AUTO_CONV_STATE_MIN))
    if use_conv and reset is None:
        y, s = diagonal_conv(x, dA, log_dA, dB, C, s0, want_state)
    else:
        y, s = diagonal_scan(x, dA, dB, C, s0, reset)
    return (y.flip(1) if reverse else y), s


def diagonal_step(x_t: Tensor, s: Tensor, dA: Tensor, dB: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """One step: x_t (batch, H) real, s (batch, H, N2) -> (y_t (batch, H) without D, new s)."""
    s = dA * s + dB * x_t.to(dA.dtype)[..., None]
    return 2 * torch.einsum("bhn,hn->bh", s, C).real, s


# ----------------------------------------------------------------------------------- the layer
class ChannelSSM(SequenceLayer):
    """The frame S4D and S4 share around their SSM: input, reset and state checks, the compute dtype, the skip
    term ``D`` and the output map. Subclasses set ``log_dt`` (H,), ``D`` (H,), ``out``, ``mode``, ``reverse`` and
    ``state_cls`` (a LayerState with one field ``s``), and implement :meth:`_ssm` and :meth:`_ssm_step`."""

    state_cls: ClassVar[type[LayerState]]

    def _ssm(self, xc: Tensor, s0: Tensor | None, reset: Tensor | None, mode: str,
             want_state: bool) -> tuple[Tensor, Tensor | None]:
        """xc (batch, length, H) in the compute dtype, s0 (batch, H, N/2) complex or None -> (y, final s)."""
        raise NotImplementedError

    def _ssm_step(self, xc: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """One token xc (batch, H) in the compute dtype, s (batch, H, N/2) complex -> (y_t, new s)."""
        raise NotImplementedError

    def _state_tensor(self, state: object, batch: int) -> Tensor:
        st = self.check_state(state, batch)
        want = complex_dtype(self.log_dt.dtype)
        if st.s.dtype != want:
            raise TypeError(f"{type(self).__name__}: state.s must have dtype {want}, got {st.s.dtype}")
        return st.s

    @state_kwargs
    def forward(
        self,
        x: Tensor,
        initial_state: LayerState | None = None,
        *,
        reset: Tensor | None = None,
        return_final_state: bool = False,
    ):
        """x: (batch, length, d_model) -> y (batch, length, d_model), or (y, final state) if
        ``return_final_state``."""
        x = self.check_input(x)
        self.check_dtype(x, "x")
        reset = self.check_reset(reset, x)
        mode = check_choice(type(self).__name__, "mode", self.mode, MODES)
        s0 = None if initial_state is None else self._state_tensor(initial_state, x.shape[0])
        rdt = compute_dtype(self.log_dt.dtype)
        with no_autocast(x):  # the SSM in its compute dtype; only the output projection follows autocast
            xc = x.to(rdt)
            y, s = self._ssm(xc, s0, reset, mode, return_final_state)
            y = y + xc * self.D.to(rdt)
        y = self.out(y.to(x.dtype))
        if not return_final_state:
            return y
        state = self.state_cls(s=s)
        return y, (cut_at_segment_start(state, reset) if self.reverse else state)

    def step(self, x_t: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        """One token x_t: (batch, d_model) -> (y_t, new state); O(1). reverse=True: feed tokens last first."""
        x_t = self.check_step_input(x_t)
        self.check_dtype(x_t, "x_t")
        s = self._state_tensor(state, x_t.shape[0])
        rdt = compute_dtype(self.log_dt.dtype)
        with no_autocast(x_t):
            xc = x_t.to(rdt)
            y, s = self._ssm_step(xc, s)
            y = y + xc * self.D.to(rdt)
        return self.out(y.to(x_t.dtype)), self.state_cls(s=s)


class S4D(ChannelSSM):
    """Diagonal SSM layer (S4D). See the module docstring for the maths, modes, state and ``reverse``.

    Args:
        d_model: channels H (one independent SSM per channel).
        d_state: state size N (even); N/2 complex modes are stored, their conjugates are implied by 2·Re.
        init: "legs" (diagonal of HiPPO-LegS in NPLR form; default), "lin", "inv" or "real".
        disc: "zoh" (default) or "bilinear".
        mode: "auto" | "conv" | "scan" (may be changed on the instance).
        dt_min, dt_max: range of the log-uniform Δ initialisation.
        reverse: process the sequence right to left.
        output: "gelu_linear" (default), "glu" or "none".

    x: (batch, length, d_model) -> y: (batch, length, d_model).
    """

    state_cls = S4DState

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        *,
        init: str = "legs",
        disc: str = "zoh",
        mode: str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        reverse: bool = False,
        output: str = "gelu_linear",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.d_model = check_d_model(name, d_model)
        self.d_state = check_state_size(name, d_state)
        self.init = check_choice(name, "init", init, S4D_INITS)
        self.disc = check_choice(name, "disc", disc, DISCS)
        self.mode = check_choice(name, "mode", mode, MODES)
        self.output = check_choice(name, "output", output, OUTPUTS)
        self.reverse = check_flag(name, "reverse", reverse)
        dt_min, dt_max = check_dt_range(name, dt_min, dt_max)
        kw = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        H, N2 = self.d_model, self.d_state // 2

        A, B = s4d_init(self.init, self.d_state)
        C = torch.randn(H, N2, dtype=torch.complex128)
        self.log_dt = nn.Parameter(torch.log(log_uniform_dt(H, dt_min, dt_max)).to(**kw))
        self.A_log_re = nn.Parameter(torch.log(-A.real).expand(H, N2).clone().to(**kw))
        self.A_im = nn.Parameter(A.imag.expand(H, N2).clone().to(**kw))
        self.B = nn.Parameter(torch.view_as_real(B.expand(H, N2).clone()).to(**kw))
        self.C = nn.Parameter(torch.view_as_real(C).to(**kw))
        self.D = nn.Parameter(torch.randn(H, dtype=torch.float64).to(**kw))
        self.out = make_output(H, self.output, **kw)

    # ------------------------------------------------------------------------------- parameters
    def _dtypes(self) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
        """(parameter dtype, real compute dtype, complex compute dtype)."""
        p = self.log_dt.dtype
        return p, compute_dtype(p), complex_dtype(p)

    def ssm_parameters(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Continuous-time (Δ (H,), A, B, C (H, N2) complex) in the compute dtype."""
        _, rdt, _ = self._dtypes()
        A = torch.complex(-torch.exp(self.A_log_re.to(rdt)), self.A_im.to(rdt))
        B = torch.view_as_complex(self.B.to(rdt))
        C = torch.view_as_complex(self.C.to(rdt))
        return torch.exp(self.log_dt.to(rdt)), A, B, C

    def discrete(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(Ā, log Ā, B̄, C), each (H, N2) complex."""
        dt, A, B, C = self.ssm_parameters()
        dA, log_dA, dB = discretize(dt, A, B, self.disc)
        return dA, log_dA, dB, C

    def kernel(self, length: int) -> Tensor:
        """The SSM convolution kernel K_l = 2·Re Σ_n C_n B̄_n Ā_n^l, (d_model, length), without D.

        With ``reverse=True`` the same kernel is applied anti-causally (y_t = Σ_l K_l x_{t+l})."""
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"{type(self).__name__}.kernel: length must be a positive int, got {length!r}")
        dA, log_dA, dB, C = self.discrete()
        return diagonal_kernel(log_dA, C * dB, length)

    # ------------------------------------------------------------------------------- contract
    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> S4DState:
        """Zero state s: (batch_size, d_model, d_state/2), complex version of ``dtype`` (default: params)."""
        ct = complex_dtype(dtype or self.log_dt.dtype)
        return S4DState(s=torch.zeros(batch_size, self.d_model, self.d_state // 2, dtype=ct,
                                      device=self.log_dt.device))

    def _ssm(self, xc: Tensor, s0: Tensor | None, reset: Tensor | None, mode: str,
             want_state: bool) -> tuple[Tensor, Tensor | None]:
        dA, log_dA, dB, C = self.discrete()
        return run_diagonal(xc, dA, log_dA, dB, C, s0=s0, reset=reset, mode=mode, want_state=want_state,
                            reverse=self.reverse)

    def _ssm_step(self, xc: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        dA, _, dB, C = self.discrete()
        return diagonal_step(xc, s, dA, dB, C)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, init={self.init!r}, disc={self.disc!r}, "
                f"mode={self.mode!r}, reverse={self.reverse}, output={self.output!r}")


__all__ = ["S4D", "S4DState", "MODES", "DISCS", "OUTPUTS"]
