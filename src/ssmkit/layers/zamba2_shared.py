"""Zamba2's hybrid layer: a shared attention + MLP block, reused at several depths, feeding a Mamba-2.

For the residual stream h and the model's input embeddings e (both (batch, length, d_model)), a hybrid layer
computes its residual update (the Block adds it to h; it has no pre-norm of its own)

    a = attn(input_norm(concat(h, e)))       GQA over the 2 * d_model wide input, head_dim = 2 * d_model / n_heads,
                                             softmax scale (head_dim / 2) ** -0.5, rotary on whole heads (optional)
    t = down(act(gate(f) + ag) * (up(f) + au)),  f = ff_norm(a),  (ag, au) = the two halves of mlp_adapter(f)
    y = mamba(norm(h + linear(t)))

The weights of ``input_norm``, q/k/v/o, ``ff_norm`` and gate/up/down live in a :class:`Zamba2SharedBlock`
shared by every hybrid layer that uses it (the backbone holds them, see :meth:`Zamba2Hybrid.build_shared`).
Each hybrid layer owns its low-rank adapters (added to the q, k, v projections when ``attn_adapters``, and to
the gate/up projection always), ``linear``, ``norm`` and ``mamba``. The state is the layer's own KV cache and
Mamba-2 state, so state passing, ``step`` and packing (``reset``) follow the layer contract.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import AttentionState
from .base import LayerState, SequenceLayer, check_choice, check_d_model, state_kwargs
from .ffn import ACTIVATIONS, check_bool, check_positive_int
from .gqa import GQAttention
from .mamba2 import Mamba2, Mamba2State
from .normed_mamba import rms


class RMSNorm(nn.Module):
    """weight * x / rms(x) over the last dim (computed in at least float32, returned in x's dtype)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms(x, self.eps, self.weight)


class LowRank(nn.Module):
    """up(down(x)): an adapter of rank ``rank``, x (..., d_in) -> (..., d_out)."""

    def __init__(self, d_in: int, rank: int, d_out: int, **kw) -> None:
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False, **kw)
        self.up = nn.Linear(rank, d_out, bias=False, **kw)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))


class Zamba2SharedBlock(nn.Module):
    """The weights one shared transformer block holds (see the module docstring); it is never called itself."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, d_hidden: int, mlp_bias: bool,
                 norm_eps: float) -> None:
        super().__init__()
        d2, hd = 2 * d_model, 2 * d_model // n_heads
        self.input_norm = RMSNorm(d2, norm_eps)
        self.q_proj = nn.Linear(d2, n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d2, n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d2, n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(n_heads * hd, d_model, bias=False)
        self.ff_norm = RMSNorm(d_model, norm_eps)
        self.gate_proj = nn.Linear(d_model, d_hidden, bias=mlp_bias)
        self.up_proj = nn.Linear(d_model, d_hidden, bias=mlp_bias)
        self.down_proj = nn.Linear(d_hidden, d_model, bias=mlp_bias)


class Adapted(nn.Module):
    """``owner.<name>(x)`` (a weight of a shared block, looked up at call time) plus this layer's own adapter."""

    def __init__(self, name: str, adapter: LowRank | None) -> None:
        super().__init__()
        self.name, self.adapter = name, adapter
        self.owner: list[nn.Module] = []  # a plain list: the shared block is not a submodule (one key per weight)

    @property
    def base(self) -> nn.Module:
        if not self.owner:
            raise RuntimeError("Zamba2Hybrid has no shared block: build it in a model (Backbone) or call attach()")
        return getattr(self.owner[0], self.name)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        return y if self.adapter is None else y + self.adapter(x)


class _SharedAttention(GQAttention):
    """GQAttention whose projections are :class:`Adapted` views of a shared block's q/k/v/o (float or quantized:
    dtype and device come from the shared q projection's first floating-point tensor)."""

    def _first_float(self) -> Tensor:
        base = self.q_proj.base
        for t in itertools.chain(base.parameters(), base.buffers()):
            if t.is_floating_point():
                return t
        raise RuntimeError("Zamba2Hybrid: the shared q projection holds no floating-point tensor")

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> AttentionState:
        """An empty KV cache: k, v (batch, n_kv_heads, 0, head_dim), pos (batch,) zeros."""
        check_positive_int(f"{type(self).__name__}.init_state", "batch_size", batch_size)
        ref = self._first_float()
        kv = torch.zeros(batch_size, self.n_kv_heads, 0, self.head_dim, dtype=dtype or ref.dtype, device=ref.device)
        return AttentionState(k=kv, v=kv.clone(), pos=torch.zeros(batch_size, dtype=torch.long, device=ref.device))


@dataclass
class Zamba2HybridState(LayerState):
    """attn: this invocation's KV cache; mamba: its Mamba-2 state."""

    attn: AttentionState
    mamba: Mamba2State


class Zamba2Hybrid(SequenceLayer):
    """One Zamba2 hybrid layer (see the module docstring). It reads the raw residual stream and the model's input
    embeddings (``takes_residual``), so a Block gives it no pre-norm.

    Args:
        d_model: model width.
        n_shared: how many shared blocks the model holds (invocation k uses block k % n_shared).
        n_heads, n_kv_heads: attention heads over the 2 * d_model wide input (n_kv_heads divides n_heads).
        rotary, rotary_base: rotary embeddings on whole heads.
        d_hidden, act, mlp_bias: the shared gated MLP (act one of :data:`~ssmkit.layers.ffn.ACTIVATIONS`).
        adapter_rank: rank of the adapters; attn_adapters: adapters on q, k, v too (needs n_kv_heads == n_heads).
        norm_eps: epsilon of the RMS norms (input_norm, ff_norm, norm).
        d_state .. ssm_norm_eps: the Mamba-2's options (:class:`~ssmkit.layers.Mamba2`; ssm_norm_eps is its
            gated norm's epsilon).

    forward: h (batch, length, d_model), embeddings (batch, length, d_model) -> y (batch, length, d_model).
    """

    takes_residual = True

    def __init__(
        self,
        d_model: int,
        n_shared: int = 1,
        n_heads: int = 1,
        n_kv_heads: int | None = None,
        rotary: bool = False,
        rotary_base: float = 10000.0,
        d_hidden: int | None = None,
        act: str = "gelu",
        mlp_bias: bool = False,
        adapter_rank: int = 8,
        attn_adapters: bool = False,
        norm_eps: float = 1e-5,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int | float = 2,
        headdim: int | None = None,
        ngroups: int = 1,
        chunk_size: int = 64,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        conv_bias: bool = True,
        bias: bool = False,
        ssm_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.d_model = d = check_d_model(name, d_model)
        self.n_shared = check_positive_int(name, "n_shared", n_shared)
        n_kv = n_heads if n_kv_heads is None else n_kv_heads
        check_positive_int(name, "n_heads", n_heads)
        if (2 * d) % n_heads:
            raise ValueError(f"{name}: n_heads={n_heads} must divide 2 * d_model = {2 * d}")
        self.d_hidden = check_positive_int(name, "d_hidden", 4 * d if d_hidden is None else d_hidden)
        self.act = check_choice(name, "act", act, tuple(ACTIVATIONS))
        self.mlp_bias = check_bool(name, "mlp_bias", mlp_bias)
        self.adapter_rank = check_positive_int(name, "adapter_rank", adapter_rank)
        self.attn_adapters = check_bool(name, "attn_adapters", attn_adapters)
        if attn_adapters and n_kv != n_heads:
            raise ValueError(f"{name}: attn_adapters needs n_kv_heads == n_heads, got {n_kv} and {n_heads}")
        if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or not 0 < norm_eps < 1:
            raise ValueError(f"{name}: norm_eps must be a number in (0, 1), got {norm_eps!r}")
        self.norm_eps = float(norm_eps)
        hd = 2 * d // n_heads
        attn = _SharedAttention(2 * d, n_heads, n_kv, hd, hd if check_bool(name, "rotary", rotary) else 0,
                                rotary_base, (hd / 2) ** -0.5, device="meta")
        self.rotary = rotary
        for p in "qkv":
            lora = LowRank(2 * d, adapter_rank, 2 * d) if attn_adapters else None
            setattr(attn, f"{p}_proj", Adapted(f"{p}_proj", lora))
        attn.o_proj = Adapted("o_proj", None)
        self.attn = attn
        self.mlp_adapter = LowRank(d, adapter_rank, 2 * self.d_hidden)
        self.linear = nn.Linear(d, d, bias=False)
        self.norm = RMSNorm(d, self.norm_eps)
        self.mamba = Mamba2(d, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim, ngroups=ngroups,
                            chunk_size=chunk_size, dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor,
                            dt_limit=tuple(dt_limit), conv_bias=conv_bias, bias=bias, norm_eps=ssm_norm_eps)
        self.shared: list[Zamba2SharedBlock] = []  # set by attach(); not a submodule

    # ------------------------------------------------------------------------------------------ sharing
    def make_shared(self) -> Zamba2SharedBlock:
        """A fresh shared block of this layer's sizes (on its device, in its dtype)."""
        w = self.linear.weight
        block = Zamba2SharedBlock(self.d_model, self.attn.n_heads, self.attn.n_kv_heads, self.d_hidden,
                                  self.mlp_bias, self.norm_eps)
        return block.to(device=w.device, dtype=w.dtype)

    def attach(self, block: Zamba2SharedBlock) -> None:
        """Use ``block``'s weights (held elsewhere, e.g. by the backbone)."""
        if not isinstance(block, Zamba2SharedBlock):
            raise TypeError(f"Zamba2Hybrid.attach: expected a Zamba2SharedBlock, got {type(block).__name__}")
        self.shared[:] = [block]
        for m in (self.attn.q_proj, self.attn.k_proj, self.attn.v_proj, self.attn.o_proj):
            m.owner[:] = [block]

    @staticmethod
    def build_shared(layers: list[Zamba2Hybrid]) -> list[Zamba2SharedBlock]:
        """The shared blocks of a model's hybrid layers, in order: invocation k uses block k % n_shared (only
        the blocks some invocation uses are built)."""
        n = layers[0].n_shared
        if any(m.n_shared != n for m in layers):
            raise ValueError("Zamba2Hybrid: every hybrid layer of a model must have the same n_shared")
        blocks = [layers[0].make_shared() for _ in range(min(n, len(layers)))]
        for k, m in enumerate(layers):
            m.attach(blocks[k % n])
        return blocks

    # ------------------------------------------------------------------------------------------ state
    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> Zamba2HybridState:
        return Zamba2HybridState(self.attn.init_state(batch_size, dtype=dtype),
                                 self.mamba.init_state(batch_size, dtype=dtype))

    def _split(self, state: object) -> Zamba2HybridState:
        if not isinstance(state, Zamba2HybridState):
            raise TypeError(f"Zamba2Hybrid: state must be a Zamba2HybridState, got {type(state).__name__}")
        return state

    # ------------------------------------------------------------------------------------------ forward
    def _block(self) -> Zamba2SharedBlock:
        if not self.shared:
            raise RuntimeError("Zamba2Hybrid has no shared block: build it in a model (Backbone) or call attach()")
        return self.shared[0]

    def _mlp(self, block: Zamba2SharedBlock, a: Tensor) -> Tensor:
        f = block.ff_norm(a)
        ag, au = self.mlp_adapter(f).chunk(2, dim=-1)
        return block.down_proj(ACTIVATIONS[self.act](block.gate_proj(f) + ag) * (block.up_proj(f) + au))

    def _embeddings(self, e: object, h: Tensor) -> Tensor:
        if not isinstance(e, Tensor) or e.shape != h.shape or e.dtype != h.dtype or e.device != h.device:
            got = f"{tuple(e.shape)} {e.dtype}" if isinstance(e, Tensor) else type(e).__name__
            raise ValueError(f"Zamba2Hybrid: embeddings (the model's input embeddings) must match h "
                             f"{tuple(h.shape)} {h.dtype}, got {got}")
        return e

    @state_kwargs
    def forward(self, x: Tensor, initial_state: Zamba2HybridState | None = None, *, reset: Tensor | None = None,
                return_final_state: bool = False, embeddings: Tensor | None = None):
        """x: the residual stream h (batch, length, d_model); embeddings: the input embeddings, same shape ->
        y, or (y, Zamba2HybridState) with ``return_final_state``."""
        h = self.check_input(x)
        self.check_dtype(h)
        e = self._embeddings(embeddings, h)
        s = None if initial_state is None else self._split(initial_state)
        block = self._block()
        a, ks = self.attn(block.input_norm(torch.cat([h, e], -1)), None if s is None else s.attn, reset=reset,
                          return_final_state=True)
        t = self.linear(self._mlp(block, a))
        y, ms = self.mamba(self.norm(h + t), None if s is None else s.mamba, reset=reset, return_final_state=True)
        return (y, Zamba2HybridState(ks, ms)) if return_final_state else y

    def step(self, x_t: Tensor, state: Zamba2HybridState, *, embeddings: Tensor | None = None
             ) -> tuple[Tensor, Zamba2HybridState]:
        """x_t: h (batch, d_model), embeddings (batch, d_model) -> (y_t, state)."""
        h = self.check_step_input(x_t)
        self.check_dtype(h, "x_t")
        e = self._embeddings(embeddings, h)
        s = self._split(state)
        block = self._block()
        a, ks = self.attn.step(block.input_norm(torch.cat([h, e], -1)), s.attn)
        t = self.linear(self._mlp(block, a))
        y, ms = self.mamba.step(self.norm(h + t), s.mamba)
        return y, Zamba2HybridState(ks, ms)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_shared={self.n_shared}, d_hidden={self.d_hidden}, act={self.act!r}, "
                f"adapter_rank={self.adapter_rank}, attn_adapters={self.attn_adapters}")
