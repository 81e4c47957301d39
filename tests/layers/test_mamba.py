"""Mamba and the shared short conv: layer contract, reverse, resets in the conv, init facts, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.layers import Mamba, Mamba2
from ssmkit.layers.mamba import MambaState
from ssmkit.layers.short_conv import ShortConv, short_conv
from ssmkit.ops import fused_kernels
from tests.layers.contract import (
    assert_close,
    check_gradcheck_with_state,
    check_reset_packing,
    check_split_state,
    check_split_with_reset,
    check_step_equivalence,
    random_reset,
)


def make(d_model: int = 6, dtype=torch.float64, seed: int = 0, **kw) -> Mamba:
    """A Mamba with all parameters randomised (so no weight sits at a symmetric default)."""
    torch.manual_seed(seed)
    layer = Mamba(d_model, **kw)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if name in ("A_log", "D", "dt_proj.bias") else 0.1))
    return layer.to(dtype).eval()


# ------------------------------------------------------------------------------------------ short conv
def conv_loop(x, w, b, state=None, reset=None):
    """y_t = b + sum_j w[:, W-1-j] x_{t-j}; taps stop at the latest segment start; before 0 they read
    ``state``."""
    batch, length, _ = x.shape
    W = w.shape[1]
    y = torch.zeros_like(x)
    for n in range(batch):
        start = -(W - 1) if state is not None else 0
        for t in range(length):
            if reset is not None and reset[n, t]:
                start = t
            acc = b.clone()
            for j in range(W):
                src = t - j
                if src < start:
                    break
                acc = acc + w[:, W - 1 - j] * (x[n, src] if src >= 0 else state[n, :, W - 1 + src])
            y[n, t] = acc
    return y


@given(
    batch=st.integers(1, 3), length=st.integers(1, 12), width=st.integers(1, 5), with_state=st.booleans(),
    with_reset=st.booleans(), seed=st.integers(0, 10_000),
)
def test_short_conv_matches_loop(batch, length, width, with_state, with_reset, seed):
    g = torch.Generator().manual_seed(seed)
    C = 3
    x = torch.randn(batch, length, C, generator=g, dtype=torch.float64)
    w = torch.randn(C, width, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    state = torch.randn(batch, C, width - 1, generator=g, dtype=torch.float64) if with_state else None
    reset = random_reset(batch, length, seed) if with_reset else None
    y, _ = short_conv(x, w, b, initial_state=state, reset=reset)
    assert_close(y, conv_loop(x, w, b, state, reset), 1e-12, "short_conv vs loop")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width", [2, 4])
def test_short_conv_fused_kernel_matches_torch_path_with_grads(dtype, width):
    """The numba kernel (forward and backward) against the plain PyTorch taps, with state and resets."""
    g = torch.Generator().manual_seed(width)
    leaves = [torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
              for shape in ((2, 150, 5), (5, width), (5,), (2, 5, width - 1))]
    reset = random_reset(2, 150, width, p=0.1)
    gy = torch.randn(2, 150, 5, generator=g, dtype=torch.float64).to(dtype)
    results = []
    for fused in (True, False):
        with fused_kernels(fused):
            x, w, b, s = leaves
            y, state = short_conv(x, w, b, initial_state=s, reset=reset)
            grads = torch.autograd.grad((y * gy).sum() + state.pow(2).sum(), leaves)
        results.append((y, state, *grads))
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    for name, a, b in zip(("y", "state", "dx", "dw", "dbias", "dstate"), *results, strict=True):
        assert_close(a, b, rtol, f"fused vs torch {name}")


def test_short_conv_without_reset_equals_conv1d():
    torch.manual_seed(0)
    conv = ShortConv(5, 4)
    ref = torch.nn.Conv1d(5, 5, 4, groups=5, padding=3)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(2, 9, 5)
    y, state = conv(x)
    assert_close(y, ref(x.transpose(1, 2))[..., :9].transpose(1, 2), 1e-6, "vs nn.Conv1d")
    assert_close(state, x[:, -3:].transpose(1, 2), 0, "state is the last width-1 inputs")


def test_short_conv_state_drops_inputs_before_the_last_segment_start():
    x = torch.arange(1.0, 7.0).reshape(1, 6, 1)
    reset = torch.tensor([[False, False, False, False, True, False]])
    _, state = short_conv(x, torch.ones(1, 4), None, reset=reset)
    assert state.flatten().tolist() == [0.0, 5.0, 6.0]


def test_short_conv_reverse_is_flipped_causal_conv():
    torch.manual_seed(1)
    x, w, b = torch.randn(2, 7, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), None
    y, _ = short_conv(x, w, b, reverse=True)
    yc, _ = short_conv(x.flip(1), w, b)
    assert_close(y, yc.flip(1), 1e-12, "reverse conv")


@given(length=st.integers(2, 12), data=st.data(), width=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_short_conv_reverse_split_with_state_and_reset(length, data, width, seed):
    """Right to left: the right chunk first, its state into the left chunk; a segment start at the split
    point (forced in row 0) must stop the state."""
    t = data.draw(st.integers(1, length - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, length, 3, generator=g, dtype=torch.float64)
    w = torch.randn(3, width, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    reset = random_reset(2, length, seed)
    reset[0, t] = True
    y, s = short_conv(x, w, b, reset=reset, reverse=True)
    y_right, s_right = short_conv(x[:, t:], w, b, reset=reset[:, t:], reverse=True)
    y_left, s_left = short_conv(x[:, :t], w, b, initial_state=s_right, reset=reset[:, :t], reverse=True)
    assert_close(torch.cat([y_left, y_right], 1), y, 1e-12, "reverse split")
    assert_close(s_left, s, 1e-12, "reverse state")


def test_short_conv_bad_input():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="weight"):
        short_conv(x, torch.randn(4, 3))
    with pytest.raises(ValueError, match="state"):
        short_conv(x, torch.randn(3, 4), initial_state=torch.zeros(2, 3, 2))
    with pytest.raises(TypeError, match="dtype"):
        short_conv(x, torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="reset"):
        short_conv(x, torch.randn(3, 4), reset=torch.zeros(2, 5))


# ------------------------------------------------------------------------------------------ contract
@given(
    batch=st.integers(1, 3), length=st.integers(1, 24), d_conv=st.integers(1, 4), d_state=st.integers(1, 5),
    bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 10_000),
)
def test_step_equals_forward(batch, length, d_conv, d_state, bias, dtype, seed):
    layer = make(5, dtype, seed, d_conv=d_conv, d_state=d_state, bias=bias, conv_bias=not bias)
    x = torch.randn(batch, length, 5, dtype=dtype)
    check_step_equivalence(layer, x)


@given(length=st.integers(2, 24), data=st.data(), seed=st.integers(0, 10_000))
def test_split_with_state_equals_whole(length, data, seed):
    t = data.draw(st.integers(1, length - 1))
    layer = make(4, torch.float64, seed, d_state=3)
    x = torch.randn(2, length, 4, dtype=torch.float64)
    check_split_state(layer, x, t)


@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4), reverse=st.booleans(),
       seed=st.integers(0, 10_000))
def test_packed_with_reset_equals_separate(lengths, reverse, seed):
    layer = make(4, torch.float64, seed, d_state=3, reverse=reverse)
    check_reset_packing(layer, [torch.randn(1, n, 4, dtype=torch.float64) for n in lengths])


@given(length=st.integers(2, 20), data=st.data(), seed=st.integers(0, 10_000))
def test_split_with_state_and_reset_equals_whole(length, data, seed):
    """State passing across a split carries the conv window and honours resets on both sides of it."""
    t = data.draw(st.integers(1, length - 1))
    layer = make(4, torch.float64, seed, d_state=3)
    x = torch.randn(2, length, 4, dtype=torch.float64)
    check_split_with_reset(layer, x, random_reset(2, length, seed, p=0.3), t, 1e-10, {"conv": 1e-12, "ssm": 1e-10})


def test_gradcheck_tiny_float64():
    layer = make(4, torch.float64, 3, d_state=3)
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    s0 = layer.init_state(2).map(torch.randn_like)
    reset = torch.zeros(2, 6, dtype=torch.bool)
    reset[0, 3] = reset[1, 1] = True
    check_gradcheck_with_state(layer, x, s0, reset=reset, eps=1e-6, atol=1e-6)


def test_step_is_differentiable_and_matches_forward_grads():
    layer = make(4, torch.float64, 5, d_state=2)
    x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    g_fwd = torch.autograd.grad(layer(x).pow(2).sum(), x)[0]
    s, ys = layer.init_state(1), []
    for t in range(5):
        yt, s = layer.step(x[:, t], s)
        ys.append(yt)
    g_step = torch.autograd.grad(torch.stack(ys, 1).pow(2).sum(), x)[0]
    assert_close(g_step, g_fwd, 1e-10, "grad through step")


# ------------------------------------------------------------------------------------------ reverse
def test_reverse_equals_flipped_forward():
    fwd = make(5, torch.float64, 7)
    rev = Mamba(5, reverse=True).to(torch.float64)
    rev.load_state_dict(fwd.state_dict())
    x = torch.randn(2, 11, 5, dtype=torch.float64)
    with torch.no_grad():
        assert_close(rev(x), fwd(x.flip(1)).flip(1), 1e-12, "reverse = flip . forward . flip")
        assert (rev(x) - fwd(x)).abs().max() > 1e-3  # reversing actually changes the output


def test_reverse_split_and_step_run_right_to_left():
    layer = make(4, torch.float64, 8, reverse=True)
    x = torch.randn(2, 10, 4, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        y_right, s = layer(x[:, 6:], return_final_state=True)  # the right part first, its state flows leftwards
        y_left = layer(x[:, :6], s)
        assert_close(torch.cat([y_left, y_right], 1), y, 1e-10, "reverse split")
        s, ys = layer.init_state(2), []
        for t in reversed(range(10)):
            yt, s = layer.step(x[:, t], s)
            ys.append(yt)
    assert_close(torch.stack(ys[::-1], 1), y, 1e-10, "reverse step from the end")


@given(length=st.integers(2, 16), data=st.data(), seed=st.integers(0, 10_000))
def test_reverse_split_with_state_and_reset_equals_whole(length, data, seed):
    """Right to left with resets: a segment start exactly at the split (row 0) stops the carried state."""
    t = data.draw(st.integers(1, length - 1))
    layer = make(4, torch.float64, seed, d_state=3, reverse=True)
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


def test_reverse_honours_segments_within_a_row():
    layer = make(4, torch.float64, 9, reverse=True)
    a, b = torch.randn(1, 5, 4, dtype=torch.float64), torch.randn(1, 3, 4, dtype=torch.float64)
    reset = torch.zeros(1, 8, dtype=torch.bool)
    reset[0, 5] = True
    with torch.no_grad():
        packed = layer(torch.cat([a, b], 1), reset=reset)
        assert_close(packed[:, :5], layer(a), 1e-10, "left segment sees nothing of the right one")
        assert_close(packed[:, 5:], layer(b), 1e-10, "right segment")


# ------------------------------------------------------------------------------------------ init, dtypes
def test_init_follows_mamba():
    torch.manual_seed(0)
    layer = Mamba(64, d_state=16, dt_min=1e-3, dt_max=1e-1)
    assert layer.dt_rank == 4 and layer.d_inner == 128
    assert_close(layer.A_log, torch.log(torch.arange(1.0, 17.0)).expand(128, 16), 0, "A_log")
    assert torch.all(layer.D == 1)
    dt = F.softplus(layer.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert dt.log().std() > 0.5  # log-uniform over two decades, not constant
    assert layer.dt_proj.weight.abs().max() <= 4 ** -0.5
    assert layer.conv1d.weight.shape == (128, 1, 4) and layer.x_proj.weight.shape == (4 + 32, 128)
    assert Mamba(17).dt_rank == math.ceil(17 / 16)


def test_bf16_stays_close_to_fp32():
    layer = make(8, torch.float32, 11)
    x = torch.randn(2, 16, 8)
    with torch.no_grad():
        y32 = layer(x)
        y16 = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    assert_close(y16.float(), y32, 5e-2, "bf16 vs fp32")


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_errors():
    layer = make(4, torch.float32)
    with pytest.raises(ValueError, match="d_model=4"):
        layer(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="d_model=4"):
        layer.step(torch.randn(2, 3), layer.init_state(2))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(2, 5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="reset"):
        layer(torch.randn(2, 5, 4), reset=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch_size=2"):
        layer(torch.randn(2, 5, 4), layer.init_state(3))
    with pytest.raises(ValueError, match="state.ssm"):
        layer(torch.randn(2, 5, 4), Mamba(4, d_state=7).init_state(2))
    with pytest.raises(TypeError, match="MambaState"):
        layer.step(torch.randn(2, 4), Mamba2(4).init_state(2))
    with pytest.raises(TypeError, match="state.ssm"):
        wrong = MambaState(torch.zeros(2, 8, 3), torch.zeros(2, 8, 16, dtype=torch.float64))
        layer(torch.randn(2, 5, 4), wrong)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(d_model=0), "d_model"),
        (dict(d_model=4, d_state=0), "d_state"),
        (dict(d_model=4, dt_rank="big"), "dt_rank"),
        (dict(d_model=3, expand=1.5), "expand"),
        (dict(d_model=4, dt_min=0.1, dt_max=0.01), "dt_min"),
        (dict(d_model=4, reverse="yes"), "reverse"),
    ],
)
def test_bad_constructor_arguments(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Mamba(**kw)
