"""A pure Mamba-2 backbone steps in one kernel launch: the same logits and states as stepping block by block
(Mamba2.step in torch ops) and as the loop oracle, for float32/float64, int8 and int4 weights, batches > 1, and a
plan that follows changes to the model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.infer import quantize_weights
from ssmkit.infer.quantize import Int4Linear
from ssmkit.models import CausalLM, ModelConfig
from ssmkit.models.fused_decode import fused_step, mamba2_step_weights, run_plans, stack_plan
from ssmkit.models.outputs import ModelState
from ssmkit.ops import fused_kernels
from ssmkit.ops import reference_mamba2 as ref
from ssmkit.ops.mamba2_step import Mamba2StackPlan, Mamba2StepWeights, mamba2_step


def model_of(dtype=torch.float32, bias=False, ngroups=2, seed=0, **cfg) -> CausalLM:
    torch.manual_seed(seed)
    opts = {"d_state": 8, "headdim": 8, "ngroups": ngroups, "bias": bias, "chunk_size": 4}
    model = CausalLM(ModelConfig(**{"d_model": 32, "n_layers": 2, "vocab_size": 50, "pattern": "mamba2",
                                    "mixer_options": {"mamba2": opts}, **cfg})).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def blockwise_step(model, ids, state):
    """The reference: embedding, each block's own step in torch ops, final norm, LM head."""
    bb = model.backbone
    h = bb.embed(ids)
    new = []
    with fused_kernels(False):
        for block, s in zip(bb.blocks, state.layers, strict=True):
            h, s = block.step(h, s)
            new.append(s)
        return model.lm_head(bb.final_norm(h)), ModelState(new)


def oracle_step(model, ids, state):
    """The loop oracle in float64 on the model's (dequantized) weights."""
    bb = model.backbone
    layers = [mamba2_step_weights(b.mixer) for b in bb.blocks]
    head = stack_plan(bb, model.lm_head).head
    _, convs, ssms, logits = ref.mamba2_stack_step(
        bb.embed(ids).double(), layers, [b.norm.weight.double() for b in bb.blocks], bb.final_norm.eps,
        bb.final_norm.weight.double(), bb.final_norm.eps, [s.conv.double() for s in state.layers],
        [s.ssm.double() for s in state.layers], head=head)
    return logits, convs, ssms


def check_steps(model, batch: int, steps: int, tol: float, oracle_tol: float) -> None:
    state, ref_state, orc_state = model.init_state(batch), model.init_state(batch), model.init_state(batch)
    with torch.no_grad():
        for t in range(steps):
            ids = torch.arange(t, t + batch) % 50
            before = [s.ssm.clone() for s in state.layers]
            assert fused_step(model.backbone, model.backbone.embed(ids), state, model.lm_head) is not None
            assert all(torch.equal(a, s.ssm) for a, s in zip(before, state.layers, strict=True))  # inputs kept
            logits, state = model.step(ids, state)
            want, ref_state = blockwise_step(model, ids, ref_state)
            torch.testing.assert_close(logits, want, rtol=tol, atol=tol)
            for a, b in zip(state.layers, ref_state.layers, strict=True):
                torch.testing.assert_close(a.conv, b.conv, rtol=tol, atol=tol)
                torch.testing.assert_close(a.ssm, b.ssm, rtol=tol, atol=tol)
            got, convs, ssms = oracle_step(model, ids, orc_state)
            orc_state = ModelState([type(s)(conv=c.to(s.conv.dtype), ssm=m.to(s.ssm.dtype))
                                    for s, c, m in zip(orc_state.layers, convs, ssms, strict=True)])
            torch.testing.assert_close(logits.double(), got, rtol=oracle_tol, atol=oracle_tol)
            for a, m in zip(state.layers, ssms, strict=True):
                torch.testing.assert_close(a.ssm.double(), m, rtol=oracle_tol, atol=oracle_tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_step_equals_blockwise_and_oracle(dtype, bias):
    model = model_of(dtype, bias)
    assert isinstance(stack_plan(model.backbone, model.lm_head), Mamba2StackPlan)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    check_steps(model, batch=3, steps=4, tol=tol, oracle_tol=tol if dtype == torch.float64 else 1e-4)


def test_quantized_fused_step_equals_blockwise_and_oracle():
    """int8 in_proj, int4 out_proj and LM head in one model: both quantized row products in one kernel compile
    (each numba specialisation costs ~15 s of CPU; all-int8 and all-int4 models run the same code)."""
    base = model_of(ngroups=1, seed=1)
    q = quantize_weights(base, bits=8)
    for blk, orig in zip(q.backbone.blocks, base.backbone.blocks, strict=True):
        blk.mixer.out_proj = Int4Linear.from_linear(orig.mixer.out_proj)
    q.lm_head = Int4Linear.from_linear(base.lm_head)
    plan = stack_plan(q.backbone, q.lm_head)
    w = plan.layers[0]
    assert w.in_w.dtype == w.out_w.dtype == torch.int8 and (w.in_scale.ndim, w.out_scale.ndim) == (1, 2)
    assert plan.head[1].ndim == 2
    check_steps(q, batch=2, steps=3, tol=2e-5, oracle_tol=1e-4)


def test_step_continues_a_prefill():
    """The state of the chunked SSD forward, stepped on by the fused kernel, gives the full forward's logits."""
    model = model_of(torch.float64)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        _, state = model.backbone(ids[:, :6], return_final_state=True, input_name="input_ids")
        for t in range(6, 9):
            logits, state = model.step(ids[:, t], state)
            torch.testing.assert_close(logits, full[:, t], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("change", ["data", "inplace_a_log", "parameter", "gated_eps", "dt_limit", "block_eps"])
def test_the_cached_plan_follows_changes_to_the_model(change):
    model = model_of(torch.float64, seed=3)
    ids = torch.tensor([4, 9])
    with torch.no_grad():
        model.step(ids, model.init_state(2))  # builds and caches the plan
        mixer = model.backbone.blocks[1].mixer
        if change == "data":
            mixer.in_proj.weight.data = torch.randn_like(mixer.in_proj.weight)
        elif change == "inplace_a_log":
            mixer.A_log.add_(0.5)
        elif change == "parameter":
            mixer.out_proj.weight = torch.nn.Parameter(2 * mixer.out_proj.weight)
        elif change == "gated_eps":
            mixer.norm.eps = 0.3
        elif change == "dt_limit":
            mixer.dt_limit = (0.05, 0.07)
        else:
            for block in model.backbone.blocks:
                block.norm.eps = 0.5
            model.backbone.final_norm.eps = 0.5
        got, _ = model.step(ids, model.init_state(2))
        want, _ = blockwise_step(model, ids, model.init_state(2))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("overrides", [{"mlp": "swiglu"}, {"pattern": "mamba2,mamba"}, {"norm": "layernorm"}])
def test_other_stacks_and_gradients_take_the_blockwise_path(overrides):
    model = model_of(**overrides)
    assert stack_plan(model.backbone) is None
    logits, _ = model.step(torch.tensor([3]), model.init_state(1))  # grad mode on: needs no fused plan
    logits.sum().backward()


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 3), heads_per_group=st.integers(1, 3), ngroups=st.integers(1, 2),
       headdim=st.integers(1, 5), n=st.integers(1, 6), width=st.integers(1, 4), d_model=st.integers(1, 9),
       biases=st.booleans(), limit=st.booleans(), seed=st.integers(0, 2**16))
def test_single_mixer_step_matches_oracle(batch, heads_per_group, ngroups, headdim, n, width, d_model, biases,
                                          limit, seed):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return 0.5 * torch.randn(*shape, generator=g, dtype=torch.float64)

    heads = heads_per_group * ngroups
    di, n_conv = heads * headdim, heads * headdim + 2 * ngroups * n
    rows = di + n_conv + heads
    w = Mamba2StepWeights(
        in_w=r(rows, d_model), in_b=r(rows) if biases else None, conv_w=r(n_conv, width),
        conv_b=r(n_conv) if biases else None, dt_b=r(heads), a_log=r(heads), d=r(heads), norm_w=r(di),
        out_w=r(d_model, di), out_b=r(d_model) if biases else None, ngroups=ngroups,
        dt_limit=(0.1, 0.6) if limit else (0.0, float("inf")))
    x, conv, ssm = r(batch, d_model), r(batch, n_conv, width - 1), r(batch, heads, headdim, n)
    owner = torch.nn.Module()
    y, c, s = mamba2_step(x, w, conv, ssm, owner=owner)
    y2, _, _ = mamba2_step(x, w, conv, ssm, owner=owner)  # the cached plan
    want = ref.mamba2_step(x, w, conv, ssm)
    for got, exp in ((y, want[0]), (c, want[1]), (s, want[2]), (y2, want[0])):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)
    with fused_kernels(False):
        torch.testing.assert_close(mamba2_step(x, w, conv, ssm)[0], want[0], rtol=1e-10, atol=1e-10)


def test_bad_input_gets_one_line_errors():
    w = mamba2_step_weights(model_of(torch.float64).backbone.blocks[0].mixer)
    x = torch.zeros(2, 32, dtype=torch.float64)
    conv, ssm = torch.zeros(2, w.conv_w.shape[0], 3, dtype=torch.float64), torch.zeros(2, 8, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        mamba2_step(x, w, conv, ssm)
        for args, match in (((x, w, conv, ssm[:, :4]), "ssm_state must be"), ((x, w, conv[:, :5], ssm), "conv_state"),
                            ((x[:, :5], w, conv, ssm), "in_w must be"),
                            ((x, w._replace(ngroups=3), conv, ssm), "ngroups"),
                            ((x, w._replace(in_scale=torch.ones(3)), conv, ssm), "in_scale must be")):
            with pytest.raises(ValueError, match=match) as e:
                mamba2_step(*args)
            assert "\n" not in str(e.value)


def test_ragged_batch_decodes_each_row_as_alone():
    """generate with prompts of different lengths (rows at different positions) steps them together through the
    fused kernel; each row's tokens equal those of the row decoded alone."""
    from ssmkit.infer import generate

    model = model_of(torch.float64, seed=4)
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(5))
    lengths = [5, 2, 7]
    with torch.no_grad():
        assert isinstance(stack_plan(model.backbone, model.lm_head), Mamba2StackPlan)
        together = generate(model, ids, 6, prompt_lengths=lengths)
        for r, n in enumerate(lengths):
            torch.testing.assert_close(together[r], generate(model, ids[r:r + 1, :n], 6)[0], rtol=0, atol=0)


def test_a_plan_first_built_with_the_kernels_off_fuses_later():
    model = model_of(torch.float64, seed=6)
    ids = torch.tensor([1, 2])
    with torch.no_grad():
        with fused_kernels(False):
            want, _ = model.step(ids, model.init_state(2))
        assert fused_step(model.backbone, model.backbone.embed(ids), model.init_state(2), model.lm_head) is not None
        got, _ = model.step(ids, model.init_state(2))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pattern", ["mamba2*2,attn,mamba2,gated,mamba2*2", "attn,mamba*2,mamba2*2"])
def test_hybrid_steps_runs_of_mamba_blocks_in_one_launch(pattern):
    """A hybrid steps each run of plain Mamba / Mamba-2 blocks through one stack launch and the rest (attention
    with its KV cache, GatedSSM) block by block: logits and states equal the block-by-block step."""
    model = model_of(torch.float64, seed=7, pattern=pattern, n_layers=None,
                     mixer_options={"mamba2": {"d_state": 8, "headdim": 8, "ngroups": 2}, "mamba": {"d_state": 4},
                                    "attn": {"n_heads": 2}})
    runs = run_plans(model.backbone)
    fused = [(a, b) for a, b, plan in runs if plan is not None]
    assert stack_plan(model.backbone) is None and fused == ([(0, 2), (3, 4), (5, 7)] if pattern[0] == "m"
                                                             else [(1, 3), (3, 5)])
    state, ref_state = model.init_state(2), model.init_state(2)
    with torch.no_grad():
        for t in range(4):
            ids = torch.tensor([t, 40 - t])
            assert fused_step(model.backbone, model.backbone.embed(ids), state, model.lm_head) is not None
            logits, state = model.step(ids, state)
            want, ref_state = blockwise_step(model, ids, ref_state)
            torch.testing.assert_close(logits, want, rtol=1e-10, atol=1e-10)
            for a, b in zip(state.layers, ref_state.layers, strict=True):
                for f in dataclasses.fields(a):
                    torch.testing.assert_close(getattr(a, f.name), getattr(b, f.name), rtol=1e-10, atol=1e-10)
        model.backbone.blocks[-1].mixer.out_proj.weight.data = torch.randn_like(
            model.backbone.blocks[-1].mixer.out_proj.weight)  # the cached runs follow the change
        got, _ = model.step(torch.tensor([1, 2]), model.init_state(2))
        want, _ = blockwise_step(model, torch.tensor([1, 2]), model.init_state(2))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
