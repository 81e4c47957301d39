"""Sequence parallelism with state passing and chunked training equals one process (float64, 1e-10):

* every recurrent family under SequenceParallel with an initial state on rank 0 and return_final_state (the state
  after each rank's shard), with resets, gradients w.r.t. inputs, the initial state and the weights, and a
  gradient given for the final state;
* sequence_parallel_chunked_backward on a hybrid recurrent CausalLM (chunks sharded over the group, state passed
  between chunks) vs one unchunked forward + backward.

One spawn of P = 2 gloo processes (uneven shards) runs every case; the parent waits with a bounded timeout."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from .sp_common import spawn, warm_kernels

TOL = 1e-10


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))


def _layers() -> dict:
    from ssmkit.layers import H3, RGLRU, S4, S4D, GatedSSM, LongConv, Mamba, Mamba2
    from ssmkit.layers.mamba3 import Mamba3

    return {"mamba": lambda: Mamba(6, d_state=4, d_conv=4), "s4d": lambda: S4D(6, d_state=4),
            "mamba2": lambda: Mamba2(6, d_state=4, headdim=4, chunk_size=4), "gated": lambda: GatedSSM(6),
            "rglru": lambda: RGLRU(6), "h3": lambda: H3(6, d_state=4, n_heads=2),
            "longconv": lambda: LongConv(6, kernel_len=5), "s4-ptd": lambda: S4(6, d_state=4, init="ptd"),
            "s4-dplr": lambda: S4(6, d_state=4), "mamba3": lambda: Mamba3(6, d_state=4, headdim=3)}


def _state_case(name: str, make, length: int, rank: int, size: int) -> list[str]:
    from ssmkit.distributed.sequence import SequenceParallel, shard_sequence

    torch.manual_seed(0)
    layer = make().double()
    x = torch.randn(2, length, 6, dtype=torch.float64, requires_grad=True)
    reset = torch.rand(2, length) < 0.15
    reset[1] = False
    s0 = layer.init_state(2).map(lambda t: torch.randn_like(t).requires_grad_())
    y, fin = layer(x, s0, reset=reset, return_final_state=True)
    w = torch.randn_like(y)
    v = fin.map(torch.randn_like)
    leaves = [x, *s0.tensors().values(), *layer.parameters()]

    def loss(yy, ff, ww, with_final):
        out = (yy * ww).sum()
        if with_final:
            out = out + sum((a * b.conj()).real.sum() for a, b in zip(ff.tensors().values(),
                                                                          v.tensors().values(), strict=True))
        return out

    want = torch.autograd.grad(loss(y, fin, w, True), leaves)
    xl = shard_sequence(x.detach(), None).requires_grad_()
    s0l = s0.map(lambda t: t.detach().requires_grad_()) if rank == 0 else None
    yl, finl = SequenceParallel(layer, None)(xl, s0l, reset=shard_sequence(reset, None), return_final_state=True)
    own = [xl, *([] if s0l is None else s0l.tensors().values()), *layer.parameters()]
    got = torch.autograd.grad(loss(yl, finl, shard_sequence(w, None), rank == size - 1), own)
    errs = {"y": _err(yl.detach(), shard_sequence(y.detach(), None)), "dx": _err(got[0], shard_sequence(want[0], None))}
    if rank == size - 1:
        for k, a in finl.tensors().items():
            errs[f"final {k}"] = _err(a.detach(), fin.tensors()[k].detach())
    n_state = len(s0.tensors())
    if rank == 0:
        for i, k in enumerate(s0.tensors()):
            errs[f"d initial {k}"] = _err(got[1 + i], want[1 + i])
    params = got[len(got) - len(list(layer.parameters())):]
    for i, g in enumerate(params):
        g = g.clone()
        dist.all_reduce(g)
        errs[f"dparam{i}"] = _err(g, want[1 + n_state + i])
    return [f"{name} P={size} rank={rank}: {k} differs by {e:.3g}" for k, e in errs.items() if not e <= TOL]


def _chunked_case(rank: int, size: int) -> list[str]:
    from ssmkit.distributed.sequence_chunked import sequence_parallel_chunked_backward
    from ssmkit.models.config import ModelConfig
    from ssmkit.models.heads import CausalLM

    torch.manual_seed(1)
    opts = {"mamba": {"d_state": 4}, "mamba2": {"d_state": 4, "headdim": 4, "chunk_size": 4},
            "s4d": {"d_state": 4}, "h3": {"d_state": 4, "n_heads": 2}}
    cfg = ModelConfig(d_model=8, pattern=["mamba", "mamba2", "s4d", "gated", "h3"], vocab_size=11,
                      mixer_options=opts, mlp="gelu")
    model = CausalLM(cfg).double()
    length = 29
    ids = torch.randint(0, 11, (2, length))
    labels = torch.randint(0, 11, (2, length))
    labels[0, :9] = -100
    reset = torch.rand(2, length) < 0.1
    model(ids, reset=reset, labels=labels).loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        want_loss = float(model(ids, reset=reset, labels=labels).loss)
    model.zero_grad(set_to_none=True)
    stats = sequence_parallel_chunked_backward(model, {"input_ids": ids, "labels": labels, "reset": reset}, 8, None)
    errs = {"loss": abs(stats["loss"] - want_loss)}
    errs.update({f"d{n}": _err(p.grad, want[n]) for n, p in model.named_parameters()})
    out = [f"chunked P={size} rank={rank}: {k} differs by {e:.3g}" for k, e in errs.items() if not e <= TOL]
    if stats["chunks"] != 4:
        out.append(f"chunked: {stats['chunks']} chunks, expected 4")
    try:
        sequence_parallel_chunked_backward(model, {"input_ids": ids[:, :17], "labels": labels[:, :17]}, 8, None)
        out.append("a last chunk shorter than P was accepted")
    except ValueError as e:
        if "fewer than" not in str(e) or "\n" in str(e):
            out.append(f"unclear short-chunk error: {e}")
    return out


def _late_state_case(rank: int) -> list[str]:
    """An initial_state on a rank other than 0 fails on every rank with one line (nobody is left waiting)."""
    from ssmkit.distributed.sequence import SequenceParallel
    from ssmkit.layers import Mamba

    layer = Mamba(6, d_state=4).double()
    state = layer.init_state(1) if rank == 1 else None
    try:
        SequenceParallel(layer, None)(torch.zeros(1, 3, 6, dtype=torch.float64), state)
        return [f"rank {rank}: an initial_state on rank 1 was accepted"]
    except ValueError as e:
        return [] if "only rank 0" in str(e) and "\n" not in str(e) else [f"unclear late-state error: {e}"]


def _cases(size: int, rank: int) -> tuple[int, list[str]]:
    import ssmkit.distributed.sequence_recurrent as recurrent

    recurrent.SUMMARY_CHUNK = 2
    fails, ran = [], 0
    for name, make in _layers().items():
        fails += _state_case(name, make, 3 * size + 1, rank, size)
        ran += 1
    fails += _chunked_case(rank, size)
    fails += _late_state_case(rank)
    return ran + 1, fails


@pytest.mark.parametrize("size", [2])
def test_state_passing_and_chunked_training_equal_one_process(size):
    warm_kernels(_layers(), 6)
    results = spawn(_cases, size)
    for _, ran, fails in results:
        assert not fails, "\n".join(fails)
        assert ran == len(_layers()) + 1
