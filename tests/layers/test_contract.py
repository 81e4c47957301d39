"""The layer contract, parametrised over every layer family (the family files test each layer in more depth)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit import layers
from tests.layers.contract import check_reset_packing, check_split_state, check_step_equivalence

D = 8

# name -> (constructor of a tiny float64 instance, can step, LTI modes)
FACTORIES = {
    "S4D": (lambda: layers.S4D(D, d_state=4), True, ("conv", "scan")),
    "S4D-bilinear-lin": (lambda: layers.S4D(D, d_state=4, init="lin", disc="bilinear"), True, ("conv", "scan")),
    "S4": (lambda: layers.S4(D, d_state=4), True, ("conv", "scan")),
    "S4-ptd": (lambda: layers.S4(D, d_state=4, init="ptd"), True, ("conv", "scan")),
    "H3": (lambda: layers.H3(D, d_state=4, n_heads=4), True, ("conv", "scan")),
    "LongConv": (lambda: layers.LongConv(D, kernel_len=12), True, ("conv", "scan")),
    "Mamba": (lambda: layers.Mamba(D, d_state=4), True, ()),
    "Mamba2": (lambda: layers.Mamba2(D, d_state=4, headdim=4, chunk_size=8), True, ()),
    "Mamba3": (lambda: layers.Mamba3(D, d_state=4, headdim=4), True, ()),
    "Mamba3-mimo": (lambda: layers.Mamba3(D, d_state=4, headdim=4, mimo_rank=2), True, ()),
    "GatedSSM": (lambda: layers.GatedSSM(D), True, ()),
    "RGLRU": (lambda: layers.RGLRU(D), True, ()),
    "Attention": (lambda: layers.Attention(D, n_heads=2), True, ()),
    "Attention-sliding-rotary": (lambda: layers.Attention(D, n_heads=2, mask="sliding", window=5, rotary=True), True,
                                 ()),
    "PrefixBidirectional-gated": (lambda: layers.PrefixBidirectional(D, kind="gated"), True, ()),
    "PrefixBidirectional-mamba": (lambda: layers.PrefixBidirectional(D, kind="mamba", d_state=4), True, ()),
    "PrefixBidirectional-s4d": (lambda: layers.PrefixBidirectional(D, kind="s4d", d_state=4), True, ()),
    "Bidirectional-mamba": (lambda: layers.Bidirectional(layers.Mamba(D, d_state=4), combine="concat"), False, ()),
}
STEPPABLE = [k for k, v in FACTORIES.items() if v[1]]
LTI = [k for k, v in FACTORIES.items() if v[2]]


def make(name: str, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    return FACTORIES[name][0]().to(dtype).eval()


def rand_x(batch: int, length: int, dtype=torch.float64, seed: int = 1):
    return torch.randn(batch, length, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("name", STEPPABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_equals_step(name, dtype):
    check_step_equivalence(make(name, dtype), rand_x(2, 13, dtype))


@pytest.mark.parametrize("name", STEPPABLE)
@settings(max_examples=5)
@given(t=st.integers(1, 20))
def test_split_with_state_equals_whole(name, t):
    check_split_state(make(name), rand_x(2, 21), t)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_packed_reset_equals_alone(name):
    check_reset_packing(make(name), [rand_x(1, n, seed=n) for n in (5, 1, 9)])


@pytest.mark.parametrize("name", LTI)
def test_modes_agree(name):
    layer = make(name)
    x = rand_x(2, 17)
    with torch.no_grad():
        outs = {}
        for mode in FACTORIES[name][2]:
            layer.mode = mode
            outs[mode] = layer(x)
    ref = outs[FACTORIES[name][2][0]]
    for mode, y in outs.items():
        torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9, msg=f"{name}: mode {mode}")


@pytest.mark.parametrize("name", list(FACTORIES))
def test_gradcheck_tiny(name):
    layer = make(name)
    x = rand_x(1, 6).requires_grad_()
    torch.autograd.gradcheck(lambda x: layer(x), (x,), fast_mode=True)
    params = [p for p in layer.parameters() if p.requires_grad]
    y = layer(rand_x(2, 7))
    grads = torch.autograd.grad(y.square().sum(), params, allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert sum(g is not None for g in grads) >= len(params) // 2, "most parameters must receive gradients"


@pytest.mark.parametrize("name", list(FACTORIES))
def test_wrong_d_model_is_named(name):
    layer = make(name)
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.randn(1, 4, D + 1, dtype=torch.float64))


@pytest.mark.parametrize("name", STEPPABLE)
def test_foreign_state_is_rejected(name):
    layer = make(name)
    x = rand_x(2, 4)
    with pytest.raises((ValueError, TypeError), match="state"):
        layer(x, layer.init_state(3))  # other batch size
    other = make("GatedSSM" if not name.startswith("GatedSSM") else "Mamba")
    with pytest.raises((ValueError, TypeError), match="state"):
        layer(x, other.init_state(2))  # another layer's state


def test_bidirectional_cannot_step():
    layer = make("Bidirectional-mamba")
    with pytest.raises(NotImplementedError, match="step"):
        layer.step(torch.zeros(1, D, dtype=torch.float64), None)


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("bad", [1, None, "yes", torch.tensor(True)])
def test_return_final_state_must_be_bool(name, bad):
    layer = make(name)
    with pytest.raises(TypeError, match=r"^\S+\.forward: return_final_state must be a bool, got \w+$"):
        layer(rand_x(1, 3), return_final_state=bad)


@pytest.mark.parametrize("name", STEPPABLE)
def test_deprecated_state_keywords(name):
    """state= / return_state= still work, warn (naming this file as the caller) and give the same results."""
    layer = make(name)
    x1, x2 = rand_x(2, 5), rand_x(2, 4, seed=2)
    with torch.no_grad():
        y1, s1 = layer(x1, return_final_state=True)
        y2, s2 = layer(x2, initial_state=s1, return_final_state=True)
        with pytest.warns(DeprecationWarning, match="return_state= is deprecated; use return_final_state=") as rec:
            o1, t1 = layer(x1, return_state=True)
        assert rec[0].filename == __file__
        with pytest.warns(DeprecationWarning, match="state= is deprecated; use initial_state="):
            o2, t2 = layer(x2, state=t1, return_final_state=True)
    torch.testing.assert_close((o1, o2), (y1, y2), rtol=0, atol=0)
    for k, v in s2.tensors().items():
        torch.testing.assert_close(t2.tensors()[k], v, rtol=0, atol=0)
    with pytest.raises(TypeError, match="both initial_state= and its deprecated alias state="):
        layer(x2, initial_state=s1, state=s1)
