"""A pure Mamba-3 backbone steps in one kernel launch (ops/_numba_decode_mamba3.py): in float64 the same logits and
states as stepping block by block through Mamba3.step (its step kernel) and as the full forward, SISO and MIMO,
with and without the layer's options; branching a state; generate; the cached plan follows model changes; other
stacks keep the block path. Float64 only: one compiled specialisation of the kernel for the file."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.infer import generate, quantize_weights
from ssmkit.layers import Mamba3
from ssmkit.models import CausalLM, ModelConfig
from ssmkit.models.fused_decode import fused_step, run_plans, stack_plan
from ssmkit.models.outputs import ModelState
from ssmkit.ops import fused_kernels
from ssmkit.ops.mamba3_stack import Mamba3StackPlan, mamba3_stack_step

TOL = 1e-12
CONFIGS = {
    "siso": {"d_state": 8, "headdim": 4},
    "siso-groups-bias-fullrope": {"d_state": 8, "headdim": 4, "ngroups": 2, "bias": True, "rope_fraction": 1.0},
    "mimo2-groups-bias": {"d_state": 8, "headdim": 4, "ngroups": 2, "mimo_rank": 2, "bias": True},
}


def model_of(opts: dict, seed: int = 0, d_model: int = 16, n_layers: int = 2, **cfg) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig(**{"d_model": d_model, "n_layers": n_layers, "vocab_size": 40, "pattern": "mamba3",
                                    "mixer_options": {"mamba3": opts}, **cfg})).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # move every parameter off its initial value (B/C biases, D, mimo_*, norms)
            p.add_(0.2 * torch.randn_like(p))
    return model


def blockwise_step(model, ids, state):
    """The reference: embedding, each block's own step (Mamba3.step: its step kernel on these small states),
    final norm, LM head."""
    bb = model.backbone
    h = bb.embed(ids)
    new = []
    for block, s in zip(bb.blocks, state.layers, strict=True):
        h, s = block.step(h, s)
        new.append(s)
    return model.lm_head(bb.final_norm(h)), ModelState(new)


def assert_states_close(a: ModelState, b: ModelState, tol: float = TOL) -> None:
    for x, y in zip(a.layers, b.layers, strict=True):
        assert type(x) is type(y)
        for f in dataclasses.fields(x):
            torch.testing.assert_close(getattr(x, f.name), getattr(y, f.name), rtol=tol, atol=tol)


def check_steps(model, batch: int, steps: int) -> None:
    state, ref_state = model.init_state(batch), model.init_state(batch)
    with torch.no_grad():
        for t in range(steps):
            ids = (torch.arange(batch) * 7 + 3 * t) % 40
            before = [s.ssm.clone() for s in state.layers]
            assert fused_step(model.backbone, model.backbone.embed(ids), state, model.lm_head) is not None
            assert all(torch.equal(a, s.ssm) for a, s in zip(before, state.layers, strict=True))  # inputs kept
            logits, state = model.step(ids, state)
            want, ref_state = blockwise_step(model, ids, ref_state)
            torch.testing.assert_close(logits, want, rtol=TOL, atol=TOL)
            assert_states_close(state, ref_state)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_step_equals_block_by_block(name, batch):
    model = model_of(CONFIGS[name])
    assert isinstance(stack_plan(model.backbone, model.lm_head), Mamba3StackPlan)
    check_steps(model, batch, steps=4)


@pytest.mark.parametrize("name", ["siso", "mimo2-groups-bias"])
def test_steps_after_a_prefill_equal_the_full_forward(name):
    """The state of the fused sequence kernel, stepped on by the stack kernel, gives the full forward's logits."""
    model = model_of(CONFIGS[name], seed=1, n_layers=3)
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        _, state = model.backbone(ids[:, :5], return_final_state=True, input_name="input_ids")
        for t in range(5, 9):
            logits, state = model.step(ids[:, t], state)
            torch.testing.assert_close(logits, full[:, t], rtol=1e-10, atol=1e-10)


def test_branching_a_state_leaves_it_unchanged():
    """Two continuations from one state (speculation, retries) each equal the block path; the state survives."""
    model = model_of(CONFIGS["mimo2-groups-bias"], seed=3)
    with torch.no_grad():
        _, state = model.step(torch.tensor([1, 2]), model.init_state(2))
        kept = [dataclasses.replace(s, **{f.name: getattr(s, f.name).clone() for f in dataclasses.fields(s)})
                for s in state.layers]
        for ids in (torch.tensor([5, 6]), torch.tensor([7, 8])):
            got, new = model.step(ids, state)
            want, ref = blockwise_step(model, ids, state)
            torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
            assert_states_close(new, ref)
            got2, _ = model.step(torch.tensor([9, 9]), new)  # stepping on from a fused state
            torch.testing.assert_close(got2, blockwise_step(model, torch.tensor([9, 9]), ref)[0], rtol=TOL, atol=TOL)
        assert_states_close(state, ModelState(kept), tol=0)


def test_generate_tokens_equal_the_unfused_path():
    model = model_of(CONFIGS["siso-groups-bias-fullrope"], seed=4)
    ids = torch.randint(0, 40, (3, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fused = generate(model, ids, 8, prompt_lengths=[6, 3, 5])
        with fused_kernels(False):
            plain = generate(model, ids, 8, prompt_lengths=[6, 3, 5])
    assert torch.equal(fused, plain)


@pytest.mark.parametrize("change", ["data", "inplace", "a_floor", "bc_eps", "block_eps"])
def test_the_cached_plan_follows_changes_to_the_model(change):
    model = model_of(CONFIGS["siso"], seed=6)
    ids = torch.tensor([4, 9])
    with torch.no_grad():
        model.step(ids, model.init_state(2))  # builds and caches the plan
        mixer = model.backbone.blocks[1].mixer
        if change == "data":
            mixer.in_proj.weight.data = torch.randn_like(mixer.in_proj.weight)
        elif change == "inplace":
            mixer.B_bias.add_(0.5)
        elif change == "a_floor":
            mixer.A_floor = 0.7
        elif change == "bc_eps":
            mixer.C_norm.eps = 0.3
        else:
            for block in model.backbone.blocks:
                block.norm.eps = 0.5
            model.backbone.final_norm.eps = 0.5
        got, _ = model.step(ids, model.init_state(2))
        want, _ = blockwise_step(model, ids, model.init_state(2))
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("kind", ["mixed", "mlp", "quantized", "shapes"])
def test_other_stacks_take_the_block_path(kind):
    opts = CONFIGS["siso"]
    if kind == "mixed":  # mamba3 beside other mixers: no stack launch, and no run of one in a hybrid either
        model = model_of(opts, pattern="mamba3,attn,mamba3", n_layers=None,
                         mixer_options={"mamba3": opts, "attn": {"n_heads": 2}})
        assert run_plans(model.backbone) is None
    elif kind == "mlp":
        model = model_of(opts, mlp="swiglu")
    elif kind == "quantized":  # int8 weights: float32 models only; only planned here (no float32 kernel compile)
        model = quantize_weights(model_of(opts).float(), bits=8)
        assert type(model.backbone.blocks[0].mixer.in_proj) is not torch.nn.Linear
        assert stack_plan(model.backbone, model.lm_head) is None
        return
    else:  # Mamba-3 layers of different shapes
        model = model_of(opts)
        model.backbone.blocks[1].mixer = Mamba3(16, **{**opts, "d_state": 12}).double()
    assert stack_plan(model.backbone, model.lm_head) is None
    with torch.no_grad():
        logits, _ = model.step(torch.tensor([3]), model.init_state(1))
    assert torch.isfinite(logits).all()


def test_gradients_take_the_block_path():
    model = model_of(CONFIGS["siso"], seed=7)
    assert fused_step(model.backbone, model.backbone.embed(torch.tensor([1])), model.init_state(1),
                      model.lm_head) is None  # grad mode on, parameters need gradients
    logits, _ = model.step(torch.tensor([3]), model.init_state(1))
    logits.sum().backward()
    assert model.backbone.blocks[0].mixer.B_bias.grad is not None


@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 3), heads_per_group=st.integers(1, 2), ngroups=st.integers(1, 2),
       headdim=st.integers(1, 5), half_n=st.integers(1, 5), rank=st.sampled_from([None, 1, 3]),
       full_rope=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_shapes_vary(batch, heads_per_group, ngroups, headdim, half_n, rank, full_rope, bias, seed):
    heads = heads_per_group * ngroups
    opts = {"d_state": 2 * half_n, "headdim": headdim, "ngroups": ngroups, "mimo_rank": rank, "bias": bias,
            "rope_fraction": 1.0 if full_rope else 0.5, "expand": 1}
    if (2 * half_n) * opts["rope_fraction"] < 2:
        opts["rope_fraction"] = 1.0
    model = model_of(opts, seed=seed, d_model=heads * headdim, n_layers=2)
    assert isinstance(stack_plan(model.backbone, model.lm_head), Mamba3StackPlan)
    check_steps(model, batch, steps=2)


def test_bad_input_gets_one_line_errors():
    model = model_of(CONFIGS["mimo2-groups-bias"])
    plan = stack_plan(model.backbone, model.lm_head)
    state = model.init_state(2)
    states = [(s.angle, s.ssm, s.k, s.x) for s in state.layers]
    h = torch.zeros(2, 16, dtype=torch.float64)
    with torch.no_grad():
        mamba3_stack_step(h, plan, states)
        bad = [((h[:, :5], plan, states), "h must be"), ((h.float(), plan, states), "h must be"),
               ((h, plan, states[:1]), "layer states"),
               ((h, plan, [states[0], (states[1][0], states[1][1], states[1][2][:, 0], states[1][3])]),
                r"states\[1\]\.k must be"),
               ((h, object(), states), "plan must be")]
        for args, match in bad:
            with pytest.raises(ValueError, match=match) as e:
                mamba3_stack_step(*args)
            assert "\n" not in str(e.value)
        w = plan.layers[0]
        with pytest.raises(ValueError, match=r"layers\[1\]\.d must have shape") as e:
            Mamba3StackPlan([w, w._replace(d=w.d[:2])], plan.norm_weights, plan.final_weight)
        assert "\n" not in str(e.value)
