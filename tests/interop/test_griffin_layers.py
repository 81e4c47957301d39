"""RecurrentGemma's layers: GriffinRecurrent against a plain per-token loop of Griffin's equations, LocalGQAttention
against ssmkit's own sliding-window Attention, and the layer contract (step == forward, state passing, packing)
for both, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.layers.attention import Attention
from ssmkit.layers.griffin import GriffinRecurrent
from ssmkit.layers.local_gqa import LocalGQAttention
from tests.layers.contract import assert_close, check_contract, random_reset

D = 8


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _perturb(layer: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in layer.state_dict().values():
            t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.3)
    return layer


def griffin_loop(layer: GriffinRecurrent, x: torch.Tensor, reset: torch.Tensor | None) -> torch.Tensor:
    """Griffin's recurrent block token by token, channel blocks as one block-diagonal matrix."""
    g = layer.rg_lru
    y_branch = F.gelu(layer.linear_y(x), approximate="tanh")
    u = layer.linear_x(x)
    w, k_max = layer.conv_1d.weight[:, 0, :], layer.conv_width - 1
    wi, wa = torch.block_diag(*g.input_gate_weight), torch.block_diag(*g.recurrent_gate_weight)
    out = torch.zeros_like(u)
    for b in range(x.shape[0]):
        start, h = 0, None
        for t in range(x.shape[1]):
            if reset is not None and reset[b, t]:
                start = t
            c = layer.conv_1d.bias + sum(w[:, k_max - k] * u[b, t - k] for k in range(k_max + 1) if t - k >= start)
            i = torch.sigmoid(c @ wi + g.input_gate_bias.flatten())
            a = torch.exp(-8.0 * torch.sigmoid(c @ wa + g.recurrent_gate_bias.flatten()) *
                          F.softplus(g.recurrent_param))
            h = i * c if t == start else a * h + torch.sqrt(1 - a ** 2) * i * c
            out[b, t] = h
    return layer.linear_out(out * y_branch)


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 2), length=st.integers(1, 9), conv=st.integers(1, 4), heads=st.sampled_from([1, 2, 3]),
       packed=st.booleans(), seed=st.integers(0, 999))
def test_griffin_matches_its_loop_oracle(batch, length, conv, heads, packed, seed):
    torch.manual_seed(seed)
    layer = _perturb(GriffinRecurrent(D, lru_width=6, n_heads=heads, conv_width=conv).double(), seed)
    x = _x(batch, length, D, seed=seed)
    reset = random_reset(batch, length, seed) if packed else None
    with torch.no_grad():
        assert_close(layer(x, reset=reset), griffin_loop(layer, x, reset), 1e-12, "Griffin vs loop")


@pytest.mark.parametrize("make", [
    lambda: GriffinRecurrent(D, lru_width=12, n_heads=3, conv_width=3),
    lambda: GriffinRecurrent(D, conv_width=1, act="silu"),
    lambda: LocalGQAttention(D, n_heads=4, n_kv_heads=1, rotary_dim=2, window=3, out_bias=True),
    lambda: LocalGQAttention(D, n_heads=2, window=1, qkv_bias=True),
], ids=["griffin", "griffin-width1", "local-mqa", "local-window1"])
def test_contract(make):
    torch.manual_seed(0)
    layer = _perturb(make().double(), 1)
    seqs = [_x(1, n, D, seed=n) for n in (3, 1, 6)]
    check_contract(layer, _x(2, 11, D, seed=2), 4, seqs)


@settings(max_examples=10, deadline=None)
@given(length=st.integers(1, 12), window=st.integers(1, 6), packed=st.booleans(), split=st.integers(0, 12),
       seed=st.integers(0, 999))
def test_local_attention_matches_sliding_attention(length, window, packed, split, seed):
    """With as many kv heads as heads and rotary on the whole head, LocalGQAttention is Attention(mask="sliding"),
    also through a KV cache (split) and with packed segments."""
    torch.manual_seed(seed)
    ours = _perturb(LocalGQAttention(D, n_heads=2, rotary_dim=4, window=window, qkv_bias=True, out_bias=True).double(),
                    seed)
    ref = Attention(D, n_heads=2, mask="sliding", window=window, rotary=True).double()
    with torch.no_grad():
        ref.qkv.weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.qkv.bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.load_state_dict(ours.o_proj.state_dict())
        x = _x(2, length, D, seed=seed)
        reset = random_reset(2, length, seed) if packed else None
        want = ref(x, reset=reset)
        assert_close(ours(x, reset=reset), want, 1e-12, "local vs sliding")
        t = min(split, length - 1)
        if t > 0:
            r1, r2 = (None, None) if reset is None else (reset[:, :t], reset[:, t:])
            y1, s = ours(x[:, :t], reset=r1, return_final_state=True)
            assert s.k.shape[2] <= window - 1
            assert_close(torch.cat([y1, ours(x[:, t:], s, reset=r2)], 1), want, 1e-12, "local split")


def test_bad_options_fail_in_one_line():
    with pytest.raises(ValueError, match=r"^GriffinRecurrent: n_heads=4 must divide lru_width=6$"):
        GriffinRecurrent(D, lru_width=6, n_heads=4)
    with pytest.raises(ValueError, match=r"^GriffinRecurrent: unknown act 'tanh'; expected one of"):
        GriffinRecurrent(D, act="tanh")
    with pytest.raises(ValueError, match=r"^LocalGQAttention: window must be a positive int, got 0$"):
        LocalGQAttention(D, window=0)


@settings(max_examples=12, deadline=None)
@given(length=st.integers(2, 10), width=st.integers(1, 4), attention=st.booleans(), seed=st.integers(0, 999))
def test_steps_after_a_packed_prefix(length, width, attention, seed):
    """Rows at different positions of their segments (some within conv_width - 1 or window - 1 of a start, some at
    one) step exactly as the forward runs them."""
    torch.manual_seed(seed)
    make = (lambda: LocalGQAttention(D, n_heads=2, n_kv_heads=1, rotary_dim=2, window=width + 1)) if attention \
        else (lambda: GriffinRecurrent(D, lru_width=6, n_heads=2, conv_width=width))
    layer = _perturb(make().double(), seed)
    x = _x(3, length + 3, D, seed=seed)
    reset = random_reset(3, length + 3, seed, p=0.4)
    reset[:, length:] = False
    reset[0, length - 1] = True  # row 0's next step is one token into a segment
    with torch.no_grad():
        want = layer(x, reset=reset)
        _, state = layer(x[:, :length], reset=reset[:, :length], return_final_state=True)
        steps = []
        for t in range(length, length + 3):
            y, state = layer.step(x[:, t], state)
            steps.append(y)
    assert_close(torch.stack(steps, 1), want[:, length:], 1e-12, f"{type(layer).__name__} steps after a prefix")


def test_gradients_stay_finite_when_the_decay_is_one():
    """softplus(Λ) = 0 in float32 gives a = 1 exactly: √(1 - a²) = 0 there, and its (discarded, at the segment
    start; otherwise large but finite) gradient must not turn into NaN."""
    layer = GriffinRecurrent(D, n_heads=2)
    with torch.no_grad():
        layer.rg_lru.recurrent_param.fill_(-200.0)
    x = torch.randn(2, 6, D, requires_grad=True)
    layer(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in layer.parameters())
