"""``torch.autocast("cpu", dtype=torch.bfloat16)`` (and float16, for a whole model and sampled layers)
through every mixer of the registry and a whole CausalLM, forward and backward, against the same float32
modules without autocast.

Under autocast a float32 layer runs its projections in bfloat16 (torch's autocast does that) and everything else
(convolutions, scans, SSM kernels, norms, gates, states) in float32. Tolerances, stated against the float32 run
(measured maxima in brackets, d_model 16, length 24):
  - output: relative L2 error <= 2e-2 (one bfloat16 rounding per projection; measured <= 5e-3);
  - gradients: float32 dtype; all parameters' gradients together within 5e-2 relative L2 (measured <= 2e-2),
    and each parameter's within 1e-1 of the largest gradient entry of the module (a one-element sum such as
    the gradient of Mamba-2's D can cancel, so its own relative error can reach ~1e-1).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.layers import S4, S4D, Bidirectional, GatedSSM, LongConv, Mamba
from ssmkit.models import CausalLM, ModelConfig
from ssmkit.models.registry import build_mixer, mixer_names

OUT_TOL, GRAD_TOL, PARAM_TOL = 2e-2, 5e-2, 1e-1


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def _forward_backward(module, x, *, autocast: bool, dtype: torch.dtype = torch.bfloat16):
    module.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        y = module(x)
    y = y.logits if hasattr(y, "logits") else y
    y.float().pow(2).mean().backward()
    return y.detach(), {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


def check_autocast_close(module, x, what: str, dtype: torch.dtype = torch.bfloat16) -> None:
    y32, g32 = _forward_backward(module, x, autocast=False)
    y, g = _forward_backward(module, x, autocast=True, dtype=dtype)
    assert torch.isfinite(y).all() and rel_l2(y, y32) <= OUT_TOL, (what, rel_l2(y, y32))
    assert set(g) == set(g32) and g32, what
    assert all(p.dtype == torch.float32 for p in module.parameters()), what
    flat = torch.cat([g[k].flatten() for k in g32])
    flat32 = torch.cat([g32[k].flatten() for k in g32])
    assert rel_l2(flat, flat32) <= GRAD_TOL, (what, rel_l2(flat, flat32))
    scale = flat32.abs().max()
    for k in g32:
        assert g[k].dtype == torch.float32, (what, k)
        assert (g[k] - g32[k]).abs().max() <= PARAM_TOL * scale, (what, k)


@pytest.mark.parametrize("name", mixer_names())
def test_every_registry_mixer_under_autocast(name):
    torch.manual_seed(0)
    layer = build_mixer(name, 16, {})
    if getattr(layer, "takes_residual", False):  # needs the model's embeddings and shared blocks: a whole model
        model = CausalLM(ModelConfig(d_model=16, pattern=f"{name}*2", vocab_size=32))
        check_autocast_close(model, torch.randint(0, 32, (2, 24)), name)
        return
    check_autocast_close(layer, torch.randn(2, 24, 16), name)


@pytest.mark.parametrize("make", [
    lambda: S4(16, mode="scan"), lambda: S4D(16, mode="scan"), lambda: LongConv(16, mode="conv"),
    lambda: Bidirectional(GatedSSM(16), combine="concat"), lambda: Mamba(16, d_state=4, d_conv=1),
], ids=["s4-scan", "s4d-scan", "longconv-conv", "bi-concat", "mamba-width1-conv"])
def test_other_modes_under_autocast(make):
    torch.manual_seed(1)
    check_autocast_close(make(), torch.randn(2, 24, 16), "mode")


@settings(max_examples=6, deadline=None)
@given(name=st.sampled_from(["mamba", "mamba2", "h3", "rglru", "attn", "s4d"]), batch=st.integers(1, 2),
       length=st.integers(1, 33), seed=st.integers(0, 99), dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_autocast_small_shapes(name, batch, length, seed, dtype):
    torch.manual_seed(seed)
    layer = build_mixer(name, 8, {})
    check_autocast_close(layer, torch.randn(batch, length, 8), f"{name} {batch}x{length} {dtype}", dtype)


@pytest.mark.parametrize("name", [n for n in mixer_names() if not n.startswith("bi-")])
def test_bfloat16_inputs_and_states_under_autocast(name):
    """A bfloat16 input (an earlier autocast projection's output) is accepted; the states are float32 (but
    LongConv's, which holds its raw inputs) and
    passing them from piece to piece equals the whole forward, within one bfloat16 rounding."""
    torch.manual_seed(2)
    layer = build_mixer(name, 16, {})
    x = torch.randn(2, 20, 16).bfloat16()
    if getattr(layer, "takes_residual", False):  # needs the model's embeddings and shared blocks: a whole model
        model = CausalLM(ModelConfig(d_model=16, pattern=f"{name}*2", vocab_size=32))
        ids = torch.randint(0, 32, (2, 20))
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            whole, first = model(ids).logits, model(ids[:, :7], return_final_state=True)
            y1, s, y2 = first.logits, first.state.layers[0], model(ids[:, 7:], initial_state=first.state).logits
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            whole = layer(x)
            y1, s = layer(x[:, :7], return_final_state=True)
            y2 = layer(x[:, 7:], s)
    raw = (torch.bfloat16,) if name == "longconv" else ()  # LongConv's state is its last inputs, kept exactly
    assert all(t.dtype in (torch.float32, torch.complex64, torch.long, *raw) for t in s.tensors().values()), name
    assert rel_l2(torch.cat([y1, y2], 1).float(), whole.float()) <= OUT_TOL, name


def test_outside_autocast_a_dtype_mismatch_is_still_an_error():
    layer = build_mixer("mamba", 16, {})
    with pytest.raises(TypeError, match=r"^Mamba: x has dtype torch.bfloat16 but the layer's parameters are "
                                        r"torch.float32; cast the input or the layer explicitly$"):
        layer(torch.randn(1, 4, 16).bfloat16())
    with pytest.raises(TypeError, match=r"LongConv: x has dtype torch.bfloat16"):
        LongConv(16)(torch.randn(1, 4, 16).bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match=r"x has dtype torch.float16"):
        layer(torch.randn(1, 4, 16).half())  # only autocast's own dtype is let through


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_whole_causal_lm_under_autocast(dtype):
    torch.manual_seed(3)
    cfg = ModelConfig(d_model=16, pattern="mamba,mamba2,s4d,s4,h3,longconv,gated,rglru,attn", vocab_size=32,
                      mlp="gelu")
    model = CausalLM(cfg)
    ids = torch.randint(0, 32, (2, 20), generator=torch.Generator().manual_seed(0))
    check_autocast_close(model, ids, "CausalLM", dtype)
