"""Optimizer parameter groups (weight-decay exclusions), the lr schedule and gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.models import CausalLM, ModelConfig
from ssmkit.train import LRSchedule, TrainConfig, build_optimizer, clip_gradients, param_groups


def _groups(pattern: str, **kw) -> tuple[set[str], set[str]]:
    model = CausalLM(ModelConfig(d_model=16, pattern=pattern, vocab_size=32, **kw))
    groups = {g["name"]: set(g["param_names"]) for g in param_groups(model, 0.1)}
    return groups.get("decay", set()), groups.get("no_decay", set())


def test_mamba_exclusions():
    decay, no_decay = _groups("mamba*2", mlp="gelu")
    for i in range(2):
        m = f"backbone.blocks.{i}.mixer."
        for name in ("A_log", "D", "dt_proj.bias", "conv1d.bias"):
            assert m + name in no_decay, name
        for name in ("in_proj.weight", "x_proj.weight", "dt_proj.weight", "out_proj.weight", "conv1d.weight"):
            assert m + name in decay, name
        assert f"backbone.blocks.{i}.norm.weight" in no_decay
        assert f"backbone.blocks.{i}.mlp_norm.weight" in no_decay
        assert f"backbone.blocks.{i}.mlp.fc_in.bias" in no_decay
        assert f"backbone.blocks.{i}.mlp.fc_in.weight" in decay
    assert "backbone.final_norm.weight" in no_decay
    assert "backbone.embedding.weight" in decay
    # the tied LM head is the embedding: listed once
    assert "lm_head.weight" not in decay | no_decay


def test_mamba2_s4d_s4_rglru_attn_exclusions():
    _, nd = _groups("mamba2")
    assert {"backbone.blocks.0.mixer.dt_bias", "backbone.blocks.0.mixer.A_log", "backbone.blocks.0.mixer.D",
            "backbone.blocks.0.mixer.norm.weight"} <= nd
    decay, nd = _groups("s4d")
    m = "backbone.blocks.0.mixer."
    assert {m + "log_dt", m + "A_log_re", m + "A_im", m + "B", m + "D"} <= nd  # SSM dynamics, B is 3-d
    assert m + "C" in decay and m + "out.1.weight" in decay
    _, nd = _groups("s4")
    assert {m + "P", m + "B", m + "Lambda_log_re", m + "Lambda_im", m + "log_dt"} <= nd
    _, nd = _groups("h3")
    assert {m + "ssm.B", m + "ssm.A_log_re", m + "ssm.log_dt"} <= nd
    _, nd = _groups("rglru")
    assert m + "lam" in nd
    decay, nd = _groups("attn")
    assert m + "qkv.weight" in decay and m + "qkv.bias" in nd


def test_groups_partition_all_parameters_and_decay_values():
    model = CausalLM(ModelConfig(d_model=16, pattern="mamba,attn", vocab_size=32, mlp="swiglu"))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.3, lr=2e-3))
    got = [id(p) for g in opt.param_groups for p in g["params"]]
    want = {id(p) for p in model.parameters()}
    assert len(got) == len(set(got)) == len(want) and set(got) == want
    wd = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert wd == {"decay": 0.3, "no_decay": 0.0}
    assert all(g["base_lr"] == 2e-3 for g in opt.param_groups)


def test_no_decay_params_are_untouched_by_weight_decay():
    """With zero gradients AdamW only decays: decayed matrices change, excluded ones stay bitwise equal."""
    model = CausalLM(ModelConfig(d_model=16, pattern="mamba", vocab_size=32))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.5, lr=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    nd = set(next(g for g in opt.param_groups if g["name"] == "no_decay")["param_names"])
    for n, p in model.named_parameters():
        if n in nd:
            assert torch.equal(p, before[n]), n
        elif before[n].abs().sum() > 0:
            assert not torch.equal(p, before[n]), n


def test_schedule_values():
    s = LRSchedule(total_steps=110, warmup_steps=10, kind="cosine", min_ratio=0.1)
    assert s.factor(0) == pytest.approx(0.1)
    assert s.factor(4) == pytest.approx(0.5)
    assert s.factor(9) == pytest.approx(1.0)
    assert s.factor(10) == pytest.approx(1.0)
    assert s.factor(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert s.factor(110) == pytest.approx(0.1)
    assert s.factor(500) == pytest.approx(0.1)
    lin = LRSchedule(total_steps=110, warmup_steps=10, kind="linear", min_ratio=0.0)
    assert lin.factor(35) == pytest.approx(0.75)
    assert LRSchedule(100, 0, "constant").factor(99) == 1.0
    with pytest.raises(ValueError, match="kind"):
        LRSchedule(10, 0, "exp").factor(5)


@given(total=st.integers(1, 500), warmup=st.integers(0, 50), ratio=st.floats(0.0, 1.0))
def test_schedule_bounds_and_monotone_decay(total, warmup, ratio):
    s = LRSchedule(total, warmup, "cosine", ratio)
    f = [s.factor(i) for i in range(total + 2)]
    assert all(ratio - 1e-12 <= v <= 1.0 + 1e-12 for v in f[warmup:])
    assert all(a >= b - 1e-12 for a, b in zip(f[warmup:], f[warmup + 1:], strict=False))
    assert all(a < b for a, b in zip(f[:warmup], f[1:warmup], strict=False))


def test_schedule_apply_sets_group_lrs():
    model = CausalLM(ModelConfig(d_model=8, pattern="mamba", vocab_size=16))
    cfg = TrainConfig(lr=0.01, warmup_steps=4, steps=20)
    opt = build_optimizer(model, cfg)
    LRSchedule.from_config(cfg).apply(opt, 1)
    assert all(g["lr"] == pytest.approx(0.005) for g in opt.param_groups)


def test_clip_gradients():
    model = torch.nn.Linear(3, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, 2.0)
    total = math.sqrt(8 * 4.0)
    assert clip_gradients(model, 0) == pytest.approx(total)  # 0: report only
    assert clip_gradients(model, 1.0) == pytest.approx(total)
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert float(norm) == pytest.approx(1.0, rel=1e-5)
