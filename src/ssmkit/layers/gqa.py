"""Grouped-query causal attention with separate q/k/v/o projections, optional partial rotary embeddings and a
KV cache: the attention of transformers' hybrid models (Bamba, NemotronH, Jamba, ...).

The state is an :class:`~ssmkit.layers.attention.AttentionState` holding ``n_kv_heads`` heads, so the
generation helpers batch it like any KV cache. Forward-with-state, ``step`` and packing (``reset``) follow the
layer contract: splitting a sequence and passing the cache equals running it whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttentionState, segments_and_positions
from .base import SequenceLayer, check_d_model, state_kwargs, to_compute
from .ffn import check_bool, check_positive_int


class GQAttention(SequenceLayer):
    """Causal multi-head attention with ``n_kv_heads`` key/value heads shared by groups of query heads.

    Args:
        d_model: model width.
        n_heads: query heads.
        n_kv_heads: key/value heads (divides n_heads); default n_heads.
        head_dim: per-head width; default d_model // n_heads.
        rotary_dim: rotary embeddings on the first ``rotary_dim`` channels of each head (0 = none; even, at most
            head_dim); channel pairs (j, j + rotary_dim/2) turn by pos * rotary_base^(-2j/rotary_dim).
        rotary_base: the rotary frequency base.
        scale: the softmax scale; None = head_dim ** -0.5.
        qkv_bias, out_bias: biases of q/k/v_proj and of o_proj.
        key_multiplier: keys are k_proj(x) * key_multiplier (FalconH1's muP constant; 1.0 skips it).

    Shapes: x (batch, length, d_model) -> y (batch, length, d_model).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int = 1,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        rotary_dim: int = 0,
        rotary_base: float = 10000.0,
        scale: float | None = None,
        *,
        qkv_bias: bool = False,
        out_bias: bool = False,
        key_multiplier: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.d_model = check_d_model(name, d_model)
        self.n_heads = check_positive_int(name, "n_heads", n_heads)
        self.n_kv_heads = check_positive_int(name, "n_kv_heads", n_heads if n_kv_heads is None else n_kv_heads)
        if n_heads % self.n_kv_heads:
            raise ValueError(f"{name}: n_kv_heads={self.n_kv_heads} must divide n_heads={n_heads}")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"{name}: give head_dim, or n_heads={n_heads} must divide d_model={d_model}")
            head_dim = d_model // n_heads
        self.head_dim = check_positive_int(name, "head_dim", head_dim)
        if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim < 0 or rotary_dim % 2 \
                or rotary_dim > self.head_dim:
            raise ValueError(f"{name}: rotary_dim must be an even int in [0, head_dim={self.head_dim}], "
                             f"got {rotary_dim!r}")
        self.rotary_dim = rotary_dim
        if isinstance(rotary_base, bool) or not isinstance(rotary_base, (int, float)) or not rotary_base > 1:
            raise ValueError(f"{name}: rotary_base must be a number > 1, got {rotary_base!r}")
        self.rotary_base = float(rotary_base)
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
            raise ValueError(f"{name}: scale must be a positive number or None, got {scale!r}")
        self.scale = None if scale is None else float(scale)
        if isinstance(key_multiplier, bool) or not isinstance(key_multiplier, (int, float)) or not key_multiplier > 0:
            raise ValueError(f"{name}: key_multiplier must be a positive number, got {key_multiplier!r}")
        self.key_multiplier = float(key_multiplier)
        check_bool(name, "qkv_bias", qkv_bias)
        check_bool(name, "out_bias", out_bias)
        kw = {"device": device, "dtype": dtype}
        dq, dkv = n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d_model, dq, bias=qkv_bias, **kw)
        self.k_proj = nn.Linear(d_model, dkv, bias=qkv_bias, **kw)
        self.v_proj = nn.Linear(d_model, dkv, bias=qkv_bias, **kw)
        self.o_proj = nn.Linear(dq, d_model, bias=out_bias, **kw)

    # ------------------------------------------------------------------------------------------ state
    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> AttentionState:
        """An empty KV cache: k, v (batch, n_kv_heads, 0, head_dim), pos (batch,) zeros."""
        check_positive_int(f"{type(self).__name__}.init_state", "batch_size", batch_size)
        w = self.q_proj.weight
        kv = torch.zeros(batch_size, self.n_kv_heads, 0, self.head_dim, dtype=dtype or w.dtype, device=w.device)
        return AttentionState(k=kv, v=kv.clone(), pos=torch.zeros(batch_size, dtype=torch.long, device=w.device))

    def _check_cache(self, state: object, batch: int, dtype: torch.dtype) -> AttentionState:
        name = type(self).__name__
        if not isinstance(state, AttentionState):
            raise TypeError(f"{name}: state must be an AttentionState (from {name}.init_state or a {name} "
                            f"forward), got {type(state).__name__}")
        for field in ("k", "v"):
            t = getattr(state, field)
            if t.ndim != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (batch, self.n_kv_heads, self.head_dim):
                raise ValueError(f"{name}: state.{field} must have shape (batch={batch}, n_kv_heads="
                                 f"{self.n_kv_heads}, cache_len, head_dim={self.head_dim}), got {tuple(t.shape)}")
            if t.dtype != dtype:
                raise TypeError(f"{name}: state.{field} has dtype {t.dtype} but the input is {dtype}")
        if state.k.shape != state.v.shape:
            raise ValueError(f"{name}: state.k {tuple(state.k.shape)} and state.v {tuple(state.v.shape)} differ")
        if state.pos.dtype != torch.long or tuple(state.pos.shape) != (batch,) or bool((state.pos < 0).any()):
            raise ValueError(f"{name}: state.pos must be non-negative int64 of shape ({batch},), got "
                             f"{tuple(state.pos.shape)} {state.pos.dtype}")
        return state

    # ------------------------------------------------------------------------------------------ rotary
    def _rotate(self, t: Tensor, pos: Tensor) -> Tensor:
        """t (batch, heads, length, head_dim), pos (batch, length) -> t with its first rotary_dim channels
        rotated."""
        r = self.rotary_dim
        half = r // 2
        cdt = torch.promote_types(t.dtype, torch.float32)
        inv_freq = self.rotary_base ** (-torch.arange(0, r, 2, dtype=cdt, device=t.device) / r)
        ang = pos.to(cdt)[:, None, :, None] * inv_freq
        cos, sin = torch.cos(ang).to(t.dtype), torch.sin(ang).to(t.dtype)
        t1, t2, rest = t[..., :half], t[..., half:r], t[..., r:]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin, rest], dim=-1)

    # ------------------------------------------------------------------------------------------ forward
    def _heads(self, x: Tensor, initial_state: AttentionState | None, reset: Tensor | None):
        """Checked x, reset and cache, then q (batch, n_heads, length, head_dim), k and v (batch, n_kv_heads,
        length, head_dim), rotated at their positions, and the segment ids and positions (batch, length)."""
        x = self.check_input(x)
        self.check_dtype(x)
        reset = self.check_reset(reset, x)
        batch, length, _ = x.shape
        if initial_state is not None:
            initial_state = self._check_cache(initial_state, batch, self.act_dtype(x))
        # under autocast q, k, v (and the cache) are float32; the attention itself runs in autocast's dtype
        q, k, v = to_compute(self, self.q_proj(x), self.k_proj(x), self.v_proj(x))
        if self.key_multiplier != 1.0:
            k = k * self.key_multiplier
        q = q.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        seg, pos = segments_and_positions(batch, length, reset, initial_state, x.device)
        if self.rotary_dim:
            q, k = self._rotate(q, pos), self._rotate(k, pos)
        return x, reset, initial_state, q, k, v, seg, pos

    @staticmethod
    def _with_cache(initial_state: AttentionState | None, k: Tensor, v: Tensor, seg: Tensor):
        """Keys and values after the cache, and each key's segment id: cached entries of the current segment are
        segment 0, older ones -1 (new keys keep ``seg``)."""
        if initial_state is None:
            return k, v, seg
        cache_len = initial_state.k.shape[2]
        keys, vals = torch.cat([initial_state.k, k], 2), torch.cat([initial_state.v, v], 2)
        cached = torch.arange(cache_len, device=k.device)[None, :]
        current = cached >= cache_len - initial_state.pos.clamp(max=cache_len)[:, None]
        return keys, vals, torch.cat([current.long() - 1, seg], 1)

    @state_kwargs
    def forward(self, x: Tensor, initial_state: AttentionState | None = None, *, reset: Tensor | None = None,
                return_final_state: bool = False):
        """x: (batch, length, d_model) -> y, or (y, KV cache) with ``return_final_state``.

        initial_state: a KV cache to continue from; reset: (batch, length) bool segment starts (no attention
        across segments; rotary positions restart)."""
        x, reset, initial_state, q, k, v, seg, pos = self._heads(x, initial_state, reset)
        batch, length, _ = x.shape
        cache_len = 0 if initial_state is None else initial_state.k.shape[2]
        keys, vals = k, v
        gqa = self.n_heads != self.n_kv_heads
        if initial_state is None and reset is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        elif reset is None and length == 1 and bool((initial_state.pos >= cache_len).all()):
            # one new token whose row sees its whole cache (plain decoding): no mask needed
            keys, vals = torch.cat([initial_state.k, k], 2), torch.cat([initial_state.v, v], 2)
            out = F.scaled_dot_product_attention(q, keys, vals, scale=self.scale, enable_gqa=gqa)
        else:
            keys, vals, key_seg = self._with_cache(initial_state, k, v, seg)
            idx = torch.arange(length, device=x.device)
            rel = idx[:, None] + cache_len - torch.arange(keys.shape[2], device=x.device)[None, :]
            allowed = (key_seg[:, None, :] == seg[:, :, None]) & (rel >= 0)[None]
            out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=allowed[:, None], scale=self.scale,
                                                 enable_gqa=gqa)
        y = self.o_proj(out.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim))
        if not return_final_state:
            return y
        new_pos = pos[:, -1] + 1
        n_keys = keys.shape[2]
        first = n_keys - int(new_pos.clamp(max=n_keys).max())  # entries no row can see again
        return y, AttentionState(k=keys[:, :, first:], v=vals[:, :, first:], pos=new_pos)

    def step(self, x_t: Tensor, state: AttentionState) -> tuple[Tensor, AttentionState]:
        """One token x_t: (batch, d_model) -> (y_t, cache with it appended). O(cache_len). The forward's
        arithmetic on one token without its segment bookkeeping (a mask only for rows whose segment started
        inside the cache)."""
        x_t = self.check_step_input(x_t)
        self.check_dtype(x_t, "x_t")
        batch = x_t.shape[0]
        st = self._check_cache(state, batch, self.act_dtype(x_t))
        cache_len = st.k.shape[2]
        lo, hi = (int(p) for p in st.pos.aminmax())  # the mask and the kept cache length depend on them
        q, k, v = to_compute(self, self.q_proj(x_t), self.k_proj(x_t), self.v_proj(x_t))
        if self.key_multiplier != 1.0:
            k = k * self.key_multiplier
        q = q.view(batch, self.n_heads, 1, self.head_dim)
        k = k.view(batch, self.n_kv_heads, 1, self.head_dim)
        v = v.view(batch, self.n_kv_heads, 1, self.head_dim)
        if self.rotary_dim:
            q, k = self._rotate(q, st.pos[:, None]), self._rotate(k, st.pos[:, None])
        keys, vals = torch.cat([st.k, k], 2), torch.cat([st.v, v], 2)
        mask = None
        if lo < cache_len:  # some row's segment started inside the cache: it sees only the entries since then
            j = torch.arange(cache_len, device=x_t.device)
            seen = j >= cache_len - st.pos.clamp(max=cache_len)[:, None]
            mask = torch.cat([seen, seen.new_ones(batch, 1)], 1)[:, None, None]
        out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=self.scale,
                                             enable_gqa=self.n_heads != self.n_kv_heads)
        y = self.o_proj(out.reshape(batch, self.n_heads * self.head_dim))
        n_keys = cache_len + 1
        first = n_keys - min(hi + 1, n_keys)  # entries no row can see again
        return y, AttentionState(k=keys[:, :, first:], v=vals[:, :, first:], pos=st.pos + 1)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, scale={self.scale}")
