"""Mamba3 layer: MIMO rank 1 == SISO, the fused path == the loop oracle (outputs and parameter gradients),
reverse, model-level use through the block pattern, and named errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.layers import Mamba3
from ssmkit.models import CausalLM, ModelConfig
from ssmkit.ops import fused_kernels
from tests.layers.contract import assert_close, check_reset_packing, check_split_state, check_step_equivalence

TOL = 1e-10


def make(d_model: int = 8, seed: int = 0, **kw) -> Mamba3:
    torch.manual_seed(seed)
    layer = Mamba3(d_model, **{"d_state": 6, "headdim": 4, **kw}).double().eval()
    with torch.no_grad():  # move the parameters off their structured init, so every path matters
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def rand_x(batch: int, length: int, d_model: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, d_model, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_mimo_rank_one_with_unit_projections_is_siso():
    siso = make(seed=2, ngroups=2)
    mimo = Mamba3(8, d_state=6, headdim=4, ngroups=2, mimo_rank=1).double().eval()
    missing = mimo.load_state_dict(siso.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["mimo_o", "mimo_x", "mimo_z"]
    with torch.no_grad():
        for name in missing:
            getattr(mimo, name).fill_(1.0)
    x = rand_x(2, 37)
    y1, s1 = siso(x, return_final_state=True)
    yr, sr = mimo(x, return_final_state=True)
    assert_close(yr, y1, TOL, "MIMO rank 1 vs SISO")
    assert_close(sr.ssm, s1.ssm, TOL, "final ssm state")
    assert_close(sr.k.squeeze(1), s1.k, TOL, "final key")
    yt1, _ = siso.step(x[:, 0], s1)
    ytr, _ = mimo.step(x[:, 0], sr)
    assert_close(ytr, yt1, TOL, "MIMO rank 1 vs SISO step")


@pytest.mark.parametrize("kw", [{}, {"mimo_rank": 3, "ngroups": 2}, {"rope_fraction": 1.0, "reverse": True}],
                         ids=["siso", "mimo3", "full-rope-reverse"])
def test_fused_path_equals_oracle_with_parameter_gradients(kw):
    layer = make(seed=3, **kw)
    x = rand_x(2, 41, seed=4).requires_grad_()
    reset = torch.zeros(2, 41, dtype=torch.bool)
    reset[1, 17] = True

    def run():
        y, st_ = layer(x, reset=reset, return_final_state=True)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + st_.ssm.sum()
        return y, torch.autograd.grad(loss, [x, *layer.parameters()])

    y, grads = run()
    with fused_kernels(False):
        y_ref, grads_ref = run()
    assert_close(y, y_ref, TOL, "fused vs oracle")
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, g, r in zip(names, grads, grads_ref, strict=True):
        assert_close(g, r, TOL, f"gradient of {name}")


@settings(max_examples=6, deadline=None)
@given(length=st.integers(1, 40), rank=st.sampled_from([None, 2]), seed=st.integers(0, 100))
def test_contract_over_lengths(length, rank, seed):
    layer = make(seed=seed, mimo_rank=rank)
    check_step_equivalence(layer, rand_x(2, length, seed=seed))
    if length > 1:
        check_split_state(layer, rand_x(2, length, seed=seed + 1), length // 2)
    check_reset_packing(layer, [rand_x(1, n, seed=n) for n in (3, 1, 5)])


@pytest.mark.parametrize("rank", [None, 2])
def test_reverse_steps_from_the_end_and_splits(rank):
    layer = make(seed=5, mimo_rank=rank, reverse=True)
    x = rand_x(2, 15, seed=6)
    with torch.no_grad():
        y = layer(x)
        state, ys = layer.init_state(2, dtype=x.dtype), []
        for t in range(14, -1, -1):
            yt, state = layer.step(x[:, t], state)
            ys.append(yt)
        assert_close(torch.stack(ys[::-1], 1), y, TOL, "reverse steps")
        y_right, s = layer(x[:, 6:], return_final_state=True)
        y_left = layer(x[:, :6], s)
        assert_close(torch.cat([y_left, y_right], 1), y, TOL, "reverse split")
        flipped = make(seed=5, mimo_rank=rank)
        assert_close(flipped(x.flip(1)).flip(1), y, TOL, "reverse == flipped forward")


def test_in_a_model_pattern_step_equals_forward():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=8, vocab_size=11, pattern="mamba3,mamba2,mamba3",
                      mixer_options={"mamba3": {"d_state": 4, "headdim": 4, "mimo_rank": 2},
                                     "mamba2": {"d_state": 4, "headdim": 4, "chunk_size": 4}})
    model = CausalLM(cfg).double().eval()
    ids = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(ids).logits
        state, steps = model.init_state(2), []
        for t in range(9):
            logits, state = model.step(ids[:, t], state)
            steps.append(logits)
    assert_close(torch.stack(steps, 1), whole, TOL, "model step vs forward")


def test_bfloat16_autocast_keeps_states_float32():
    layer = Mamba3(8, d_state=4, headdim=4, mimo_rank=2)
    x = torch.randn(2, 9, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, st_ = layer(x.bfloat16(), return_final_state=True)
    assert all(t.dtype == torch.float32 for t in st_.tensors().values())
    ref = layer(x)
    assert (y.float() - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("kw, match", [
    ({"rope_fraction": 0.3}, "rope_fraction must be 0.5 or 1.0"),
    ({"mimo_rank": 0}, "mimo_rank must be a positive int"),
    ({"d_state": 2, "rope_fraction": 0.5}, "rotates no pair"),
    ({"headdim": 5}, "headdim=5 must divide d_inner"),
    ({"ngroups": 3}, "ngroups=3 must divide nheads"),
    ({"A_floor": 0.0}, "A_floor must be > 0"),
])
def test_bad_constructor_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        Mamba3(8, **{"d_state": 4, "headdim": 4, **kw})


def test_foreign_state_is_named():
    siso, mimo = make(), make(mimo_rank=2)
    with pytest.raises(ValueError, match="state.k must have shape"):
        siso(rand_x(2, 3), mimo.init_state(2, dtype=torch.float64))
