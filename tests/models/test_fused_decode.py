"""A pure-Mamba backbone steps in one kernel launch: same logits and states as stepping block by block, and
backbones that do not fit (MLPs, LayerNorm, other mixers, active dropout) keep the block-by-block path."""

from __future__ import annotations

import copy
import gc
import subprocess
import sys

import pytest
import torch

from ssmkit.infer import quantize_weights
from ssmkit.models import CausalLM, ModelConfig, fused_decode
from ssmkit.models.fused_decode import fused_step, stack_plan
from ssmkit.models.outputs import ModelState
from ssmkit.ops import fused_kernels


def blockwise_step(model, ids, state):
    """The reference: embedding, each block's own step, final norm, LM head (torch ops only)."""
    bb = model.backbone
    h = bb.embed(ids)
    new = []
    with fused_kernels(False):
        for block, s in zip(bb.blocks, state.layers, strict=True):
            h, s = block.step(h, s)
            new.append(s)
        return model.lm_head(bb.final_norm(h)), ModelState(new)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_step_equals_blockwise(dtype, bias):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=24, n_layers=3, vocab_size=50, mixer_options={"mamba": {"bias": bias}})
    model = CausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert stack_plan(model.backbone) is not None
    state = model.init_state(3)
    ref_state = model.init_state(3)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    with torch.no_grad():
        for t in range(4):
            ids = torch.tensor([t, 7, 49])
            h = model.backbone.embed(ids)
            assert fused_step(model.backbone, h, state) is not None
            logits, state = model.step(ids, state)
            want, ref_state = blockwise_step(model, ids, ref_state)
            torch.testing.assert_close(logits, want, rtol=tol, atol=tol)
            for a, b in zip(state.layers, ref_state.layers, strict=True):
                torch.testing.assert_close(a.conv, b.conv, rtol=tol, atol=tol)
                torch.testing.assert_close(a.ssm, b.ssm, rtol=tol, atol=tol)


def test_int8_model_fused_equals_blockwise():
    torch.manual_seed(1)
    q = quantize_weights(CausalLM(ModelConfig(d_model=32, n_layers=2, vocab_size=40)).eval())
    state, ref_state = q.init_state(2), q.init_state(2)
    with torch.no_grad():
        for t in range(3):
            ids = torch.tensor([t, 5])
            logits, state = q.step(ids, state)
            want, ref_state = blockwise_step(q, ids, ref_state)
            torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [{"mlp": "swiglu"}, {"norm": "layernorm"}, {"pattern": "mamba,gated"},
                                       {"pattern": "mamba,mamba2"}])
def test_other_backbones_step_block_by_block(overrides):
    cfg = ModelConfig(**{"d_model": 16, "n_layers": 2, "vocab_size": 30, **overrides})
    model = CausalLM(cfg).eval()
    assert stack_plan(model.backbone) is None
    state = model.init_state(1)
    with torch.no_grad():
        logits, _ = model.step(torch.tensor([3]), state)
        want, _ = blockwise_step(model, torch.tensor([3]), model.init_state(1))
    torch.testing.assert_close(logits, want, rtol=2e-5, atol=2e-5)


def test_active_dropout_and_gradients_skip_the_kernel():
    model = CausalLM(ModelConfig(d_model=16, n_layers=2, vocab_size=30, dropout=0.1)).train()
    assert stack_plan(model.backbone) is None
    model.eval()
    assert stack_plan(model.backbone) is not None
    logits, _ = model.step(torch.tensor([1]), model.init_state(1))  # grad mode on, parameters need grad
    logits.sum().backward()
    assert model.lm_head.weight.grad is not None


def test_copies_of_a_stepped_model_are_independent():
    model = CausalLM(ModelConfig(d_model=16, n_layers=2, vocab_size=30)).eval()
    with torch.no_grad():
        model.step(torch.tensor([1]), model.init_state(1))
        twin = copy.deepcopy(model)
        for p in twin.parameters():
            p.mul_(0.5)
        a, _ = model.step(torch.tensor([2]), model.init_state(1))
        b, _ = twin.step(torch.tensor([2]), twin.init_state(1))
        want, _ = blockwise_step(twin, torch.tensor([2]), twin.init_state(1))
    torch.testing.assert_close(b, want, rtol=2e-5, atol=2e-5)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("change", ["parameter", "data", "load_assign", "eps"])
def test_the_cached_plan_follows_changes_to_the_model(change):
    torch.manual_seed(3)
    model = CausalLM(ModelConfig(d_model=16, n_layers=2, vocab_size=30)).eval()
    ids = torch.tensor([4])
    with torch.no_grad():
        model.step(ids, model.init_state(1))  # builds and caches the plan
        mixer = model.backbone.blocks[1].mixer
        new = torch.randn_like(mixer.in_proj.weight)
        if change == "parameter":
            mixer.in_proj.weight = torch.nn.Parameter(new)
        elif change == "data":
            mixer.in_proj.weight.data = new
        elif change == "load_assign":
            sd = {k: v.clone() * 1.5 for k, v in model.state_dict().items()}
            model.load_state_dict(sd, assign=True)
        else:
            for block in model.backbone.blocks:
                block.norm.eps = 0.5
            model.backbone.final_norm.eps = 0.5
        got, _ = model.step(ids, model.init_state(1))
        want, _ = blockwise_step(model, ids, model.init_state(1))
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_torch_hooks_only_while_a_model_holds_a_fused_plan():
    """torch's module/parameter/buffer registration hooks are process-wide: importing ssmkit must not install
    them, and they go away with the last model that holds a fused plan."""
    code = ("import torch.nn.modules.module as m, ssmkit.models, ssmkit.models.fused_decode, ssmkit.infer; "
            "assert not (m._global_parameter_registration_hooks or m._global_buffer_registration_hooks "
            "or m._global_module_registration_hooks)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    hooks = torch.nn.modules.module._global_module_registration_hooks

    def ours() -> bool:
        return any(h is fused_decode._count_registration for h in hooks.values())

    gc.collect()
    held = fused_decode._HOLDERS[0]
    model = CausalLM(ModelConfig(d_model=16, n_layers=2, vocab_size=30)).eval()
    with torch.no_grad():
        model.step(torch.tensor([1]), model.init_state(1))
    assert ours() and fused_decode._HOLDERS[0] == held + 1
    del model
    gc.collect()
    assert fused_decode._HOLDERS[0] == held and ours() == (held > 0)
