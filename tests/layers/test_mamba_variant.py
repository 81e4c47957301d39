"""Mamba's opt-in Mamba-2 block choices (out_norm, dt_source='in_proj'): the default block is untouched, the
variant matches a loop oracle and the layer contract in float64, and every fast path refuses it or falls back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssmkit.export.gguf import check_exportable
from ssmkit.export.onnx_step import check_onnx_exportable
from ssmkit.infer import quantize_w8a8, quantize_weights
from ssmkit.infer.fused_spec import fused_plan
from ssmkit.infer.multitoken import forward_snapshots
from ssmkit.infer.tree import tree_supported
from ssmkit.infer.w8a8_step import enable_w8a8_step
from ssmkit.interop.mixers import mixer_to_transformers
from ssmkit.layers import Mamba
from ssmkit.models import CausalLM, ModelConfig
from ssmkit.models.fused_decode import run_plans, stack_plan
from ssmkit.train.presets import preset_fields
from tests.layers.contract import (
    assert_close,
    check_contract,
    check_gradcheck_with_state,
    check_reverse_contract,
)

VARIANTS = [dict(out_norm=True), dict(dt_source="in_proj"), dict(out_norm=True, dt_source="in_proj")]
BOTH = VARIANTS[2]


def _perturbed(layer: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def _oracle(m: Mamba, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token loop: x (b, l, d_model) -> (b, l, d_model), written from the block's definition."""
    di, N = m.d_inner, m.d_state
    proj = m.in_proj(x)
    xi, z = proj[..., :di], proj[..., di:2 * di]
    u = F.silu(m.conv1d(xi, None)[0])
    xp = m.x_proj(u)
    if m.dt_source == "in_proj":
        dt, bias, (B, C) = proj[..., 2 * di:], m.dt_bias, xp.split([N, N], -1)
    else:
        dt = xp[..., :m.dt_rank] @ m.dt_proj.weight.T
        bias, B, C = m.dt_proj.bias, xp[..., m.dt_rank:m.dt_rank + N], xp[..., m.dt_rank + N:]
    A = -torch.exp(m.A_log)
    h = torch.zeros(x.shape[0], di, N, dtype=x.dtype)
    ys = []
    for t in range(x.shape[1]):
        delta = F.softplus(dt[:, t] + bias)  # (b, di)
        h = torch.exp(delta[..., None] * A) * h + (delta * u[:, t])[..., None] * B[:, t, None, :]
        y = (h * C[:, t, None, :]).sum(-1) + m.D * u[:, t]
        g = y * F.silu(z[:, t])
        if m.out_norm:
            g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + m.norm.eps) * m.norm.weight
        ys.append(m.out_proj(g))
    return torch.stack(ys, 1)


def test_default_block_unchanged():
    torch.manual_seed(3)
    a = Mamba(16)
    torch.manual_seed(3)
    b = Mamba(16, out_norm=False, dt_source="x_proj")
    assert sorted(a.state_dict()) == ["A_log", "D", "conv1d.bias", "conv1d.weight", "dt_proj.bias",
                                      "dt_proj.weight", "in_proj.weight", "out_proj.weight", "x_proj.weight"]
    assert not a.variant and a.in_proj.out_features == 64 and a.x_proj.out_features == 1 + 32
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), k
    x = torch.randn(2, 7, 16)
    assert torch.equal(a(x), b(x))
    a.step_weights()  # the step kernels still take the default block


@pytest.mark.parametrize("opts", VARIANTS, ids=["out_norm", "dt_in_proj", "both"])
def test_variant_matches_oracle_and_contract(opts):
    torch.manual_seed(0)
    m = _perturbed(Mamba(8, d_state=4, **opts).double())
    assert m.variant
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        assert_close(m(x), _oracle(m, x), 1e-10, "variant vs loop oracle")
    seqs = [torch.randn(1, n, 8, dtype=torch.float64) for n in (3, 5, 2)]
    check_contract(m, x, 4, seqs)


def test_variant_reverse_and_gradients():
    torch.manual_seed(1)
    rev = _perturbed(Mamba(8, d_state=4, reverse=True, **BOTH).double())
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    check_reverse_contract(rev, x, 3, [torch.randn(1, n, 8, dtype=torch.float64) for n in (4, 3)])
    m = _perturbed(Mamba(4, d_state=2, expand=1, **BOTH).double())
    state = m.init_state(1, dtype=torch.float64)
    state.conv.normal_(), state.ssm.normal_()
    check_gradcheck_with_state(m, torch.randn(1, 4, 4, dtype=torch.float64), state)


def test_bad_options():
    with pytest.raises(TypeError, match="out_norm must be a bool"):
        Mamba(8, out_norm=1)
    with pytest.raises(ValueError, match="dt_source must be 'x_proj' or 'in_proj'"):
        Mamba(8, dt_source="conv")
    with pytest.raises(ValueError, match="step kernels take only the default block"):
        Mamba(8, **BOTH).step_weights()


def _model(dtype=torch.float64) -> CausalLM:
    torch.manual_seed(2)
    model = CausalLM(ModelConfig(d_model=16, n_layers=2, vocab_size=20, mixer_options={"mamba": dict(BOTH)}))
    return _perturbed(model.to(dtype)).eval()


def _decode_equals_forward(model: CausalLM, tol: float) -> None:
    ids = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        state = model.init_state(2)
        got = []
        for t in range(ids.shape[1]):
            logits, state = model.step(ids[:, t], state)
            got.append(logits)
    assert_close(torch.stack(got, 1), want, tol, "decode vs forward")


def test_variant_model_decode_falls_back():
    model = _model()
    assert stack_plan(model.backbone) is None and run_plans(model.backbone) is None
    with torch.no_grad():
        assert fused_plan(model, model.init_state(2)) is None
    _decode_equals_forward(model, 1e-10)


def test_variant_quantized_decode_equals_its_forward():
    q = quantize_weights(_model(torch.float32))
    _decode_equals_forward(q, 1e-4)
    w = enable_w8a8_step(quantize_w8a8(_model(torch.float32), [torch.randint(0, 20, (2, 6))]))
    assert all(type(b.mixer) is Mamba for b in w.backbone.blocks)
    _decode_equals_forward(w, 1e-4)


@pytest.mark.parametrize("opts", VARIANTS)
def test_variant_multi_token_pass_equals_forward(opts):
    """The speculative verify paths rebuild only the default block: a variant takes the generic path (or none)."""
    torch.manual_seed(3)
    model = _perturbed(CausalLM(ModelConfig(d_model=16, n_layers=2, vocab_size=20,
                                            mixer_options={"mamba": dict(opts)})).double()).eval()
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        got, _ = forward_snapshots(model, ids, model.init_state(2))
    assert_close(got, want, 1e-10, "forward_snapshots vs forward")
    assert not tree_supported(model)


def test_exports_and_interop_refuse_variant():
    torch.manual_seed(2)
    plain = CausalLM(ModelConfig(d_model=16, n_layers=2, vocab_size=20))  # the same model, default block: accepted
    check_exportable(plain)
    check_onnx_exportable(plain)
    model = _model(torch.float32)
    with pytest.raises(ValueError, match="out_norm=True"):
        check_exportable(model)
    with pytest.raises(ValueError, match="layer 0 is 'mamba'"):
        check_onnx_exportable(model)
    with pytest.raises(ValueError, match="no transformers MambaMixer equivalent"):
        mixer_to_transformers(model.backbone.blocks[0].mixer)


def test_preset_builds_the_variant():
    fields = preset_fields("mamba-m2blk")
    keep = ("pattern", "mixer_options", "d_model", "norm")
    cfg = ModelConfig(vocab_size=20, **{k: v for k, v in fields.items() if k in keep})
    mixers = [b.mixer for b in CausalLM(cfg).backbone.blocks]
    assert len(mixers) == 2 and all(m.out_norm and m.dt_source == "in_proj" for m in mixers)
