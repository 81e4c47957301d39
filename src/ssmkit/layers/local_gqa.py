"""Sliding-window (local) grouped-query attention: :class:`~ssmkit.layers.gqa.GQAttention` whose queries see only
the last ``window`` keys of their segment (themselves included), with a KV cache of at most window - 1 entries.
Griffin's / RecurrentGemma's local MQA (n_kv_heads=1, partial rotary, o_proj bias) is one configuration.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import AttentionState
from .base import state_kwargs, to_compute
from .ffn import check_positive_int
from .gqa import GQAttention


class LocalGQAttention(GQAttention):
    """GQAttention with a sliding window: query t sees keys s of its segment with t - window < s <= t.

    Args:
        window: the number of keys a query sees (itself included); default 2048 (RecurrentGemma's).
        The others as :class:`~ssmkit.layers.gqa.GQAttention`.

    Shapes: x (batch, length, d_model) -> y (batch, length, d_model); state an AttentionState whose cache holds
    at most window - 1 entries (bounded memory however long the sequence).
    """

    def __init__(self, d_model: int, n_heads: int = 1, n_kv_heads: int | None = None, head_dim: int | None = None,
                 rotary_dim: int = 0, rotary_base: float = 10000.0, scale: float | None = None, *, window: int = 2048,
                 qkv_bias: bool = False, out_bias: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, rotary_dim, rotary_base, scale, qkv_bias=qkv_bias,
                         out_bias=out_bias, device=device, dtype=dtype)
        self.window = check_positive_int(type(self).__name__, "window", window)

    @state_kwargs
    def forward(self, x: Tensor, initial_state: AttentionState | None = None, *, reset: Tensor | None = None,
                return_final_state: bool = False):
        """x: (batch, length, d_model) -> y, or (y, KV cache) with ``return_final_state``.

        initial_state: a KV cache to continue from; reset: (batch, length) bool segment starts."""
        x, reset, initial_state, q, k, v, seg, pos = self._heads(x, initial_state, reset)
        batch, length, _ = x.shape
        cache_len = 0 if initial_state is None else initial_state.k.shape[2]
        keys, vals, key_seg = self._with_cache(initial_state, k, v, seg)
        gqa = self.n_heads != self.n_kv_heads
        if initial_state is None and reset is None and length <= self.window:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        elif reset is None and length == 1 and cache_len < self.window and bool((initial_state.pos >= cache_len).all()):
            # one new token whose row sees its whole cache (plain decoding): no mask needed
            out = F.scaled_dot_product_attention(q, keys, vals, scale=self.scale, enable_gqa=gqa)
        else:
            rel = torch.arange(length, device=x.device)[:, None] + cache_len - \
                torch.arange(keys.shape[2], device=x.device)[None, :]
            allowed = (key_seg[:, None, :] == seg[:, :, None]) & ((rel >= 0) & (rel < self.window))[None]
            out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=allowed[:, None], scale=self.scale,
                                                 enable_gqa=gqa)
        y = self.o_proj(out.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim))
        if not return_final_state:
            return y
        new_pos = pos[:, -1] + 1
        n_keys = keys.shape[2]
        keep = min(int(new_pos.clamp(max=n_keys).max()), self.window - 1)  # entries a later query can still see
        return y, AttentionState(k=keys[:, :, n_keys - keep:], v=vals[:, :, n_keys - keep:], pos=new_pos)

    def _rotate(self, t: Tensor, pos: Tensor) -> Tensor:
        """GQAttention's rotary embedding, with the inverse frequencies kept per (dtype, device) instead of
        recomputed on every decoding step."""
        r = self.rotary_dim
        cdt = torch.promote_types(t.dtype, torch.float32)
        cache = self.__dict__.setdefault("_inv_freq", {})
        key = (cdt, t.device, r, self.rotary_base)
        if key not in cache:
            cache.clear()
            cache[key] = self.rotary_base ** (-torch.arange(0, r, 2, dtype=cdt, device=t.device) / r)
        ang = pos.to(cdt)[:, None, :, None] * cache[key]
        cos, sin = torch.cos(ang).to(t.dtype), torch.sin(ang).to(t.dtype)
        half = r // 2
        t1, t2, rest = t[..., :half], t[..., half:r], t[..., r:]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin, rest], dim=-1)

    def step(self, x_t: Tensor, state: AttentionState) -> tuple[Tensor, AttentionState]:
        """One token x_t: (batch, d_model) -> (y_t, cache with it appended, at most window - 1 entries); the
        forward's arithmetic without its segment bookkeeping."""
        x_t = self.check_step_input(x_t)
        self.check_dtype(x_t, "x_t")
        batch = x_t.shape[0]
        st = self._check_cache(state, batch, self.act_dtype(x_t))
        q, k, v = to_compute(self, self.q_proj(x_t), self.k_proj(x_t), self.v_proj(x_t))
        q = q.view(batch, self.n_heads, 1, self.head_dim)
        k = k.view(batch, self.n_kv_heads, 1, self.head_dim)
        v = v.view(batch, self.n_kv_heads, 1, self.head_dim)
        if self.rotary_dim:
            q, k = self._rotate(q, st.pos[:, None]), self._rotate(k, st.pos[:, None])
        cache_len = st.k.shape[2]
        keys, vals = torch.cat([st.k, k], 2), torch.cat([st.v, v], 2)
        lo, hi = st.pos.aminmax()
        lo, hi = int(lo), int(hi)  # one sync each: the mask and the cache length below depend on them
        mask = None
        if cache_len >= self.window or lo < cache_len:  # some cached entry is out of the window or the segment
            j = torch.arange(cache_len, device=x_t.device)
            seen = (j >= cache_len - st.pos.clamp(max=cache_len)[:, None]) & (cache_len - j < self.window)
            mask = torch.cat([seen, torch.ones(batch, 1, dtype=torch.bool, device=x_t.device)], 1)[:, None, None]
        out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=self.scale,
                                             enable_gqa=self.n_heads != self.n_kv_heads)
        y = self.o_proj(out.reshape(batch, self.n_heads * self.head_dim))
        keep = min(hi + 1, cache_len + 1, self.window - 1)
        n_keys = cache_len + 1
        return y, AttentionState(k=keys[:, :, n_keys - keep:], v=vals[:, :, n_keys - keep:], pos=st.pos + 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}"
