"""Multi-head softmax attention for hybrids: causal, prefix-LM and sliding-window masks, and a KV cache.

The state is the KV cache, so forward-with-state, ``step`` and packing (``reset``) follow the same contract as
the recurrent layers: splitting a sequence and passing the cache equals running it whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerState, SequenceLayer, check_choice, check_d_model, state_kwargs, to_compute
from .bidirectional import check_prefix_mask

MASKS = ("causal", "prefix", "sliding")


@dataclass
class AttentionState(LayerState):
    """The KV cache.

    k, v: (batch, n_heads, cache_len, head_dim): the most recent tokens' keys (already rotated when rotary)
        and values, oldest first.
    pos: (batch,) int64: how many tokens of the current segment came so far, i.e. the next token's position
        (for rotary embeddings). Only the last min(pos, cache_len) entries belong to the current segment and
        stay visible; older ones (from before a reset) are masked out.
    """

    k: Tensor
    v: Tensor
    pos: Tensor


def segments_and_positions(batch: int, length: int, reset: Tensor | None, initial_state: AttentionState | None,
                           device: torch.device) -> tuple[Tensor, Tensor]:
    """(segment ids, positions), both (batch, length) int64: a reset at t starts a new segment at position 0;
    without one, positions continue from ``initial_state.pos``."""
    idx = torch.arange(length, device=device)
    pos0 = torch.zeros(batch, 1, dtype=torch.long, device=device) if initial_state is None \
        else initial_state.pos[:, None]
    if reset is None:
        return torch.zeros(batch, length, dtype=torch.long, device=device), pos0 + idx
    start = torch.where(reset, idx, -1).cummax(1).values
    return reset.long().cumsum(1), torch.where(start >= 0, idx - start, pos0 + idx)


def _default_heads(d_model: int) -> int:
    """The largest n <= max(1, d_model // 64) that divides d_model (head_dim about 64 or more)."""
    n = max(1, d_model // 64)
    while d_model % n:
        n -= 1
    return n


def _opt_positive_int(owner: str, name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int or None, got {value!r}")
    return value


class Attention(SequenceLayer):
    """Multi-head attention (fused QKV projection, output projection) on ``scaled_dot_product_attention``.

    Masks (``mask``):
      * "causal": query t sees keys <= t.
      * "prefix": prefix-LM. ``forward`` takes ``prefix_mask`` (batch, length) bool, True on prefix tokens
        (contiguous at the start of each segment); every query also sees all prefix keys of its segment, so
        the prefix is bidirectional. No ``prefix_mask`` means fully causal. ``step`` continues causally.
      * "sliding": query t sees the last ``window`` keys, t - window < s <= t (itself included).
    ``reset`` (batch, length) bool marks segment starts: no attention across segments (block-diagonal).

    State: the KV cache (:class:`AttentionState`). ``init_state`` is empty; ``forward(x, state)`` and ``step``
    append to it; for "sliding" only the last ``window`` entries are kept (bounded memory). Rotary positions
    restart at each segment start and continue across state passing (the cache tracks the position).

    Args:
        d_model: model width.
        n_heads: number of heads; default the largest n <= max(1, d_model // 64) dividing d_model.
        mask: "causal", "prefix" or "sliding".
        window: the sliding-window size W (required for, and only for, mask="sliding").
        rotary: apply rotary position embeddings to queries and keys (head_dim must be even).
        rotary_base: the rotary frequency base.
        max_cache: when set, the most tokens a query may attend over (cached + new, for causal/prefix); a
            longer sequence raises ValueError. For "sliding" the cache never exceeds ``window``, which must
            then be <= max_cache.
        bias: biases in the projections.

    Shapes: x (batch, length, d_model) -> y (batch, length, d_model).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int | None = None,
        mask: str = "causal",
        window: int | None = None,
        rotary: bool = False,
        rotary_base: float = 10000.0,
        max_cache: int | None = None,
        *,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.d_model = check_d_model(name, d_model)
        n_heads = _default_heads(d_model) if n_heads is None else n_heads
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1 or d_model % n_heads:
            raise ValueError(
                f"{name}: n_heads must be a positive int dividing d_model={d_model}, got {n_heads!r}"
            )
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.mask = check_choice(name, "mask", mask, MASKS)
        self.window = _opt_positive_int(name, "window", window)
        if (self.window is None) != (self.mask != "sliding"):
            raise ValueError(
                f"{name}: window must be a positive int when mask='sliding' and None otherwise, got "
                f"window={window!r} with mask={mask!r}"
            )
        if not isinstance(rotary, bool):
            raise TypeError(f"{name}: rotary must be a bool, got {type(rotary).__name__}")
        if rotary and self.head_dim % 2:
            raise ValueError(
                f"{name}: rotary needs an even head_dim, got head_dim={self.head_dim} "
                f"(d_model={d_model}, n_heads={n_heads})"
            )
        if isinstance(rotary_base, bool) or not isinstance(rotary_base, (int, float)) or not rotary_base > 1:
            raise ValueError(f"{name}: rotary_base must be a number > 1, got {rotary_base!r}")
        self.rotary, self.rotary_base = rotary, float(rotary_base)
        self.max_cache = _opt_positive_int(name, "max_cache", max_cache)
        if self.max_cache is not None and self.window is not None and self.window > self.max_cache:
            raise ValueError(
                f"{name}: window={self.window} exceeds max_cache={self.max_cache}; the sliding cache "
                f"holds window entries"
            )
        if not isinstance(bias, bool):
            raise TypeError(f"{name}: bias must be a bool, got {type(bias).__name__}")
        kw = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias, **kw)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, **kw)

    # ------------------------------------------------------------------------------------------ state
    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> AttentionState:
        """An empty KV cache for ``batch_size`` sequences."""
        dt, device = dtype or self.param_dtype, self.param_device  # qkv may be int8/int4/W8A8: no .weight
        kv = torch.zeros(batch_size, self.n_heads, 0, self.head_dim, dtype=dt, device=device)
        return AttentionState(
            k=kv,
            v=kv.clone(),
            pos=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    def check_state(self, state: object, batch_size: int, dtype: torch.dtype | None = None) -> AttentionState:
        """A KV cache from this kind of layer for ``batch_size`` sequences (any cache length)."""
        name = type(self).__name__
        if not isinstance(state, AttentionState):
            raise TypeError(
                f"{name}: state must be an AttentionState (from {name}.init_state or a {name} "
                f"forward), got {type(state).__name__}"
            )
        want = (batch_size, self.n_heads, state.k.shape[2] if state.k.ndim == 4 else -1, self.head_dim)
        for field in ("k", "v"):
            t = getattr(state, field)
            if tuple(t.shape) != want:
                raise ValueError(
                    f"{name}: state.{field} must have shape (batch={batch_size}, n_heads={self.n_heads}, "
                    f"cache_len, head_dim={self.head_dim}), got {tuple(t.shape)}; was this state "
                    f"made by another layer or batch size?"
                )
        if (
            state.pos.dtype != torch.long
            or tuple(state.pos.shape) != (batch_size,)
            or bool((state.pos < 0).any())
        ):
            raise ValueError(
                f"{name}: state.pos must be non-negative int64 of shape ({batch_size},), got "
                f"{tuple(state.pos.shape)} {state.pos.dtype}"
            )
        if dtype is not None and (state.k.dtype != dtype or state.v.dtype != dtype):
            raise TypeError(
                f"{name}: the cache has dtype {state.k.dtype}/{state.v.dtype} but the input is {dtype}"
            )
        return state

    # ------------------------------------------------------------------------------------------ rotary
    def _rotate(self, t: Tensor, pos: Tensor) -> Tensor:
        """Rotary embedding: t (batch, heads, length, head_dim), pos (batch, length) int -> rotated t.

        Channel pairs (j, j + head_dim/2) rotate by angle pos * base^(-2j/head_dim).
        """
        half = self.head_dim // 2
        cdt = torch.float64 if t.dtype == torch.float64 else torch.float32
        inv_freq = self.rotary_base ** (-torch.arange(half, dtype=cdt, device=t.device) * 2 / self.head_dim)
        ang = pos.to(cdt)[:, None, :, None] * inv_freq
        cos, sin = torch.cos(ang).to(t.dtype), torch.sin(ang).to(t.dtype)
        t1, t2 = t[..., :half], t[..., half:]
        return torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos], dim=-1)

    # ------------------------------------------------------------------------------------------ forward
    @state_kwargs
    def forward(
        self,
        x: Tensor,
        initial_state: AttentionState | None = None,
        *,
        reset: Tensor | None = None,
        prefix_mask: Tensor | None = None,
        return_final_state: bool = False,
    ):
        """x: (batch, length, d_model) -> y (batch, length, d_model), or (y, final state) if
        ``return_final_state``.

        initial_state: a KV cache to continue from. reset: (batch, length) bool segment starts. prefix_mask:
        (batch, length) bool, True on prefix tokens (mask="prefix" only; with an initial_state, the tokens
        continuing the cache's segment must be suffix tokens).
        """
        name = type(self).__name__
        x = self.check_input(x)
        self.check_dtype(x)
        reset = self.check_reset(reset, x)
        if prefix_mask is not None and self.mask != "prefix":
            raise ValueError(
                f"{name}: prefix_mask is only accepted with mask='prefix', this layer has mask={self.mask!r}"
            )
        prefix = check_prefix_mask(name, prefix_mask, x, reset, initial_state is not None)
        batch, length, _ = x.shape
        if initial_state is not None:
            initial_state = self.check_state(initial_state, batch, dtype=self.act_dtype(x))
        cache_len = 0 if initial_state is None else initial_state.k.shape[2]
        if self.max_cache is not None and self.window is None and cache_len + length > self.max_cache:
            raise ValueError(
                f"{name}: {cache_len} cached + {length} new tokens exceed max_cache={self.max_cache}"
            )

        # under autocast q, k, v (and the cache) are float32; the attention itself runs in autocast's dtype
        qkv = to_compute(self, self.qkv(x))
        q, k, v = qkv.view(batch, length, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        seg, pos = segments_and_positions(batch, length, reset, initial_state, x.device)
        if self.rotary:
            q, k = self._rotate(q, pos), self._rotate(k, pos)

        keys, vals = k, v
        if initial_state is None and reset is None and prefix is None and self.mask != "sliding":
            # plain causal attention over a fresh sequence: no explicit mask needed
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            key_seg = seg
            if initial_state is not None:  # cache entries continue segment 0; older ones get -1, match no query
                keys, vals = torch.cat([initial_state.k, k], 2), torch.cat([initial_state.v, v], 2)
                cached = torch.arange(cache_len, device=x.device)[None, :]
                current = cached >= cache_len - initial_state.pos.clamp(max=cache_len)[:, None]
                key_seg = torch.cat([current.long() - 1, seg], 1)
            allowed = self._allowed(seg, key_seg, prefix, cache_len)
            out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=allowed[:, None])
        y = self.out_proj(out.transpose(1, 2).reshape(batch, length, self.d_model))
        if not return_final_state:
            return y
        new_pos = pos[:, -1] + 1
        n_keys = keys.shape[2]
        first = n_keys - int(new_pos.clamp(max=n_keys).max())  # drop entries no row can see again
        if self.window is not None:
            first = max(first, n_keys - self.window)
        return y, AttentionState(k=keys[:, :, first:], v=vals[:, :, first:], pos=new_pos)

    def _allowed(self, seg: Tensor, key_seg: Tensor, prefix: Tensor | None, cache_len: int) -> Tensor:
        """Bool (batch, length, cache_len + length): query i (at index cache_len + i) may see key j."""
        length, n_keys = seg.shape[1], key_seg.shape[1]
        rel = (
            torch.arange(length, device=seg.device)[:, None]
            + cache_len
            - torch.arange(n_keys, device=seg.device)[None, :]
        )
        allowed = key_seg[:, None, :] == seg[:, :, None]
        if self.window is not None:
            return allowed & ((rel >= 0) & (rel < self.window))
        visible = (rel >= 0)[None]
        if prefix is not None:
            key_prefix = torch.cat([torch.zeros_like(key_seg[:, :cache_len], dtype=torch.bool), prefix], 1)
            visible = visible | key_prefix[:, None, :]
        return allowed & visible

    def step(self, x_t: Tensor, state: AttentionState) -> tuple[Tensor, AttentionState]:
        """One token x_t: (batch, d_model) -> (y_t, cache with it appended). Causal, O(cache_len)."""
        x_t = self.check_step_input(x_t)
        y, state = self.forward(x_t.unsqueeze(1), state, return_final_state=True)
        return y.squeeze(1), state

    def extra_repr(self) -> str:
        extra = f", window={self.window}" if self.window is not None else ""
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, mask={self.mask!r}{extra}, "
            f"rotary={self.rotary}, max_cache={self.max_cache}"
        )
