"""Bidirectional and PrefixBidirectional: direction semantics, no future leakage, causal stepping, errors."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from ssmkit.layers import Attention, Bidirectional, GatedSSM, PrefixBidirectional
from tests.layers.contract import (
    assert_close,
    check_reset_packing,
    check_split_state,
    check_step_equivalence,
)

# class name -> (module, small constructor kwargs)
LAYERS = {
    "GatedSSM": ("gated", {"d_state": 6}),
    "RGLRU": ("gated", {"d_state": 6}),
    "Mamba": ("mamba", {"d_state": 4, "expand": 2}),
    "S4D": ("s4d", {"d_state": 8}),
}
KINDS = {"gated": "GatedSSM", "rglru": "RGLRU", "mamba": "Mamba", "s4d": "S4D"}
KIND_KW = {"gated": {"d_state": 6}, "rglru": {"d_state": 6}, "mamba": {"d_state": 4}, "s4d": {"d_state": 8}}


def layer_class(name: str):
    module = LAYERS[name][0]
    try:
        return getattr(importlib.import_module(f"ssmkit.layers.{module}"), name)
    except ModuleNotFoundError:
        pytest.skip(f"ssmkit.layers.{module} does not exist yet")


def make_layer(name: str, d_model: int = 6, seed: int = 0, **kw):
    cls = layer_class(name)
    torch.manual_seed(seed)
    return cls(d_model, **{**LAYERS[name][1], **kw}).double()


def make_prefix(kind: str, d_model: int = 6, seed: int = 0, **kw) -> PrefixBidirectional:
    layer_class(KINDS[kind])
    torch.manual_seed(seed)
    return PrefixBidirectional(d_model, kind, **{**KIND_KW[kind], **kw}).double()


def prefix_of(batch: int, length: int, lengths: list[int]) -> torch.Tensor:
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    return mask


# ------------------------------------------------------------------------------------------ Bidirectional
@pytest.mark.parametrize("name", list(LAYERS))
def test_bidirectional_is_forward_plus_flipped(name):
    layer = make_layer(name)
    bi = Bidirectional(layer, "sum")
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x) + layer(x.flip(1)).flip(1)
        assert_close(bi(x), expected, 1e-10, f"Bidirectional({name}) vs forward + flipped forward")
        # the reverse copy is exactly the class built with reverse=True on the same weights
        rev = make_layer(name, reverse=True)
        rev.load_state_dict(layer.state_dict())
        assert_close(bi.bwd(x), rev(x), 1e-12, "reverse copy vs constructor reverse=True")
        assert not bi.fwd.reverse and bi.bwd.reverse


@pytest.mark.parametrize("name", list(LAYERS))
def test_bidirectional_concat_and_reset(name):
    layer = make_layer(name)
    bi = Bidirectional(layer, "concat").double()
    x = torch.randn(2, 8, 6, dtype=torch.float64)
    with torch.no_grad():
        y = bi(x)
        assert_close(y, bi.proj(torch.cat([bi.fwd(x), bi.bwd(x)], -1)), 1e-12, "concat combine")
        x2 = x.clone()
        x2[:, -1] += 1.0
        assert ((bi(x2) - y).abs().amax(-1) > 1e-8).all(), "the last token must reach every position"
    check_reset_packing(bi, [torch.randn(1, n, 6, dtype=torch.float64) for n in (3, 1, 5)])


def test_bidirectional_cannot_step_or_pass_state():
    bi = Bidirectional(GatedSSM(4).double())
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="cannot step.*depends on the tokens after"):
        bi.step(x[:, 0], None)
    with pytest.raises(NotImplementedError, match="no state"):
        bi.init_state(2)
    with pytest.raises(ValueError, match="state passing is undefined"):
        bi(x, bi.fwd.init_state(2))
    with pytest.raises(ValueError, match="state passing is undefined"):
        bi(x, return_final_state=True)
    with pytest.raises(ValueError, match="d_model=4"):
        bi(torch.randn(2, 5, 3, dtype=torch.float64))


def test_bidirectional_bad_construction():
    with pytest.raises(TypeError, match="support reverse=True"):
        Bidirectional(Attention(8))
    with pytest.raises(TypeError, match="SequenceLayer"):
        Bidirectional(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="reverse=False"):
        Bidirectional(GatedSSM(4, reverse=True))
    with pytest.raises(ValueError, match="unknown combine 'mean'.*'sum', 'concat'"):
        Bidirectional(GatedSSM(4), combine="mean")


def test_bidirectional_gradcheck():
    torch.manual_seed(0)
    bi = Bidirectional(GatedSSM(3, 2), "concat").double()
    names = [n for n, _ in bi.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in bi.parameters()]
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    reset = torch.tensor([[False, False, True, False, False], [False, True, False, False, True]])

    def fn(x, *ps):
        return functional_call(bi, dict(zip(names, ps, strict=True)), (x,), {"reset": reset})

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


# ------------------------------------------------------------------------------------ PrefixBidirectional
@pytest.mark.parametrize("kind", list(KINDS))
def test_prefix_matches_definition(kind):
    """Output = proj([causal(x), reverse half run on each prefix alone and on each suffix token alone])."""
    m = make_prefix(kind)
    x = torch.randn(2, 8, 6, dtype=torch.float64)
    lengths = [3, 0]
    prefix = prefix_of(2, 8, lengths)
    with torch.no_grad():
        y = m(x, prefix_mask=prefix)
        for b, p in enumerate(lengths):
            xb = x[b : b + 1]
            parts = [m.rev(xb[:, :p])] if p else []
            parts += [m.rev(xb[:, t : t + 1]) for t in range(p, 8)]
            expected = m.out_proj(torch.cat([m.causal(xb), torch.cat(parts, 1)], -1))
            assert_close(y[b : b + 1], expected, 1e-10, f"{kind} row {b} vs definition")


@pytest.mark.parametrize("kind", list(KINDS))
def test_suffix_tokens_never_reach_earlier_positions(kind):
    m = make_prefix(kind)
    length, p = 8, 3
    x = torch.randn(2, length, 6, dtype=torch.float64)
    prefix = prefix_of(2, length, [p, 5])
    with torch.no_grad():
        y = m(x, prefix_mask=prefix)
        for b, pb in enumerate([p, 5]):
            for s in range(pb, length):  # every suffix position
                x2 = x.clone()
                x2[b, s] += torch.randn(6, dtype=torch.float64)
                d = (m(x2, prefix_mask=prefix) - y).abs().amax(-1)[b]
                assert (d[:s] <= 1e-12).all(), f"{kind}: suffix token {s} changed earlier outputs {d[:s]}"
                assert (d[s:] > 1e-10).all(), f"{kind}: suffix token {s} must still affect itself and later"


@pytest.mark.parametrize("kind", list(KINDS))
def test_prefix_tokens_reach_every_position(kind):
    m = make_prefix(kind)
    length, p = 7, 4
    x = torch.randn(1, length, 6, dtype=torch.float64)
    prefix = prefix_of(1, length, [p])
    with torch.no_grad():
        y = m(x, prefix_mask=prefix)
        for t in range(p):
            x2 = x.clone()
            x2[0, t] += torch.randn(6, dtype=torch.float64)
            d = (m(x2, prefix_mask=prefix) - y).abs().amax(-1)[0]
            assert (d > 1e-10).all(), f"{kind}: prefix token {t} must change every position, got {d}"
        # while without the prefix (fully causal) a later token never reaches an earlier one
        x2 = x.clone()
        x2[0, p - 1] += 1.0
        assert ((m(x2) - m(x)).abs().amax(-1)[0, : p - 1] <= 1e-12).all()


@pytest.mark.parametrize("kind", list(KINDS))
def test_prefix_then_step_and_split(kind):
    m = make_prefix(kind)
    length, p = 9, 4
    x = torch.randn(2, length, 6, dtype=torch.float64)
    prefix = prefix_of(2, length, [p, p])
    with torch.no_grad():
        y = m(x, prefix_mask=prefix)
        y1, s = m(x[:, :p], prefix_mask=prefix[:, :p], return_final_state=True)
        ys = [y1]
        for t in range(p, 7):
            yt, s = m.step(x[:, t], s)
            ys.append(yt[:, None])
        ys.append(m(x[:, 7:], s))
        # split inside the suffix, the first piece holding the whole prefix
        y_a, s_a = m(x[:, :6], prefix_mask=prefix[:, :6], return_final_state=True)
        y_b = m(x[:, 6:], s_a)
    assert_close(torch.cat(ys, 1), y, 1e-10, f"{kind} prefix forward then step then forward")
    assert_close(torch.cat([y_a, y_b], 1), y, 1e-10, f"{kind} split after the prefix")


@pytest.mark.parametrize("kind", list(KINDS))
def test_without_prefix_is_causal_contract(kind):
    m = make_prefix(kind)
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    check_step_equivalence(m, x)
    check_step_equivalence(m.float(), x.float())
    m.double()
    check_split_state(m, x, 3)
    check_reset_packing(m, [torch.randn(1, n, 6, dtype=torch.float64) for n in (3, 1, 4)])


@settings(max_examples=8)
@given(lengths=st.lists(st.integers(1, 5), min_size=1, max_size=3), data=st.data())
def test_packing_with_prefixes(lengths, data):
    """Packed segments, each with its own prefix, equal each segment alone."""
    m = make_prefix("gated")
    seqs = [torch.randn(1, n, 6, dtype=torch.float64) for n in lengths]
    prefixes = [prefix_of(1, n, [data.draw(st.integers(0, n))]) for n in lengths]
    reset = torch.zeros(1, sum(lengths), dtype=torch.bool)
    reset[0, torch.tensor([0, *lengths[:-1]]).cumsum(0)] = True
    with torch.no_grad():
        packed = m(torch.cat(seqs, 1), prefix_mask=torch.cat(prefixes, 1), reset=reset)
        alone = torch.cat([m(s, prefix_mask=p) for s, p in zip(seqs, prefixes, strict=True)], 1)
    assert_close(packed, alone, 1e-10, "packed prefix segments vs alone")


@pytest.mark.parametrize("kind", list(KINDS))
def test_total_state_size_equals_plain_layer(kind):
    m = make_prefix(kind)
    plain = make_layer(KINDS[kind], **KIND_KW[kind])

    def size(state):
        return sum(t.numel() for t in state.tensors().values())

    total = size(m.causal.init_state(1)) + size(m.rev.init_state(1))
    assert total == size(plain.init_state(1))
    assert size(m.init_state(1)) == size(m.causal.init_state(1))


def test_prefix_gradcheck():
    m = make_prefix("gated", 3, d_state=4)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in m.parameters()]
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    reset = torch.tensor([[False, False, True, False, False], [False, False, False, False, False]])
    prefix = torch.tensor([[True, False, True, True, False], [True, True, False, False, False]])

    def fn(x, *ps):
        return functional_call(
            m, dict(zip(names, ps, strict=True)), (x,), {"reset": reset, "prefix_mask": prefix}
        )

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


def test_prefix_bad_input():
    m = make_prefix("gated")
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    _, s = m(x, return_final_state=True)
    with pytest.raises(ValueError, match="suffix"):
        m(x, s, prefix_mask=prefix_of(2, 5, [2, 0]))
    with pytest.raises(ValueError, match="contiguous"):
        m(x, prefix_mask=torch.tensor([[True, False, True, False, False]] * 2))
    with pytest.raises(ValueError, match="prefix_mask"):
        m(x, prefix_mask=torch.ones(2, 5))
    with pytest.raises(TypeError, match="GatedSSMState"):
        m(x, Attention(6).double().init_state(2))
    with pytest.raises(ValueError, match="another layer or batch size"):  # a full-width state does not fit
        m(x, GatedSSM(6).double().init_state(2))
    with pytest.raises(ValueError, match="unknown kind 'lstm'"):
        PrefixBidirectional(6, "lstm")
    with pytest.raises(ValueError, match="reverse"):
        PrefixBidirectional(6, "gated", reverse=True)
    with pytest.raises(ValueError, match="d_state must be an int >= 2"):
        PrefixBidirectional(6, "gated", d_state=1)


def test_prefix_split_widths():
    m = PrefixBidirectional(6, "gated", d_state=7)
    assert (m.causal.d_state, m.rev.d_state) == (4, 3)
    assert not m.causal.reverse and m.rev.reverse
    assert m.causal.d_state + m.rev.d_state == 7
    layer_class("S4D")
    m = PrefixBidirectional(6, "s4d", d_state=6)
    assert (m.causal.d_state, m.rev.d_state) == (4, 2)
    with pytest.raises(ValueError, match="multiple of 2"):
        PrefixBidirectional(6, "s4d", d_state=2)
    layer_class("Mamba")
    m = PrefixBidirectional(6, "mamba", expand=2)
    assert (m.causal.d_inner, m.rev.d_inner) == (6, 6)
    with pytest.raises(ValueError, match="expand"):
        PrefixBidirectional(5, "mamba", expand=1)
