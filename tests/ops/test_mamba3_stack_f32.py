"""The fused Mamba-3 decode stack (ops/mamba3_stack.py, ops/_numba_decode_mamba3.py) in float32, the dtype models
run in: its logits and states against stepping block by block through Mamba3.step, SISO and MIMO, over several
tokens. The float64 tests (tests/models/test_fused_decode_mamba3.py) pin the exactness; this one checks the
float32 specialisation of the same kernel (one compile for the file).

Tolerance: both paths round every operation to float32 (unit roundoff 6e-8), and the kernel is compiled with
fastmath (reassociated sums), so they differ by a few ulps per operation; over 3 layers of ~100-term dot
products and 6 recurrent steps that grows to ~1e-6 relative (measured: 0.8e-6 SISO, 1.2e-6 MIMO against the
block path; both paths within 1.1e-6 of the float64 oracle of the same model). 1e-4 relative (to the logits'
size) leaves room for that and is still far below a real error (a wrong or skipped term moves the logits by
O(1e-2) or more). The float32 compile costs ~13 s of CPU in a fresh clone (no numba cache); 0.2 s cached."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ssmkit.models import CausalLM, ModelConfig
from ssmkit.models.fused_decode import fused_step, stack_plan
from ssmkit.models.outputs import ModelState
from ssmkit.ops.mamba3_stack import Mamba3StackPlan

RTOL = 1e-4
CONFIGS = {"siso": {"d_state": 16, "headdim": 8},
           "mimo2-groups-bias": {"d_state": 16, "headdim": 8, "ngroups": 2, "mimo_rank": 2, "bias": True}}


def model_of(opts: dict, seed: int) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig(d_model=32, n_layers=3, vocab_size=40, pattern="mamba3",
                                 mixer_options={"mamba3": opts})).eval()
    with torch.no_grad():
        for p in model.parameters():  # off the initial values (B/C biases, D, mimo_*, norms)
            p.add_(0.2 * torch.randn_like(p))
    return model


def blockwise_step(model: CausalLM, ids: torch.Tensor, state: ModelState) -> tuple[torch.Tensor, ModelState]:
    """The reference: embedding, each block's own step (Mamba3.step), final norm, LM head."""
    bb = model.backbone
    h = bb.embed(ids)
    new = []
    for block, s in zip(bb.blocks, state.layers, strict=True):
        h, s = block.step(h, s)
        new.append(s)
    return model.lm_head(bb.final_norm(h)), ModelState(new)


def close(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| relative to max |want|."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float32_fused_stack_equals_block_by_block(name):
    model = model_of(CONFIGS[name], seed=11)
    oracle = model_of(CONFIGS[name], seed=11).double()
    plan = stack_plan(model.backbone, model.lm_head)
    assert isinstance(plan, Mamba3StackPlan) and plan.fusable and plan.dtype == torch.float32
    batch = 3
    state, ref, exact = model.init_state(batch), model.init_state(batch), oracle.init_state(batch)
    with torch.no_grad():
        for t in range(6):
            ids = (torch.arange(batch) * 7 + 3 * t) % 40
            assert fused_step(model.backbone, model.backbone.embed(ids), state, model.lm_head) is not None
            logits, state = model.step(ids, state)  # the fused launch (checked just above)
            want, ref = blockwise_step(model, ids, ref)
            truth, exact = blockwise_step(oracle, ids, exact)
            assert logits.dtype == torch.float32 and close(want, truth) < 1e-5  # the reference's own error
            assert close(logits, want) < RTOL and close(logits, truth) < RTOL, (t, close(logits, want))
            for a, b in zip(state.layers, ref.layers, strict=True):
                for f in dataclasses.fields(a):
                    x, y = getattr(a, f.name), getattr(b, f.name)
                    assert x.dtype == torch.float32 and close(x, y) < RTOL, (t, f.name)
