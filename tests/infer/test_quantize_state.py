"""int8 SSM states: per-(row, head, channel) scales, the rounding bound, exact round trips of representable
states, decoding from int8 states stays close to float decoding, errors."""

from __future__ import annotations

import pytest
import torch

from ssmkit.infer.state_quant import (
    Int8State,
    dequantize_state,
    quantize_state,
    quantize_tensor,
    state_nbytes,
    step_int8_state,
)
from ssmkit.layers.mamba import MambaState
from ssmkit.layers.mamba2 import Mamba2State
from ssmkit.models import CausalLM, ModelConfig


def test_bound_and_exact_round_trip():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 5, 16, generator=g, dtype=torch.float64)
    t[1, 2, 4] = 0
    q = quantize_tensor(t)
    assert q.q.shape == t.shape and q.q.dtype == torch.int8 and q.scale.shape == (2, 3, 5)
    err = (q.dequantize(torch.float64) - t).abs()
    assert bool((err <= q.scale.double()[..., None] / 2 * (1 + 1e-6)).all())
    assert q.scale[1, 2, 4] == 1 and bool((q.q[1, 2, 4] == 0).all())
    # a state on the int8 grid with power-of-two scales comes back bit for bit
    ints = torch.randint(-127, 128, (4, 6, 8), generator=g)
    ints[..., 0] = 127
    exact = ints.double() * 2.0 ** torch.randint(-8, 8, (4, 6, 1), generator=g)
    assert torch.equal(quantize_tensor(exact).dequantize(torch.float64), exact)


@pytest.mark.parametrize("pattern", ["mamba", "mamba2", "mamba,gated"])
def test_decoding_from_int8_states(pattern):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(d_model=32, n_layers=2, pattern=pattern, vocab_size=40)).eval()
    ids = torch.randint(0, 40, (3, 12))
    with torch.no_grad():
        state = model.init_state(3)
        qstate = quantize_state(model.init_state(3))
        for t in range(12):
            ref, state = model.step(ids[:, t], state)
            out, qstate = step_int8_state(model, ids[:, t], qstate)
            assert float((out - ref).abs().max() / ref.abs().max()) < 0.02
    first = qstate.layers[0]
    assert isinstance(first.ssm, Int8State)
    if isinstance(first, Mamba2State):
        assert first.ssm.scale.shape == state.layers[0].ssm.shape[:3], "one scale per (row, head, channel)"
    if pattern == "mamba,gated":
        assert torch.is_tensor(qstate.layers[1].h), "vector states stay float"
    back = dequantize_state(qstate)
    assert all(type(a) is type(b) for a, b in zip(back.layers, state.layers, strict=True))
    if pattern == "mamba":
        assert isinstance(first, MambaState) and first.ssm.scale.shape == (3, model.backbone.blocks[0].mixer.d_inner)
        ssm_f = sum(s.ssm.numel() * 4 for s in state.layers)
        ssm_q = sum(s.ssm.nbytes() for s in qstate.layers)
        assert ssm_q < 0.32 * ssm_f and qstate.nbytes() < state_nbytes(state)


def test_errors():
    with pytest.raises(TypeError, match="ModelState"):
        quantize_state({"ssm": torch.zeros(1, 2, 3)})
    with pytest.raises(TypeError, match="QuantizedModelState"):
        dequantize_state(None)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_tensor(torch.full((1, 2, 3), float("inf")))
    with pytest.raises(ValueError, match=r"float tensor \(\.\.\., N\)"):
        quantize_tensor(torch.zeros(3, dtype=torch.int32))
