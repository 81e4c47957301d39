"""The layers the hybrid families need: the MoE against its loop oracle, GQA attention against ssmkit's own
multi-head Attention, and the layer contract (step == forward, state passing, packing) for each, in float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.layers.attention import Attention
from ssmkit.layers.falcon_h1 import ParallelHybrid
from ssmkit.layers.ffn import FeedForward
from ssmkit.layers.gqa import GQAttention
from ssmkit.layers.moe import MoE, moe_reference
from ssmkit.layers.normed_mamba import NormedMamba
from tests.layers.contract import assert_close, check_contract

D = 8


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _perturb(layer: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in layer.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.3)
    return layer


MOES = {
    "softmax": dict(router="softmax"),
    "softmax-norm-ungated": dict(router="softmax", norm_topk=True, gated=False, act="relu2"),
    "topk_softmax-shared": dict(router="topk_softmax", d_shared=6, scaling=1.5),
    "sigmoid-groups": dict(router="sigmoid", n_group=2, topk_group=1, norm_topk=True, scaling=2.5, gated=False,
                           act="relu2", d_shared=5, shared_bias=True),
}


@pytest.mark.parametrize("name", list(MOES))
@given(batch=st.integers(1, 3), length=st.integers(1, 9), top_k=st.integers(1, 2), seed=st.integers(0, 999))
def test_moe_matches_its_loop_oracle(name, batch, length, top_k, seed):
    torch.manual_seed(seed)
    layer = _perturb(MoE(D, 6, n_experts=4, top_k=top_k, **MOES[name]).double(), seed)
    x = _x(batch, length, D, seed=seed)
    with torch.no_grad():
        assert_close(layer(x), moe_reference(layer, x), 1e-12, f"MoE {name}")
    w, idx = layer.route(x.reshape(-1, D))
    assert idx.shape == (batch * length, top_k) and (idx.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct
    if layer.norm_topk:
        assert_close(w.sum(-1), torch.full_like(w[:, 0], layer.scaling), 1e-12, "normalised weights")


def test_moe_sigmoid_groups_choose_inside_the_best_group():
    layer = MoE(D, 4, n_experts=4, top_k=2, router="sigmoid", n_group=2, topk_group=1).double()
    with torch.no_grad():
        layer.router.weight.zero_()
        # expert 2 scores best alone, but group 0 (experts 0, 1) has the best pair: only 0 and 1 may be chosen
        layer.router_bias.copy_(torch.tensor([0.8, 0.8, 1.0, -1.0]))
    _, idx = layer.route(_x(5, D))
    assert (idx.sort(-1).values == torch.tensor([0, 1])).all()
    layer.n_group = layer.topk_group = 1  # without groups expert 2 is chosen
    assert (layer.route(_x(5, D))[1] == 2).any(-1).all()


LAYERS = {
    "ffn": lambda: FeedForward(D, 12, act="gelu", gated=False, bias=True),
    "moe": lambda: MoE(D, 6, n_experts=4, top_k=2, router="sigmoid", d_shared=4),
    "gqa-rotary-half": lambda: GQAttention(D, n_heads=4, n_kv_heads=2, rotary_dim=2, qkv_bias=True),
    "gqa-plain-wide": lambda: GQAttention(D, n_heads=2, n_kv_heads=1, head_dim=6, scale=0.3, out_bias=True),
    "normed-mamba": lambda: NormedMamba(D, d_state=4, dt_rank=3, bcdt_weights=True, bcdt_eps=1e-4),
    "normed-mamba-weightless": lambda: NormedMamba(D, d_state=4, dt_rank=2, bias=True),
    "parallel-h1": lambda: ParallelHybrid(D, n_heads=2, n_kv_heads=1, rotary_dim=4, key_multiplier=0.7, d_state=4,
                                          headdim=4, ngroups=2, chunk_size=4, ssm_rms_norm=True,
                                          ssm_multipliers=(0.5, 1.5, 2.0, 0.25, 1.2), ssm_in_multiplier=0.9,
                                          attn_in_multiplier=1.3, attn_out_multiplier=0.6),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_contract_float64(name):
    torch.manual_seed(0)
    layer = _perturb(LAYERS[name]().double(), 1)
    x = _x(2, 9, D, seed=2)
    check_contract(layer, x, 4, [_x(1, n, D, seed=n) for n in (3, 5, 2)])


def test_gqa_equals_multi_head_attention():
    """With n_kv_heads == n_heads and a full rotary width, GQAttention is ssmkit's Attention (fused qkv)."""
    torch.manual_seed(0)
    ref = _perturb(Attention(D, n_heads=2, rotary=True, bias=True).double(), 3)
    gqa = GQAttention(D, n_heads=2, rotary_dim=4, qkv_bias=True, out_bias=True).double()
    with torch.no_grad():
        for i, proj in enumerate((gqa.q_proj, gqa.k_proj, gqa.v_proj)):
            proj.weight.copy_(ref.qkv.weight[i * D:(i + 1) * D])
            proj.bias.copy_(ref.qkv.bias[i * D:(i + 1) * D])
        gqa.o_proj.load_state_dict(ref.out_proj.state_dict())
        x = _x(2, 7, D, seed=4)
        assert_close(gqa(x), ref(x), 1e-12, "GQAttention vs Attention")


def test_grouped_kv_equals_repeated_kv_heads():
    """n_kv_heads < n_heads equals full multi-head attention whose k/v heads are the shared ones repeated."""
    torch.manual_seed(0)
    g = _perturb(GQAttention(D, n_heads=4, n_kv_heads=2, rotary_dim=2).double(), 5)
    full = GQAttention(D, n_heads=4, rotary_dim=2).double()
    with torch.no_grad():
        full.q_proj.load_state_dict(g.q_proj.state_dict())
        full.o_proj.load_state_dict(g.o_proj.state_dict())
        for src, dst in ((g.k_proj, full.k_proj), (g.v_proj, full.v_proj)):
            dst.weight.copy_(src.weight.view(2, 1, 2, D).expand(2, 2, 2, D).reshape(4 * 2, D))
        x = _x(2, 6, D, seed=6)
        assert_close(g(x), full(x), 1e-12, "grouped vs repeated kv")


@pytest.mark.parametrize("make, match", [
    (lambda: GQAttention(D, n_heads=4, n_kv_heads=3), "n_kv_heads=3 must divide n_heads=4"),
    (lambda: GQAttention(D, n_heads=2, rotary_dim=3), "rotary_dim must be an even int"),
    (lambda: MoE(D, 4, n_experts=2, top_k=3), "top_k=3 exceeds n_experts=2"),
    (lambda: MoE(D, 4, router="softmax", n_group=2), "n_group/topk_group apply to router='sigmoid' only"),
    (lambda: MoE(D, 4, router="noisy"), "unknown router 'noisy'"),
    (lambda: FeedForward(D, act="swish2"), "unknown act 'swish2'"),
    (lambda: NormedMamba(D, bcdt_eps=0.0), "bcdt_eps must be a number in"),
])
def test_bad_options_fail_in_one_line(make, match):
    with pytest.raises(ValueError, match=match) as e:
        make()
    assert "\n" not in str(e.value)


def test_gqa_steps_after_a_packed_chunk_see_only_their_segment():
    """Rows whose segment started inside the prefilled chunk keep older cache entries masked while stepping."""
    torch.manual_seed(0)
    layer = _perturb(GQAttention(D, n_heads=4, n_kv_heads=2, rotary_dim=2).double(), 7)
    x = _x(2, 9, D, seed=8)
    reset = torch.zeros(2, 9, dtype=torch.bool)
    reset[0, 3] = reset[1, 1] = True
    with torch.no_grad():
        whole = layer(x, reset=reset)
        y, state = layer(x[:, :5], reset=reset[:, :5], return_final_state=True)
        ys = [y]
        for t in range(5, 9):
            y_t, state = layer.step(x[:, t], state)
            ys.append(y_t[:, None])
    assert_close(torch.cat(ys, 1), whole, 1e-12, "steps after a packed chunk")
