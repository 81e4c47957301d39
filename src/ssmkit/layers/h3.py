"""H3 (Fu, Dao et al., "Hungry Hungry Hippos"): a shift SSM and a diagonal SSM around multiplicative
interactions, i.e. a linear-attention-like layer whose "attention" is two SSMs.

    q, k, v = x W_q + b_q, x W_k + b_k, x W_v + b_v                (batch, length, d_model) each
    k̄_t = Σ_{j<shift_len} w_j ⊙ k_{t−j}                              shift SSM on k
    per head h (n_heads heads of head_dim = d_model / n_heads channels; i, j < head_dim):
        KV_t[h, i, j] = SSM_diag,h(k̄[h, i] ⊙ v[h, j])_t              diagonal SSM on the outer product
        O_t[h, j]     = Σ_i q_t[h, i] · KV_t[h, i, j]                  contracted with q over k's index
    y = O W_o + b_o

This is Algorithm 1 of the paper: KV_t is the batched outer product K̄ V^T passed through the diagonal SSM and
O_t = Q_t KV_t. With head_dim = 1 (the paper's default, n_heads = d_model) it is y = W_o(q ⊙ SSM(k̄ ⊙ v)).

- Shift SSM: A is the shift matrix and B = e_1, so the state is the last ``shift_len`` inputs and the kernel
  is the learned FIR filter C: a causal depthwise conv of ``shift_len`` taps (:mod:`ssmkit.layers.short_conv`;
  its D skip is the lag-0 tap). The state carries the last ``shift_len − 1`` inputs of k. The reference code
  uses ``d_state`` taps (pass ``shift_len=d_state`` to match); the default 4 is a short filter, like Mamba's.
- Diagonal SSM: an :class:`~ssmkit.layers.s4d.S4D` with ``d_model = n_heads`` and ``output="none"``
  (y = SSM(u) + D u), its parameters shared by the head_dim² channels of a head, as in the reference code.
  Its kernel, conv/scan and step machinery is S4D's.
- Long sequences (FlashConv's state passing): with ``block_len`` the sequence is cut into blocks of that many
  positions; each block is one FFT convolution of FFT size ~2·block_len, and the diagonal SSM state is carried
  exactly from block to block (its contribution to a block's outputs and the block's end state are S4D's
  Vandermonde sums, O(d_state) per position). Blocked and unblocked give the same function; blocks bound the
  FFT size and the kernel length, at the price of those state terms.

Modes (of the diagonal SSM; the shift conv is always direct): "conv" (FFT conv per block, with exact state
passing), "scan" (the recurrence), "auto" (= "conv"). A block that contains a segment start (``reset``) runs
the recurrence in every mode, since a segment start cannot be expressed as one convolution.

State: :class:`H3State` with shift: (batch, d_model, shift_len − 1), the last k inputs (oldest first, zero
before a segment start), and ssm: (batch, head_dim, head_dim, n_heads, d_state/2) complex, the diagonal SSM
state of every (i, j) channel of every head. ``step`` is O(1) in the sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..init import S4D_INITS
from ..ops.linear_scan import compute_dtype
from .base import LayerState, SequenceLayer, check_choice, check_d_model, no_autocast, state_kwargs, to_compute
from .s4d import DISCS, S4D, check_state_size, complex_dtype, diagonal_step, run_diagonal
from .short_conv import ShortConv

MODES = ("auto", "conv", "scan")


@dataclass
class H3State(LayerState):
    """shift: (batch, d_model, shift_len − 1); ssm: (batch, P, P, n_heads, d_state/2) complex; P = head_dim"""

    shift: Tensor
    ssm: Tensor


def _positive_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"H3: {name} must be a positive int, got {v!r}")
    return v


class H3(SequenceLayer):
    """The H3 layer (see the module docstring for the maths, the state and the modes).

    Args:
        d_model: model width.
        d_state: state size N of the diagonal SSM (even; N/2 complex modes).
        n_heads: heads; head_dim = d_model / n_heads. None (default) means n_heads = d_model (head_dim 1, the
            paper's default). The diagonal SSM runs on n_heads · head_dim² channels.
        shift_len: taps of the shift SSM's FIR filter (its state size).
        mode: "auto" | "conv" | "scan" (may be changed on the instance).
        block_len: FlashConv block length for state passing across blocks; None: one block.
        init, disc, dt_min, dt_max: the diagonal SSM's initialisation and discretisation (see S4D).

    x: (batch, length, d_model) -> y: (batch, length, d_model).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        n_heads: int | None = None,
        shift_len: int = 4,
        mode: str = "auto",
        block_len: int | None = None,
        *,
        init: str = "legs",
        disc: str = "zoh",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
    ) -> None:
        super().__init__()
        self.d_model = check_d_model("H3", d_model)
        n_heads = d_model if n_heads is None else _positive_int("n_heads", n_heads)
        if d_model % n_heads:
            raise ValueError(f"H3: n_heads must divide d_model={d_model}, got n_heads={n_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.shift_len = _positive_int("shift_len", shift_len)
        self.block_len = None if block_len is None else _positive_int("block_len", block_len)
        self._mode = check_choice("H3", "mode", mode, MODES)
        check_state_size("H3", d_state)
        check_choice("H3", "init", init, S4D_INITS)
        check_choice("H3", "disc", disc, DISCS)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.shift = ShortConv(d_model, shift_len, bias=False)
        self.ssm = S4D(n_heads, d_state, init=init, disc=disc, dt_min=dt_min, dt_max=dt_max, output="none")
        self.out_proj = nn.Linear(d_model, d_model)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = check_choice("H3", "mode", value, MODES)

    @property
    def d_state(self) -> int:
        return self.ssm.d_state

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, n_heads={self.n_heads}, "
                f"head_dim={self.head_dim}, shift_len={self.shift_len}, mode={self.mode!r}, "
                f"block_len={self.block_len}")

    # -------------------------------------------------------------------------------------------- state
    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> H3State:
        dtype = dtype or self.param_dtype
        dev = self.param_device
        P = self.head_dim
        return H3State(
            shift=torch.zeros(batch_size, self.d_model, self.shift_len - 1, dtype=dtype, device=dev),
            ssm=torch.zeros(batch_size, P, P, self.n_heads, self.d_state // 2, dtype=complex_dtype(dtype),
                            device=dev),
        )

    def _checked_state(self, state: object, batch: int) -> H3State:
        st = self.check_state(state, batch)
        want = self.init_state(batch)
        for name in ("shift", "ssm"):
            got, exp = getattr(st, name), getattr(want, name)
            if got.dtype != exp.dtype or got.device != exp.device:
                raise TypeError(f"H3: state.{name} must have dtype {exp.dtype} on {exp.device}, "
                                f"got {got.dtype} on {got.device}")
        return st  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------ helpers
    def _outer(self, k: Tensor, v: Tensor) -> Tensor:
        """k̄, v: (batch, *, d_model) -> the per-head outer products folded as (batch·P·P, *, n_heads):
        row (b, i, j) holds k̄[h, i] · v[h, j] for every head h."""
        P, H = self.head_dim, self.n_heads
        lead = k.shape[1:-1]
        kk = k.unflatten(-1, (H, P)).movedim(-1, 1)  # (batch, P_i, *, H)
        vv = v.unflatten(-1, (H, P)).movedim(-1, 1)  # (batch, P_j, *, H)
        return (kk[:, :, None] * vv[:, None]).reshape(-1, *lead, H)

    def _contract(self, kv: Tensor, q: Tensor) -> Tensor:
        """kv: (batch·P·P, *, n_heads), q: (batch, *, d_model) -> O (batch, *, d_model), O[h, j] = Σ_i q[h, i]
        KV[h, i, j] (head-major channel order h·head_dim + j)."""
        P, H = self.head_dim, self.n_heads
        if P == 1:
            return kv * q
        lead = q.shape[1:-1]
        kv = kv.reshape(q.shape[0], P, P, *lead, H).movedim(1, -1).movedim(1, -1)  # (b, *, H, P_i, P_j)
        qq = q.unflatten(-1, (H, P))  # (b, *, H, P_i)
        return (qq.unsqueeze(-1) * kv).sum(-2).flatten(-2)

    # ------------------------------------------------------------------------------------------ forward
    @state_kwargs
    def forward(
        self,
        x: Tensor,
        initial_state: H3State | None = None,
        *,
        reset: Tensor | None = None,
        return_final_state: bool = False,
    ):
        """x: (batch, length, d_model) -> y (batch, length, d_model); (y, H3State) if return_final_state."""
        x = self.check_input(x)
        self.check_dtype(x, "x")
        reset = self.check_reset(reset, x)
        mode = check_choice("H3", "mode", self.mode, MODES)
        batch, length, _ = x.shape
        P, H, N2 = self.head_dim, self.n_heads, self.d_state // 2
        shift0 = s = None
        if initial_state is not None:
            st = self._checked_state(initial_state, batch)
            shift0, s = st.shift, st.ssm.reshape(batch * P * P, H, N2)
        rdt = compute_dtype(self.act_dtype(x))

        q, k, v = to_compute(self, self.q_proj(x), self.k_proj(x), self.v_proj(x))  # float32 under autocast
        k, shift_state = self.shift(k, shift0, reset=reset)
        u = self._outer(k.to(rdt), v.to(rdt))  # (batch·P·P, length, H)
        r = None if reset is None else reset.repeat_interleave(P * P, 0)

        with no_autocast(x):  # the SSM in its compute dtype; the projections follow autocast
            dA, log_dA, dB, C = self.ssm.discrete()
            D = self.ssm.D.to(rdt)
            ssm_mode = "scan" if mode == "scan" else "conv"
            block = length if self.block_len is None else self.block_len
            us = u.split(block, 1)
            rs = [None] * len(us) if r is None else r.split(block, 1)
            ys = []
            for n, (ub, rb) in enumerate(zip(us, rs, strict=True)):
                last = n == len(us) - 1
                rb = rb if rb is not None and bool(rb.any()) else None  # reset-free blocks keep the FFT path
                yb, s = run_diagonal(ub, dA, log_dA, dB, C, s0=s, reset=rb, mode=ssm_mode,
                                     want_state=return_final_state or not last, reverse=False)
                ys.append(yb + ub * D)
        o = self._contract(torch.cat(ys, 1), q.to(rdt))
        y = self.out_proj(o.to(x.dtype))
        if not return_final_state:
            return y
        return y, H3State(shift=shift_state, ssm=s.reshape(batch, P, P, H, N2))

    def step(self, x_t: Tensor, state: H3State) -> tuple[Tensor, H3State]:
        """One token: x_t (batch, d_model) -> (y_t (batch, d_model), new state); O(1) in the length."""
        x_t = self.check_step_input(x_t)
        self.check_dtype(x_t, "x_t")
        batch = x_t.shape[0]
        P, H, N2 = self.head_dim, self.n_heads, self.d_state // 2
        st = self._checked_state(state, batch)
        rdt = compute_dtype(x_t.dtype)
        q, k, v = self.q_proj(x_t), self.k_proj(x_t), self.v_proj(x_t)
        k, shift_state = self.shift.step(k, st.shift)
        u = self._outer(k.to(rdt), v.to(rdt))  # (batch·P·P, H)
        dA, _, dB, C = self.ssm.discrete()
        y, s = diagonal_step(u, st.ssm.reshape(batch * P * P, H, N2), dA, dB, C)
        o = self._contract(y + u * self.ssm.D.to(rdt), q.to(rdt))
        return self.out_proj(o.to(x_t.dtype)), H3State(shift=shift_state, ssm=s.reshape(batch, P, P, H, N2))


__all__ = ["H3", "H3State", "MODES"]
