"""Right-to-left chunks of packed sequences: the right chunk's state enters the left chunk only when no segment
starts at the boundary. Every reversible recurrent family, float64, against the whole sequence at once."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.layers import RGLRU, S4, S4D, GatedSSM, Mamba, Mamba2

FAMILIES = {
    "gated": lambda: GatedSSM(8, 6, reverse=True),
    "rglru": lambda: RGLRU(8, reverse=True),
    "s4d-scan": lambda: S4D(8, 8, mode="scan", reverse=True),
    "s4d-conv": lambda: S4D(8, 8, mode="conv", reverse=True),
    "s4-dplr": lambda: S4(8, 8, reverse=True),
    "mamba": lambda: Mamba(8, 4, reverse=True),
    "mamba2": lambda: Mamba2(8, 8, headdim=4, chunk_size=4, reverse=True),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@settings(max_examples=5, deadline=None)
@given(length=st.integers(4, 12), data=st.data())
def test_right_chunk_state_stops_at_a_segment_start(family, length, data):
    torch.manual_seed(0)
    layer = FAMILIES[family]().double()
    t = data.draw(st.integers(1, length - 1), label="boundary")
    x = torch.randn(3, length, 8, dtype=torch.float64)
    reset = torch.zeros(3, length, dtype=torch.bool)
    reset[:, 0] = True
    reset[0, t] = True  # row 0: a segment starts exactly at the boundary; rows 1-2: one crosses it
    reset[2, data.draw(st.integers(1, length - 1), label="other start")] = True
    with torch.no_grad():
        whole = layer(x, reset=reset)
        y_right, s_right = layer(x[:, t:], reset=reset[:, t:], return_final_state=True)
        y_left = layer(x[:, :t], s_right, reset=reset[:, :t])
    got = torch.cat([y_left, y_right], 1)
    assert (got - whole).abs().max().item() < 1e-10
