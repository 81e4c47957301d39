"""Sequence parallelism equals one process: every supported family (the first set, then GQA / local GQA,
Griffin, the Mamba ablations, NormedMamba, FFN / MoE, FalconH1's parallel block) and two hybrid CausalLMs (one
with Zamba2's hybrid layers, which read the sharded embeddings), sharded over P = 2 and
P = 3 gloo processes (uneven shards, shards shorter than the conv halo, packed sequences with resets), float64,
outputs / input gradients / weight gradients to 1e-10. One spawn per P runs every case; the parent waits with a
bounded timeout."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from .sp_common import TOL, check_case, max_err, spawn, warm_kernels


def _families() -> dict:
    from ssmkit.layers import H3, RGLRU, S4, S4D, Attention, GatedSSM, LongConv, Mamba, Mamba2
    from ssmkit.layers.ablation import H3S6, S6, MambaS4D
    from ssmkit.layers.bidirectional import Bidirectional
    from ssmkit.layers.falcon_h1 import ParallelHybrid
    from ssmkit.layers.ffn import FeedForward
    from ssmkit.layers.gqa import GQAttention
    from ssmkit.layers.griffin import GriffinRecurrent
    from ssmkit.layers.local_gqa import LocalGQAttention
    from ssmkit.layers.mamba3 import Mamba3
    from ssmkit.layers.moe import MoE
    from ssmkit.layers.normed_mamba import NormedMamba

    return {
        "mamba": lambda: Mamba(8, d_state=4, d_conv=4, expand=2),
        "mamba2": lambda: Mamba2(8, d_state=4, d_conv=4, expand=2, headdim=4, chunk_size=4),
        "s4d": lambda: S4D(8, d_state=8),
        "s4d-scan": lambda: S4D(8, d_state=8, mode="scan"),
        "gated": lambda: GatedSSM(8),
        "rglru": lambda: RGLRU(8),
        "h3": lambda: H3(8, d_state=4, n_heads=2),
        "longconv": lambda: LongConv(8, kernel_len=5),
        "longconv-long": lambda: LongConv(8, kernel_len=16),
        "s4-ptd": lambda: S4(8, d_state=8, init="ptd"),
        "s4-dplr": lambda: S4(8, d_state=8),  # HiPPO-LegS: a dense transition per channel
        "s4-dplr-scan": lambda: S4(8, d_state=6, init="fout", mode="scan", reverse=True),
        "attn": lambda: Attention(8, n_heads=2, rotary=True),
        "attn-sliding": lambda: Attention(8, n_heads=2, mask="sliding", window=3),
        "gqa": lambda: GQAttention(8, n_heads=4, n_kv_heads=2, rotary_dim=2, scale=0.3, key_multiplier=1.5),
        "local-gqa": lambda: LocalGQAttention(8, n_heads=2, n_kv_heads=1, rotary_dim=4, window=3, out_bias=True),
        "griffin": lambda: GriffinRecurrent(8, lru_width=8, n_heads=2, conv_width=4),
        "mamba3": lambda: Mamba3(8, d_state=4, headdim=4, rope_fraction=1.0),
        "mamba3-mimo": lambda: Mamba3(8, d_state=4, headdim=8, mimo_rank=2),
        "s6": lambda: S6(8, d_state=4),
        "h3s6": lambda: H3S6(8, d_state=4, shift_len=3),
        "mamba-s4d": lambda: MambaS4D(8, d_state=4, d_conv=3),
        "normed-mamba": lambda: NormedMamba(8, d_state=4),
        "ffn": lambda: FeedForward(8),
        "moe": lambda: MoE(8, d_hidden=6, n_experts=4, top_k=2),
        "parallel-h1": lambda: ParallelHybrid(8, n_heads=2, n_kv_heads=1, rotary_dim=2, d_state=4, headdim=4,
                                              chunk_size=4),
        # right to left: the summaries flow from rank P - 1 down
        "mamba-rev": lambda: Mamba(8, d_state=4, d_conv=4, reverse=True),
        "mamba2-rev": lambda: Mamba2(8, d_state=4, d_conv=3, headdim=4, chunk_size=4, reverse=True),
        "s4d-rev": lambda: S4D(8, d_state=8, reverse=True),
        "gated-rev": lambda: GatedSSM(8, reverse=True),
        "rglru-rev": lambda: RGLRU(8, reverse=True),
        "s4-ptd-rev": lambda: S4(8, d_state=8, init="ptd", reverse=True),
        "bi-mamba": lambda: Bidirectional(Mamba(8, d_state=4), combine="concat"),
    }


def _prefixed() -> dict:
    """Run with a prefix mask whose prefixes cross shard boundaries (see sp_common.check_case)."""
    from ssmkit.layers import Attention
    from ssmkit.layers.bidirectional import PrefixBidirectional
    from ssmkit.models.config import ModelConfig
    from ssmkit.models.heads import PrefixLM

    opts = {"mamba": {"d_state": 4}, "s4d": {"d_state": 8}, "mamba2": {"d_state": 4, "headdim": 4, "chunk_size": 4},
            "attn": {"n_heads": 2, "rotary": True}}
    pattern = ["prefix-mamba", "mamba2", "prefix-attn", "prefix-s4d", "prefix-gated", "prefix-rglru"]
    return {"prefix-mamba": (lambda: PrefixBidirectional(8, kind="mamba", d_state=4), False),
            "prefix-s4d": (lambda: PrefixBidirectional(8, kind="s4d", d_state=8), False),
            "prefix-attn": (lambda: Attention(8, n_heads=2, mask="prefix", rotary=True), False),
            "prefixlm": (lambda: PrefixLM(ModelConfig(d_model=8, pattern=pattern, vocab_size=11, mixer_options=opts)),
                         True)}


def _hybrids() -> dict:
    from ssmkit.models.config import ModelConfig
    from ssmkit.models.heads import CausalLM

    opts = {"mamba": {"d_state": 4}, "mamba2": {"d_state": 4, "headdim": 4, "chunk_size": 4},
            "s4d": {"d_state": 8}, "attn": {"n_heads": 2, "rotary": True}, "h3": {"d_state": 4, "n_heads": 2},
            "zamba2": {"n_heads": 2, "rotary": True, "attn_adapters": True, "adapter_rank": 2, "d_hidden": 8,
                       "d_state": 4, "headdim": 4, "chunk_size": 4},
            "griffin": {"n_heads": 2}, "local-gqa": {"n_heads": 2, "window": 3}}
    patterns = {"hybrid": ["mamba", "attn", "mamba2", "s4d", "rglru", "h3"],  # Zamba2 reads the embeddings
                "hybrid-zamba2": ["zamba2", "griffin", "local-gqa", "zamba2"]}
    return {n: (lambda p=p: CausalLM(ModelConfig(d_model=8, pattern=p, vocab_size=11, mixer_options=opts,
                                                 mlp="gelu"))) for n, p in patterns.items()}


def _gather_case(size: int, rank: int) -> list[str]:
    """gather_sequence returns the whole sequence on every rank; a loss on it, divided by P on each rank, gives
    the one-process gradients (its backward sums the ranks' gradients of each piece)."""
    from ssmkit.distributed.sequence import SequenceParallel, gather_sequence, shard_sequence
    from ssmkit.layers import Mamba

    torch.manual_seed(1)
    layer = Mamba(8, d_state=4).double()
    x = torch.randn(2, 3 * size + 1, 8, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    w = torch.randn(y.shape, dtype=torch.float64)
    (y * w).sum().backward()
    xl = shard_sequence(x.detach(), None).requires_grad_()
    yg = gather_sequence(SequenceParallel(layer, None)(xl), None)
    (yg * w).sum().div(size).backward()
    errs = {"y": max_err(yg.detach(), y.detach()), "dx": max_err(xl.grad, shard_sequence(x.grad, None))}
    return [f"gather_sequence P={size} rank={rank}: {k} differs by {v:.3g}" for k, v in errs.items() if not v <= TOL]


def _errors_case(size: int) -> list[str]:
    from ssmkit.distributed.sequence import SequenceParallel, shard_sequence
    from ssmkit.layers import Mamba
    from ssmkit.layers.bidirectional import PrefixBidirectional
    from ssmkit.layers.mamba3 import Mamba3

    out = []
    try:
        shard_sequence(torch.zeros(1, size - 1, 4), None)
        out.append("a sequence shorter than P was accepted")
    except ValueError as e:
        if "fewer than" not in str(e) or "\n" in str(e):
            out.append(f"unclear short-sequence error: {e}")
    try:  # rank 0 holds one sequence, the others two
        SequenceParallel(Mamba(8), None)(torch.zeros(1 + (dist.get_rank() > 0), 3, 8))
        out.append("different batch sizes across ranks were accepted")
    except ValueError as e:
        if "batch sizes" not in str(e) or "\n" in str(e):
            out.append(f"unclear batch-size error: {e}")
    try:  # a prefix token opening rank 1's shard after a suffix token: invalid across the boundary only
        pm = torch.zeros(1, 3, dtype=torch.bool)
        pm[0, 0] = dist.get_rank() == 1
        SequenceParallel(PrefixBidirectional(8, kind="gated"), None)(torch.zeros(1, 3, 8), prefix_mask=pm)
        out.append("a prefix mask broken at a shard boundary was accepted")
    except ValueError as e:
        if "rank 1's first position" not in str(e) or "\n" in str(e):
            out.append(f"unclear prefix-mask error: {e}")
    try:
        SequenceParallel(Mamba(8, reverse=True), None)(torch.zeros(1, 3, 8), return_final_state=True)
        out.append("state passing through a reverse layer was accepted")
    except NotImplementedError as e:
        if "reverse=True" not in str(e) or "\n" in str(e):
            out.append(f"unclear reverse-state error: {e}")
    for layer, word in ((Mamba3(8, d_state=4, headdim=4, reverse=True), "reverse=True"),):
        try:
            SequenceParallel(layer, None)
            out.append(f"an unsupported {word} layer was accepted")
        except NotImplementedError as e:
            if word not in str(e) or "\n" in str(e):
                out.append(f"unclear unsupported-layer error: {e}")
    return out


def _worker(size: int, rank: int):
    import ssmkit.distributed.ring_attention as ring
    import ssmkit.distributed.sequence_recurrent as recurrent

    ring.CHUNK = 3  # several query tiles per shard, so tiling and tile skipping are exercised
    recurrent.SUMMARY_CHUNK = 2  # the summary pass in pieces, passing the state
    if size == 3:  # with the heap bounded the true pass releases its outputs (sequence_recurrent._release_output)
        from ssmkit.distributed.heap import bound_heap

        assert bound_heap()
    fails, ran = [], 0
    cases = [(n, m, 3 * size + 2, r) for n, m in _families().items() for r in (False, True)]
    cases += [(n, m, 2 * size - 1, True) for n, m in _families().items()]  # shards of 1-2 tokens < halo
    for name, make, length, with_reset in cases:
        fails += check_case(name, make, length, with_reset, size, rank)
        ran += 1
    for name, make in _hybrids().items():
        for length, with_reset in ((3 * size + 2, False), (4 * size + 1, True)):
            fails += check_case(name, make, length, with_reset, size, rank, tokens=True)
            ran += 1
    for name, (make, tokens) in _prefixed().items():
        for length, with_reset in ((3 * size + 2, False), (4 * size + 1, True)):
            fails += check_case(name, make, length, with_reset, size, rank, tokens=tokens, prefix=True)
            ran += 1
    fails += _gather_case(size, rank)
    fails += _errors_case(size)
    return ran, fails


@pytest.mark.parametrize("size", [2, 3])
def test_sequence_parallel_equals_one_process(size):
    n_cases = 3 * len(_families()) + 2 * len(_hybrids()) + 2 * len(_prefixed())
    warm_kernels(_families(), 8)
    for rank, ran, fails in spawn(_worker, size):
        assert not fails, "\n".join(fails)
        assert ran == n_cases, f"rank {rank} ran {ran} of {n_cases} cases"
