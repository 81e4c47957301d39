"""LongConv: the layer contract, the squash/smooth kernel regularisation, exactness against a direct loop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.layers import H3, LongConv
from ssmkit.layers.longconv import LongConvState
from tests.layers.contract import (
    assert_close,
    check_bf16_close_to_f32,
    check_gradcheck_with_state,
    check_reset_packing,
    check_split_state,
    check_step_equivalence,
    tol,
)

MODES = ("conv", "scan", "auto")


def make(d_model: int = 3, kernel_len: int = 8, dtype=torch.float64, seed: int = 0, **kw) -> LongConv:
    torch.manual_seed(seed)
    return LongConv(d_model, kernel_len=kernel_len, **kw).to(dtype).eval()


def loop_reference(x, k, D, buffer=None, reset=None):
    """y_t = sum_s k[:, s] x_{t-s} + D x_t, one tap at a time; taps stop at the segment start, and before
    position 0 they read ``buffer`` (oldest first) unless reset[:, 0]."""
    batch, length, _ = x.shape
    K = k.shape[1]
    y = torch.zeros_like(x)
    for b in range(batch):
        start = -(K - 1) if buffer is not None else 0
        for t in range(length):
            if reset is not None and reset[b, t]:
                start = t
            acc = D * x[b, t]
            for s in range(K):
                src = t - s
                if src < start:
                    break
                acc = acc + k[:, s] * (x[b, src] if src >= 0 else buffer[b, :, K - 1 + src])
            y[b, t] = acc
    return y


# ------------------------------------------------------------------------------------------ the kernel
def test_squash_is_soft_threshold():
    layer = make(d_model=2, kernel_len=5, lam=0.003)
    raw = torch.tensor(
        [[-0.01, -0.002, 0.0, 0.001, 0.005], [0.003, -0.0031, 0.2, -0.5, 0.0029]], dtype=torch.float64
    )
    with torch.no_grad():
        layer.kernel.copy_(raw)
    want = torch.tensor(
        [[-0.007, 0.0, 0.0, 0.0, 0.002], [0.0, -0.0001, 0.197, -0.497, 0.0]], dtype=torch.float64
    )
    assert_close(layer.effective_kernel(), want, 1e-12, "squash")
    layer.lam = 0.0
    assert_close(layer.effective_kernel(), raw, 0, "lam=0 leaves the kernel alone")


@pytest.mark.parametrize("width", [1, 3, 5])
def test_smooth_is_centred_average_then_squash(width):
    layer = make(d_model=3, kernel_len=9, lam=0.002, smooth=width, seed=width)
    raw = layer.kernel.detach()
    want = torch.zeros_like(raw)
    h = width // 2
    for c in range(3):
        for l in range(9):
            window = [raw[c, j].item() if 0 <= j < 9 else 0.0 for j in range(l - h, l + h + 1)]
            m = sum(window) / width
            want[c, l] = (1 if m > 0 else -1) * max(abs(m) - 0.002, 0.0)
    assert_close(layer.effective_kernel(), want, 1e-12, f"smooth={width}")


def test_smooth_spreads_a_spike_into_a_box():
    layer = make(d_model=1, kernel_len=7, lam=0.0, smooth=3)
    with torch.no_grad():
        layer.kernel.zero_()
        layer.kernel[0, 3] = 3.0
    assert layer.effective_kernel()[0].tolist() == pytest.approx([0, 0, 1, 1, 1, 0, 0])


def test_kernel_dropout_only_in_training():
    layer = make(d_model=4, kernel_len=64, lam=0.0, kernel_dropout=0.5)
    raw = layer.kernel.detach()
    assert_close(layer.effective_kernel(), raw, 0, "eval: no dropout")
    layer.train()
    k = layer.effective_kernel().detach()
    dropped = k == 0
    assert 0 < dropped.float().mean().item() < 1
    assert_close(k[~dropped], 2 * raw[~dropped], 1e-12, "kept taps are rescaled by 1/(1-p)")


# ------------------------------------------------------------------------------------ exactness vs a loop
@given(
    kernel_len=st.integers(1, 14),
    length=st.integers(1, 12),
    mode=st.sampled_from(MODES),
    with_state=st.booleans(),
    reset_p=st.sampled_from([0.0, 0.2, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_forward_matches_loop(kernel_len, length, mode, with_state, reset_p, seed):
    """Any kernel length (1, shorter, equal or longer than the sequence), state and packed resets."""
    layer = make(d_model=3, kernel_len=kernel_len, smooth=3, seed=seed, mode=mode)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, length, 3, generator=g, dtype=torch.float64)
    buf = torch.randn(2, 3, kernel_len - 1, generator=g, dtype=torch.float64) if with_state else None
    reset = torch.rand(2, length, generator=g) < reset_p if reset_p > 0 else None
    state = LongConvState(buf) if with_state else None
    with torch.no_grad():
        y = layer(x, state, reset=reset)
        want = loop_reference(x, layer.effective_kernel(), layer.D, buf, reset)
    assert_close(y, want, 1e-12, f"K={kernel_len} L={length} mode={mode}")


# ------------------------------------------------------------------------------------- contract invariants
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel_len", [1, 5, 40])
def test_step_equals_forward(dtype, mode, kernel_len):
    layer = make(d_model=4, kernel_len=kernel_len, dtype=dtype, mode=mode, smooth=3)
    x = torch.randn(2, 23, 4, dtype=dtype)
    check_step_equivalence(layer, x)


def test_step_equals_forward_default_kernel_len():
    layer = make(d_model=4, kernel_len=1024, dtype=torch.float32)
    assert layer.init_state(2).buffer.shape == (2, 4, 1023)
    check_step_equivalence(layer, torch.randn(2, 30, 4))


@given(
    length=st.integers(2, 30), data=st.data(), mode=st.sampled_from(MODES),
    kernel_len=st.sampled_from([2, 4, 37]),
)
def test_split_with_state(length, data, mode, kernel_len):
    t = data.draw(st.integers(1, length - 1))
    layer = make(d_model=3, kernel_len=kernel_len, dtype=torch.float32, mode=mode)
    check_split_state(layer, torch.randn(2, length, 3), t)


def test_split_kernel_len_one():
    """kernel_len=1 has an empty state (the contract helper cannot compare empty tensors)."""
    layer = make(d_model=3, kernel_len=1, dtype=torch.float32)
    x = torch.randn(2, 9, 3)
    with torch.no_grad():
        y1, s = layer(x[:, :4], return_final_state=True)
        y2 = layer(x[:, 4:], s)
        assert s.buffer.shape == (2, 3, 0)
        assert_close(torch.cat([y1, y2], 1), layer(x), tol(torch.float32), "split, kernel_len=1")


@pytest.mark.parametrize("mode", MODES)
def test_split_with_state_and_reset(mode):
    """The carried buffer drops inputs from before a segment start that fell inside the first piece."""
    layer = make(d_model=3, kernel_len=9, mode=mode)
    x = torch.randn(3, 20, 3, dtype=torch.float64)
    reset = torch.zeros(3, 20, dtype=torch.bool)
    reset[0, 5] = True  # segment start well before the split
    reset[1, 9] = True  # just before the split
    reset[1, 13] = True  # after the split
    reset[2, 10] = True  # exactly at the split
    with torch.no_grad():
        y, s_whole = layer(x, reset=reset, return_final_state=True)
        y1, s = layer(x[:, :10], reset=reset[:, :10], return_final_state=True)
        y2, s2 = layer(x[:, 10:], s, reset=reset[:, 10:], return_final_state=True)
    assert_close(torch.cat([y1, y2], 1), y, 1e-12, "split with reset")
    assert_close(s2.buffer, s_whole.buffer, 1e-12, "final buffer")
    # buffer after [0, 10) holds positions 2..9; positions 2, 3, 4 precede the segment start at 5
    assert (s.buffer[0, :, :3] == 0).all() and (s.buffer[0, :, 3:] != 0).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel_len", [1, 6, 50])
def test_reset_packing(mode, kernel_len):
    layer = make(d_model=3, kernel_len=kernel_len, dtype=torch.float32, mode=mode)
    seqs = [torch.randn(1, n, 3) for n in (5, 1, 11, 3)]
    check_reset_packing(layer, seqs)


@given(length=st.integers(1, 40), kernel_len=st.sampled_from([1, 3, 33, 80]), seed=st.integers(0, 2**16))
def test_modes_agree(length, kernel_len, seed):
    layer = make(d_model=5, kernel_len=kernel_len, dtype=torch.float32, seed=seed, smooth=5)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, length, 5, generator=g)
    state = LongConvState(torch.randn(3, 5, kernel_len - 1, generator=g))
    reset = torch.rand(3, length, generator=g) < 0.15
    outs = {}
    with torch.no_grad():
        for mode in MODES:
            layer.mode = mode
            outs[mode] = layer(x, state, reset=reset, return_final_state=True)
    for mode in ("scan", "auto"):
        assert_close(outs[mode][0], outs["conv"][0], tol(torch.float32), f"{mode} vs conv")
        assert torch.equal(outs[mode][1].buffer, outs["conv"][1].buffer), f"{mode} state"


@pytest.mark.parametrize("mode", ["conv", "scan"])
def test_gradcheck(mode):
    layer = make(d_model=2, kernel_len=4, mode=mode, smooth=3, lam=0.001)
    x = torch.randn(2, 6, 2, dtype=torch.float64)
    buf = torch.randn(2, 2, 3, dtype=torch.float64)
    reset = torch.zeros(2, 6, dtype=torch.bool)
    reset[1, 3] = True
    check_gradcheck_with_state(layer, x, LongConvState(buf), reset=reset, names=("kernel", "D"), fast_mode=True)


def test_gradients_finite_float32():
    layer = make(d_model=4, kernel_len=64, dtype=torch.float32, smooth=3)
    x = torch.randn(2, 50, 4, requires_grad=True)
    reset = torch.zeros(2, 50, dtype=torch.bool)
    reset[0, 20] = True
    layer(x, reset=reset).square().sum().backward()
    for g in (x.grad, layer.kernel.grad, layer.D.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_bfloat16_close_to_float32():
    check_bf16_close_to_f32(make(d_model=8, kernel_len=64, dtype=torch.float32, smooth=3), torch.randn(2, 50, 8))


# --------------------------------------------------------------------------------------------- bad input
def test_bad_input():
    layer = make(d_model=3, kernel_len=5, dtype=torch.float32)
    x = torch.randn(2, 7, 3)
    with pytest.raises(ValueError, match="d_model=3"):
        layer(torch.randn(2, 7, 4))
    with pytest.raises(ValueError, match="d_model=3"):
        layer.step(torch.randn(2, 4), layer.init_state(2))
    with pytest.raises(ValueError, match="batch_size=2"):
        layer(x, layer.init_state(3))
    with pytest.raises(ValueError, match="state.buffer"):
        layer(x, make(d_model=3, kernel_len=6, dtype=torch.float32).init_state(2))
    with pytest.raises(TypeError, match="LongConvState"):
        layer(x, (torch.zeros(2, 3, 4),))
    with pytest.raises(TypeError, match="LongConvState"):
        layer.step(x[:, 0], H3(3, d_state=2).init_state(2))
    with pytest.raises(TypeError, match="dtype"):
        layer(x.double())
    with pytest.raises(TypeError, match="state.buffer"):
        layer(x, layer.init_state(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="reset"):
        layer(x, reset=torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="mode.*'auto', 'conv', 'scan'"):
        LongConv(3, mode="fft")
    layer.mode = "fast"
    with pytest.raises(ValueError, match="mode.*'auto', 'conv', 'scan'"):
        layer(x)
    for kw, name in (
        ({"kernel_len": 0}, "kernel_len"),
        ({"kernel_len": 2.0}, "kernel_len"),
        ({"lam": -0.1}, "lam"),
        ({"smooth": 4}, "smooth"),
        ({"smooth": -1}, "smooth"),
        ({"kernel_dropout": 1.0}, "kernel_dropout"),
        ({"init_scale": 0.0}, "init_scale"),
    ):
        with pytest.raises(ValueError, match=name):
            LongConv(3, **kw)
    with pytest.raises(ValueError, match="d_model"):
        LongConv(0)
