"""Mamba2: layer contract, heads/groups, chunk-size invariance, gated norm, reverse, init facts, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.layers import Mamba, Mamba2
from ssmkit.layers.mamba2 import GatedRMSNorm
from tests.layers.contract import (
    assert_close,
    check_gradcheck_with_state,
    check_reset_packing,
    check_split_state,
    check_split_with_reset,
    check_step_equivalence,
    random_reset,
)


def make(d_model: int = 4, dtype=torch.float64, seed: int = 0, **kw) -> Mamba2:
    """A small Mamba2 with all parameters randomised."""
    kw = {"d_state": 3, "headdim": 2, **kw}
    torch.manual_seed(seed)
    layer = Mamba2(d_model, **kw)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if name in ("A_log", "D", "dt_bias", "norm.weight") else 0.1))
    return layer.to(dtype).eval()


# ------------------------------------------------------------------------------------------ contract
@given(
    batch=st.integers(1, 3), length=st.integers(1, 20), d_conv=st.integers(1, 4),
    ngroups=st.sampled_from([1, 2, 4]), chunk_size=st.sampled_from([1, 3, 8, 64]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 10_000),
)
def test_step_equals_forward(batch, length, d_conv, ngroups, chunk_size, dtype, seed):
    layer = make(4, dtype, seed, d_conv=d_conv, ngroups=ngroups, chunk_size=chunk_size)
    check_step_equivalence(layer, torch.randn(batch, length, 4, dtype=dtype))


@given(length=st.integers(2, 20), data=st.data(), ngroups=st.sampled_from([1, 2]),
       seed=st.integers(0, 10_000))
def test_split_with_state_equals_whole(length, data, ngroups, seed):
    t = data.draw(st.integers(1, length - 1))
    layer = make(4, torch.float64, seed, ngroups=ngroups, chunk_size=4)
    check_split_state(layer, torch.randn(2, length, 4, dtype=torch.float64), t)


@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4), reverse=st.booleans(),
       seed=st.integers(0, 10_000))
def test_packed_with_reset_equals_separate(lengths, reverse, seed):
    layer = make(4, torch.float64, seed, ngroups=2, chunk_size=4, reverse=reverse)
    check_reset_packing(layer, [torch.randn(1, n, 4, dtype=torch.float64) for n in lengths])


@given(length=st.integers(2, 20), data=st.data(), seed=st.integers(0, 10_000))
def test_split_with_state_and_reset_equals_whole(length, data, seed):
    t = data.draw(st.integers(1, length - 1))
    layer = make(4, torch.float64, seed, chunk_size=4)
    x = torch.randn(2, length, 4, dtype=torch.float64)
    check_split_with_reset(layer, x, random_reset(2, length, seed, p=0.3), t, 1e-10, {"conv": 1e-12, "ssm": 1e-10})


def test_chunk_size_does_not_change_the_function():
    base = make(4, torch.float64, 4, ngroups=2)
    x = torch.randn(2, 37, 4, dtype=torch.float64)
    reset = random_reset(2, 37, 4, p=0.1)
    with torch.no_grad():
        y_ref, s_ref = base(x, reset=reset, return_final_state=True)
        for Q in (1, 5, 16):
            base.chunk_size = Q
            y, s = base(x, reset=reset, return_final_state=True)
            assert_close(y, y_ref, 1e-10, f"chunk_size={Q}")
            assert_close(s.ssm, s_ref.ssm, 1e-10, f"chunk_size={Q} state")


@pytest.mark.parametrize("ngroups", [1, 2])
def test_gradcheck_tiny_float64(ngroups):
    layer = make(4, torch.float64, 3, ngroups=ngroups, chunk_size=2)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    s0 = layer.init_state(2).map(torch.randn_like)
    reset = torch.tensor([[False, False, True, False, False], [False, False, False, False, True]])
    check_gradcheck_with_state(layer, x, s0, reset=reset, eps=1e-6, atol=1e-6, fast_mode=True)


# ------------------------------------------------------------------------------------------ pieces
def test_gated_rmsnorm_normalises_each_group_of_y_times_silu_z():
    torch.manual_seed(0)
    norm = GatedRMSNorm(6, group_size=3, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6))
    y, z = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    g = y * z * torch.sigmoid(z)
    want = torch.cat([gi / (gi.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() for gi in g.split(3, -1)], -1)
    assert_close(norm(y, z), want * norm.weight, 1e-12, "gated rmsnorm")


def test_ssm_matches_direct_recurrence():
    """The scan inside the block against a hand-written per-token recurrence from the raw parameters."""
    layer = make(4, torch.float64, 6, ngroups=2, d_conv=1, chunk_size=3)
    x = torch.randn(1, 7, 4, dtype=torch.float64)
    H, P, G, N = layer.nheads, layer.headdim, layer.ngroups, layer.d_state
    with torch.no_grad():
        z, xBC, dt = layer.in_proj(x).split([layer.d_inner, layer.conv_dim, H], -1)
        xBC = F.silu(xBC * layer.conv1d.weight[:, 0, 0] + layer.conv1d.bias)
        xs, B, C = xBC.split([layer.d_inner, G * N, G * N], -1)
        dt = F.softplus(dt + layer.dt_bias)
        A = -torch.exp(layer.A_log)
        h = torch.zeros(H, P, N, dtype=torch.float64)
        ys = []
        for t in range(7):
            xt = xs[0, t].view(H, P)
            Bt = B[0, t].view(G, N).repeat_interleave(H // G, 0)
            Ct = C[0, t].view(G, N).repeat_interleave(H // G, 0)
            decay = torch.exp(dt[0, t] * A)[:, None, None]
            h = decay * h + dt[0, t][:, None, None] * xt[..., None] * Bt[:, None]
            ys.append(((h * Ct[:, None]).sum(-1) + layer.D[:, None] * xt).reshape(-1))
        y = torch.stack(ys)[None]
        want = layer.out_proj(layer.norm(y, z))
        assert_close(layer(x), want, 1e-10, "block vs direct recurrence")


# ------------------------------------------------------------------------------------------ reverse
def test_reverse_equals_flipped_forward_and_steps_from_the_end():
    fwd = make(4, torch.float64, 7, ngroups=2)
    rev = Mamba2(4, d_state=3, headdim=2, ngroups=2, reverse=True).double()
    rev.load_state_dict(fwd.state_dict())
    x = torch.randn(2, 9, 4, dtype=torch.float64)
    with torch.no_grad():
        y = rev(x)
        assert_close(y, fwd(x.flip(1)).flip(1), 1e-12, "reverse = flip . forward . flip")
        assert (y - fwd(x)).abs().max() > 1e-3
        s, ys = rev.init_state(2), []
        for t in reversed(range(9)):
            yt, s = rev.step(x[:, t], s)
            ys.append(yt)
    assert_close(torch.stack(ys[::-1], 1), y, 1e-10, "reverse step from the end")


@given(length=st.integers(2, 16), data=st.data(), seed=st.integers(0, 10_000))
def test_reverse_split_with_state_and_reset_equals_whole(length, data, seed):
    """Right to left with resets: a segment start exactly at the split (row 0) stops the carried state."""
    t = data.draw(st.integers(1, length - 1))
    layer = make(4, torch.float64, seed, ngroups=2, chunk_size=3, reverse=True)
    x = torch.randn(2, length, 4, dtype=torch.float64)
    reset = random_reset(2, length, seed, p=0.3)
    reset[0, t] = True
    with torch.no_grad():
        y, s = layer(x, reset=reset, return_final_state=True)
        y2, s2 = layer(x[:, t:], reset=reset[:, t:], return_final_state=True)
        y1, s1 = layer(x[:, :t], s2, reset=reset[:, :t], return_final_state=True)
    assert_close(torch.cat([y1, y2], 1), y, 1e-10, "reverse split with reset")
    assert_close(s1.conv, s.conv, 1e-12, "conv state")
    assert_close(s1.ssm, s.ssm, 1e-10, "ssm state")


# ------------------------------------------------------------------------------------------ init, sizes
def test_init_follows_mamba2():
    torch.manual_seed(0)
    layer = Mamba2(64, d_state=16, headdim=16, ngroups=2)
    H = 8
    assert layer.nheads == H and layer.d_inner == 128 and layer.conv_dim == 128 + 2 * 2 * 16
    assert_close(layer.A_log, torch.log(torch.arange(1.0, H + 1)), 0, "A_log")
    assert torch.all(layer.D == 1) and torch.all(layer.norm.weight == 1)
    dt = F.softplus(layer.dt_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert layer.in_proj.weight.shape == (2 * 128 + 2 * 2 * 16 + H, 64)
    assert layer.conv1d.weight.shape == (layer.conv_dim, 1, 4)
    assert layer.norm.group_size == 64


@pytest.mark.parametrize(
    "d_model, headdim", [(1, 2), (3, 6), (4, 8), (24, 48), (32, 64), (48, 48), (40, 40), (768, 64)]
)
def test_default_headdim_divides_d_inner(d_model, headdim):
    layer = Mamba2(d_model, d_state=4)
    assert layer.headdim == headdim and layer.nheads * layer.headdim == layer.d_inner
    y = layer(torch.randn(1, 3, d_model))
    assert y.shape == (1, 3, d_model)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_errors():
    layer = make(4, torch.float32)
    with pytest.raises(ValueError, match="d_model=4"):
        layer(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="d_model=4"):
        layer.step(torch.randn(2, 5), layer.init_state(2))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(2, 5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="batch_size=2"):
        layer(torch.randn(2, 5, 4), layer.init_state(1))
    with pytest.raises(ValueError, match="state.conv"):
        layer.step(torch.randn(2, 4), make(4, torch.float32, ngroups=2).init_state(2))
    with pytest.raises(TypeError, match="Mamba2State"):
        layer(torch.randn(2, 5, 4), Mamba(4).init_state(2))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(d_model=4, headdim=3), "headdim=3 must divide d_inner"),
        (dict(d_model=4, headdim=2, ngroups=3), "ngroups=3 must divide nheads"),
        (dict(d_model=4, chunk_size=0), "chunk_size"),
        (dict(d_model=4, dt_limit=(0.5, 0.1)), "dt_limit"),
        (dict(d_model=4, expand=0.3), "expand"),
    ],
)
def test_bad_constructor_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        Mamba2(**kw)
