"""The Mamba paper's Table 1 ablation layers (S6, H3S6, MambaS4D): the layer contract in float64, and the
time-invariant / selective swap checked against the plain layers they are built from."""

from __future__ import annotations

import pytest
import torch

from ssmkit.layers import S4D
from ssmkit.layers.ablation import H3S6, S6, MambaS4D
from ssmkit.ops.reference import selective_scan as selective_scan_ref

from .contract import assert_close, check_contract

MAKERS = {
    "s6": lambda: S6(6, d_state=4),
    "s6-none": lambda: S6(6, d_state=4, output="none"),
    "h3-s6": lambda: H3S6(6, d_state=4, shift_len=3),
    "mamba-s4d-scan": lambda: MambaS4D(6, d_state=4, mode="scan"),
    "mamba-s4d-conv": lambda: MambaS4D(6, d_state=4, mode="conv"),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_contract_float64(name):
    torch.manual_seed(0)
    layer = MAKERS[name]().double()
    x = torch.randn(2, 13, 6, dtype=torch.float64)
    seqs = [torch.randn(1, n, 6, dtype=torch.float64) for n in (4, 1, 6)]
    check_contract(layer, x, 5, seqs)


def test_s6_equals_the_selective_scan_oracle():
    torch.manual_seed(1)
    layer = S6(5, d_state=3, output="none").double()
    x = torch.randn(2, 9, 5, dtype=torch.float64)
    core = layer.core
    dt_r, B, C = core.x_proj(x).split([core.dt_rank, 3, 3], dim=-1)
    want = selective_scan_ref(x, torch.nn.functional.linear(dt_r, core.dt_proj.weight), -torch.exp(core.A_log),
                              B, C, core.D, delta_bias=core.dt_proj.bias, delta_softplus=True)
    assert_close(layer(x), want, 1e-10, "S6 vs selective_scan_ref")


def test_mamba_s4d_core_is_time_invariant_s4d():
    """MambaS4D = out_proj(S4D(SiLU(conv(x W_x))) * SiLU(x W_z)) with S4D's own (LTI) layer as the core."""
    torch.manual_seed(2)
    layer = MambaS4D(4, d_state=4, expand=1).double()
    assert isinstance(layer.ssm, S4D) and layer.ssm.output == "none"
    x = torch.randn(1, 7, 4, dtype=torch.float64)
    xi, z = layer.in_proj(x).chunk(2, dim=-1)
    u, _ = layer.conv1d(xi)
    want = layer.out_proj(layer.ssm(torch.nn.functional.silu(u)) * torch.nn.functional.silu(z))
    assert_close(layer(x), want, 1e-10, "MambaS4D composition")


def test_bad_options_name_the_argument():
    with pytest.raises(ValueError, match="H3S6: shift_len"):
        H3S6(4, shift_len=0)
    with pytest.raises(ValueError, match="S6: unknown output"):
        S6(4, output="relu")
    with pytest.raises(ValueError, match="MambaS4D: expand"):
        MambaS4D(4, expand=0.3)
