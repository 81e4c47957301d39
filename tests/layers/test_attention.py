"""Attention: masks against an explicit dense masked softmax, KV-cache contract, rotary continuity, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from ssmkit.layers import Attention, GatedSSM
from tests.layers.contract import (
    assert_close,
    check_reset_packing,
    check_split_state,
    check_step_equivalence,
)

CONFIGS = [
    {"mask": "causal"},
    {"mask": "causal", "rotary": True},
    {"mask": "prefix", "rotary": True},
    {"mask": "sliding", "window": 3},
    {"mask": "sliding", "window": 2, "rotary": True},
]
IDS = ["causal", "causal-rope", "prefix-rope", "sliding3", "sliding2-rope"]


def make(d_model: int = 8, dtype: torch.dtype = torch.float64, seed: int = 0, **kw) -> Attention:
    torch.manual_seed(seed)
    kw.setdefault("n_heads", 2)
    return Attention(d_model, **kw).to(dtype)


def segments_and_prefix(gen: torch.Generator, batch: int, length: int, with_reset: bool, with_prefix: bool):
    """Random segment starts and a random-length prefix at the start of every segment."""
    reset = (
        torch.rand(batch, length, generator=gen) < 0.25
        if with_reset
        else torch.zeros(batch, length, dtype=bool)
    )
    prefix = torch.zeros(batch, length, dtype=torch.bool)
    if with_prefix:
        for b in range(batch):
            starts = [0] + [t for t in range(1, length) if reset[b, t]]
            for s, e in zip(starts, starts[1:] + [length], strict=True):
                n = int(torch.randint(0, e - s + 1, (1,), generator=gen))
                prefix[b, s : s + n] = True
    return (reset if with_reset else None), (prefix if with_prefix else None)


def dense_mask(kind: str, length: int, reset_row, prefix_row, window):
    """allowed[i, j] written out query by query; also each position's index within its segment."""
    seg, pos, s, p = [], [], -1, 0
    for t in range(length):
        if t == 0 or (reset_row is not None and reset_row[t]):
            s, p = s + 1, 0
        seg.append(s)
        pos.append(p)
        p += 1
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        for j in range(length):
            if seg[i] != seg[j]:
                continue
            if kind == "sliding":
                allowed[i, j] = 0 <= i - j < window
            else:
                allowed[i, j] = j <= i or (
                    kind == "prefix" and prefix_row is not None and bool(prefix_row[j])
                )
    return allowed, torch.tensor(pos)


def rotate(t, pos, base):
    """Rotary embedding via complex multiplication: channel pair (j, j + d/2) as one complex number."""
    half = t.shape[-1] // 2
    c = torch.complex(t[..., :half], t[..., half:])
    freq = base ** (-torch.arange(half, dtype=torch.float64) * 2 / t.shape[-1])
    c = c * torch.polar(torch.ones((), dtype=torch.float64), pos[..., None].double() * freq).to(c.dtype)
    return torch.cat([c.real, c.imag], -1)


def dense_reference(m: Attention, x, reset=None, prefix=None):
    batch, length, d = x.shape
    h, hd = m.n_heads, m.head_dim
    q, k, v = (x @ m.qkv.weight.T + m.qkv.bias).split(d, -1)
    q, k, v = (t.reshape(batch, length, h, hd) for t in (q, k, v))
    out = torch.empty(batch, length, h, hd, dtype=x.dtype)
    for b in range(batch):
        allowed, pos = dense_mask(
            m.mask,
            length,
            None if reset is None else reset[b],
            None if prefix is None else prefix[b],
            m.window,
        )
        qb, kb = q[b], k[b]
        if m.rotary:
            qb = rotate(qb.transpose(0, 1), pos, m.rotary_base).transpose(0, 1)
            kb = rotate(kb.transpose(0, 1), pos, m.rotary_base).transpose(0, 1)
        scores = torch.einsum("lhd,mhd->hlm", qb, kb) / math.sqrt(hd)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[b] = torch.einsum("hlm,mhd->lhd", probs, v[b])
    return out.reshape(batch, length, d) @ m.out_proj.weight.T + m.out_proj.bias


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("with_reset", [False, True])
@settings(max_examples=8)
@given(length=st.integers(1, 10), seed=st.integers(0, 10_000))
def test_matches_dense_reference(cfg, with_reset, length, seed):
    gen = torch.Generator().manual_seed(seed)
    m = make(**cfg)
    x = torch.randn(3, length, 8, dtype=torch.float64, generator=gen)
    reset, prefix = segments_and_prefix(gen, 3, length, with_reset, cfg["mask"] == "prefix")
    with torch.no_grad():
        y = m(x, reset=reset, prefix_mask=prefix)
    assert_close(y, dense_reference(m, x, reset, prefix), 1e-12, f"{cfg} vs dense masked softmax")


def test_prefix_mask_visibility():
    """A later prefix token changes earlier outputs; a suffix token never changes earlier ones."""
    m = make(mask="prefix")
    x = torch.randn(1, 8, 8, dtype=torch.float64)
    prefix = torch.zeros(1, 8, dtype=torch.bool)
    prefix[0, :4] = True
    with torch.no_grad():
        y = m(x, prefix_mask=prefix)
        for t in range(8):
            x2 = x.clone()
            x2[0, t] += 1.0
            diff = (m(x2, prefix_mask=prefix) - y).abs().amax(-1)[0]
            if t < 4:
                assert (diff[:4] > 1e-8).all(), f"prefix token {t} must reach every prefix position"
            else:
                assert (diff[:t] <= 1e-12).all(), f"suffix token {t} leaked to earlier positions"
            assert (diff[t:] > 1e-8).all()


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=6)
@given(batch=st.integers(1, 3), length=st.integers(1, 10))
def test_step_equals_forward(cfg, dtype, batch, length):
    m = make(dtype=dtype, **cfg)
    check_step_equivalence(m, torch.randn(batch, length, 8, dtype=dtype))


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@settings(max_examples=8)
@given(length=st.integers(2, 12), data=st.data())
def test_split_with_state(cfg, length, data):
    t = data.draw(st.integers(1, length - 1))
    m = make(**cfg)
    check_split_state(m, torch.randn(2, length, 8, dtype=torch.float64), t)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_reset_packing(cfg):
    m = make(**cfg)
    check_reset_packing(m, [torch.randn(1, n, 8, dtype=torch.float64) for n in (4, 1, 6)])


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_split_with_state_and_reset(cfg):
    """A reset inside the second piece: the cache before it is no longer visible, positions restart."""
    m = make(**cfg)
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    reset = torch.zeros(2, 11, dtype=torch.bool)
    reset[0, 7] = True
    reset[1, [2, 9]] = True
    with torch.no_grad():
        y = m(x, reset=reset)
        y1, s = m(x[:, :5], reset=reset[:, :5], return_final_state=True)
        y2, s = m(x[:, 5:], s, reset=reset[:, 5:], return_final_state=True)
        _, s5 = m(x[:, :5], reset=reset[:, :5], return_final_state=True)
        y3, s8 = m(x[:, 5:8], s5, reset=reset[:, 5:8], return_final_state=True)
        y8, _ = m.step(x[:, 8], s8)  # no reset up to 8 in either row's current segment
    assert_close(torch.cat([y1, y2], 1), y, 1e-12, "split with reset")
    assert_close(torch.cat([y3, y8[:, None]], 1), y[:, 5:9], 1e-12, "split with reset then step")
    assert s.pos.tolist() == [4, 2], "positions restart at the last segment start"


def test_sliding_cache_is_bounded():
    w = 3
    m = make(mask="sliding", window=w)
    x = torch.randn(2, 15, 8, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
        state, ys = m.init_state(2), []
        for t in range(15):
            yt, state = m.step(x[:, t], state)
            ys.append(yt)
            assert state.k.shape[2] <= w and state.v.shape[2] <= w
        _, s_long = m(x, return_final_state=True)
    assert s_long.k.shape[2] == w
    assert state.pos.tolist() == [15, 15]
    assert_close(torch.stack(ys, 1), y, 1e-12, "sliding step vs forward")
    # the window really limits attention: a token more than w back has no influence
    x2 = x.clone()
    x2[:, 5] += 1.0
    with torch.no_grad():
        d = (m(x2) - y).abs().amax(-1)
    assert (d[:, 5 : 5 + w] > 1e-8).all() and (d[:, 5 + w :] <= 1e-12).all() and (d[:, :5] <= 1e-12).all()


def test_causal_cache_grows_and_max_cache():
    m = make(max_cache=6)
    x = torch.randn(1, 7, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="max_cache=6"):
        m(x)
    _, s = m(x[:, :4], return_final_state=True)
    assert s.k.shape[2] == 4
    _, s = m.step(x[:, 4], s)
    _, s = m.step(x[:, 5], s)
    assert s.k.shape[2] == 6
    with pytest.raises(ValueError, match="max_cache=6"):
        m.step(x[:, 6], s)
    with pytest.raises(ValueError, match="max_cache=2"):
        Attention(8, mask="sliding", window=3, max_cache=2)
    ms = make(mask="sliding", window=3, max_cache=3)  # sliding: bounded cache, any length
    _, s = ms(torch.randn(1, 20, 8, dtype=torch.float64), return_final_state=True)
    assert s.k.shape[2] == 3


def test_rotary_positions_continue_and_matter():
    m = make(rotary=True)
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
        _, s = m(x[:, :4], return_final_state=True)
        assert s.pos.tolist() == [4, 4]
        ys = []
        for t in range(4, 9):
            yt, s = m.step(x[:, t], s)
            ys.append(yt)
        assert s.pos.tolist() == [9, 9]
        assert_close(torch.stack(ys, 1), y[:, 4:], 1e-12, "rotary steps after a prefix")
        # a state whose position was shifted gives different outputs (positions are really used)...
        _, s_shift = m(x[:, :4], return_final_state=True)
        s_shift.pos += 3
        assert not torch.allclose(m(x[:, 4:], s_shift), y[:, 4:])
        # ...and no rotary differs from rotary on the same weights
        plain = make(rotary=False)
        assert not torch.allclose(plain(x), y)


def test_prefix_then_step_continues_causally():
    m = make(mask="prefix", rotary=True)
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    p = 4
    prefix = torch.zeros(2, 10, dtype=torch.bool)
    prefix[:, :p] = True
    with torch.no_grad():
        y = m(x, prefix_mask=prefix)
        y1, s = m(x[:, :p], prefix_mask=prefix[:, :p], return_final_state=True)
        ys = [y1[:, i] for i in range(p)]
        for t in range(p, 7):
            yt, s = m.step(x[:, t], s)
            ys.append(yt)
        y3 = m(x[:, 7:], s)
    assert_close(torch.cat([torch.stack(ys, 1), y3], 1), y, 1e-12, "prefix then step then forward")


def test_gradcheck():
    m = make(4, n_heads=2, mask="prefix", rotary=True)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in m.parameters()]
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    reset = torch.tensor([[True, False, False, True, False], [False, False, False, False, False]])
    prefix = torch.tensor([[True, True, False, True, False], [True, False, False, False, False]])

    def fn(x, *ps):
        return functional_call(
            m, dict(zip(names, ps, strict=True)), (x,), {"reset": reset, "prefix_mask": prefix}
        )

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)
    ms = make(4, n_heads=1, mask="sliding", window=2)
    _, s = ms(torch.randn(2, 3, 4, dtype=torch.float64), return_final_state=True)
    k = s.k.clone().requires_grad_(True)
    v = s.v.clone().requires_grad_(True)

    def fn_cache(x, k, v):
        return ms(x, type(s)(k=k, v=v, pos=s.pos))

    assert torch.autograd.gradcheck(fn_cache, (x, k, v), eps=1e-6, atol=1e-5, fast_mode=True)


def test_default_heads():
    assert Attention(128).n_heads == 2
    assert Attention(96).n_heads == 1
    assert Attention(200).n_heads == 2
    assert Attention(16).n_heads == 1


def test_bad_input():
    m = make(mask="prefix")
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="d_model=8"):
        m(torch.randn(2, 5, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        m(x.float())
    with pytest.raises(TypeError, match="AttentionState"):
        m(x, GatedSSM(8).double().init_state(2))
    with pytest.raises(ValueError, match="batch=2"):
        m(x, m.init_state(3))
    with pytest.raises(TypeError, match="dtype"):
        m(x, m.init_state(2, dtype=torch.float32))
    with pytest.raises(ValueError, match="prefix_mask"):
        m(x, prefix_mask=torch.ones(2, 4, dtype=torch.bool))
    gap = torch.tensor([[True, False, True, False, False]] * 2)
    with pytest.raises(ValueError, match="contiguous"):
        m(x, prefix_mask=gap)
    _, s = m(x, return_final_state=True)
    with pytest.raises(ValueError, match="suffix"):
        m(x, s, prefix_mask=torch.ones(2, 5, dtype=torch.bool))
    ok = torch.zeros(2, 5, dtype=torch.bool)
    ok[:, 2:4] = True  # a prefix after a reset is fine even with a state
    m(x, s, prefix_mask=ok, reset=torch.tensor([[False, False, True, False, False]] * 2))
    with pytest.raises(ValueError, match="mask='prefix'"):
        make(mask="causal")(x, prefix_mask=ok)
    with pytest.raises(ValueError, match="x_t"):
        m.step(x, m.init_state(2))


def test_bad_options():
    with pytest.raises(ValueError, match="n_heads"):
        Attention(8, n_heads=3)
    with pytest.raises(ValueError, match="unknown mask 'bogus'.*'causal', 'prefix', 'sliding'"):
        Attention(8, mask="bogus")
    with pytest.raises(ValueError, match="window"):
        Attention(8, mask="sliding")
    with pytest.raises(ValueError, match="window"):
        Attention(8, window=4)
    with pytest.raises(ValueError, match="head_dim"):
        Attention(6, n_heads=2, rotary=True)
    with pytest.raises(ValueError, match="max_cache"):
        Attention(8, max_cache=0)
    with pytest.raises(ValueError, match="rotary_base"):
        Attention(8, rotary=True, rotary_base=1)
