"""The fused Mamba-2 step leaves the state it is given untouched: stepping twice from one snapshot gives the same
logits and states (what beam search, speculative decoding and ``generate`` rely on), and both equal the
block-by-block step in float64."""

from __future__ import annotations

import pytest
import torch

from ssmkit.models.fused_decode import fused_step

from .test_fused_decode_mamba2 import blockwise_step, model_of


@pytest.mark.parametrize("batch", [1, 3])
def test_stepping_twice_from_a_snapshot_gives_the_same_step(batch):
    model = model_of(torch.float64)
    torch.manual_seed(1)
    state = model.init_state(batch)
    with torch.no_grad():
        for _ in range(3):  # a state that is not zero, produced by the fused step itself
            _, state = model.step(torch.randint(0, 50, (batch,)), state)
        snapshot = [(s.conv.clone(), s.ssm.clone()) for s in state.layers]
        ids = torch.randint(0, 50, (batch,))
        assert fused_step(model.backbone, model.backbone.embed(ids), state, model.lm_head) is not None
        logits_a, state_a = model.step(ids, state)
        _, state_a2 = model.step(ids, state_a)  # stepping the branch on must not touch its parent either
        logits_b, state_b = model.step(ids, state)
        logits_ref, state_ref = blockwise_step(model, ids, state)
    for (conv, ssm), s in zip(snapshot, state.layers, strict=True):
        assert torch.equal(s.conv, conv) and torch.equal(s.ssm, ssm)
    assert torch.equal(logits_a, logits_b)
    for a, b, r in zip(state_a.layers, state_b.layers, state_ref.layers, strict=True):
        assert torch.equal(a.ssm, b.ssm) and torch.equal(a.conv, b.conv)
        assert a.ssm.data_ptr() != b.ssm.data_ptr()  # two branches, two buffers
        torch.testing.assert_close(a.ssm, r.ssm, rtol=0, atol=1e-12)
        torch.testing.assert_close(a.conv, r.conv, rtol=0, atol=1e-12)
    torch.testing.assert_close(logits_a, logits_ref, rtol=0, atol=1e-12)
    assert all(not torch.equal(a.ssm, a2.ssm) for a, a2 in zip(state_a.layers, state_a2.layers, strict=True))
