"""Sequence parallelism equals one process: every supported family and a hybrid CausalLM, sharded over P = 2 and
P = 3 gloo processes (uneven shards, shards shorter than the conv halo, packed sequences with resets), float64,
outputs / input gradients / weight gradients to 1e-10. One spawn per P runs every case; the parent waits with a
bounded timeout."""

from __future__ import annotations

import os
import queue as queue_mod
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = 240.0
TOL = 1e-10


def _families() -> dict:
    from ssmkit.layers import H3, RGLRU, S4, S4D, Attention, GatedSSM, LongConv, Mamba, Mamba2

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
        "attn": lambda: Attention(8, n_heads=2, rotary=True),
        "attn-sliding": lambda: Attention(8, n_heads=2, mask="sliding", window=3),
    }


def _hybrid():
    from ssmkit.models.config import ModelConfig
    from ssmkit.models.heads import CausalLM

    opts = {"mamba": {"d_state": 4}, "mamba2": {"d_state": 4, "headdim": 4, "chunk_size": 4},
            "s4d": {"d_state": 8}, "attn": {"n_heads": 2, "rotary": True}, "h3": {"d_state": 4, "n_heads": 2}}
    cfg = ModelConfig(d_model=8, pattern=["mamba", "attn", "mamba2", "s4d", "rglru", "h3"], vocab_size=11,
                      mixer_options=opts, mlp="gelu")
    return CausalLM(cfg)


def _max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))


def _check_case(name: str, make, length: int, with_reset: bool, size: int, rank: int) -> list[str]:
    from ssmkit.distributed.sequence import SequenceParallel, shard_bounds, shard_sequence

    torch.manual_seed(0)
    module = make().double()
    tokens = name == "hybrid"
    if tokens:
        x = torch.randint(0, 11, (2, length))
    else:
        x = torch.randn(2, length, 8, dtype=torch.float64, requires_grad=True)
    reset = None
    if with_reset:
        reset = torch.rand(2, length) < 0.2
        reset[0, shard_bounds(length, size)[1][0]] = True  # a segment starts exactly at rank 1's first token
        reset[1, shard_bounds(length, size)[-1][0] - 1] = True  # ... and at the last token before the last shard

    def run(mod, inp, rst):
        out = mod(inp, reset=rst)
        return out.logits if tokens else out

    y = run(module, x, reset)
    w = torch.randn(y.shape, dtype=torch.float64)
    (y * w).sum().backward()
    want_grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad()
    xl = shard_sequence(x.detach(), None)
    if not tokens:
        xl.requires_grad_()
    yl = run(SequenceParallel(module, None), xl, None if reset is None else shard_sequence(reset, None))
    (yl * shard_sequence(w, None)).sum().backward()
    with torch.no_grad():  # inference: no graph is built, same outputs
        y_ng = run(SequenceParallel(module, None), xl, None if reset is None else shard_sequence(reset, None))
    errs = {"y": _max_err(yl.detach(), shard_sequence(y.detach(), None)),
            "y no_grad": _max_err(y_ng, shard_sequence(y.detach(), None))}
    if not tokens:
        errs["dx"] = _max_err(xl.grad, shard_sequence(x.grad, None))
    for n, p in module.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        errs[f"d{n}"] = _max_err(g, want_grads[n])
    tag = f"{name} L={length} reset={with_reset} P={size} rank={rank}"
    return [f"{tag}: {k} differs by {v:.3g}" for k, v in errs.items() if not v <= TOL]


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
    errs = {"y": _max_err(yg.detach(), y.detach()), "dx": _max_err(xl.grad, shard_sequence(x.grad, None))}
    return [f"gather_sequence P={size} rank={rank}: {k} differs by {v:.3g}" for k, v in errs.items() if not v <= TOL]


def _errors_case(size: int) -> list[str]:
    from ssmkit.distributed.sequence import SequenceParallel, shard_sequence
    from ssmkit.layers import S4, Attention, Mamba

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
    for layer, word in ((S4(8, d_state=8), "DPLR"), (Mamba(8, reverse=True), "reverse"),
                        (Attention(8, mask="prefix"), "prefix")):
        try:
            SequenceParallel(layer, None)
            out.append(f"an unsupported {word} layer was accepted")
        except NotImplementedError as e:
            if word not in str(e) or "\n" in str(e):
                out.append(f"unclear unsupported-layer error: {e}")
    return out


def _worker(rank: int, size: int, init_file: str, queue) -> None:
    torch.set_num_threads(1)
    import ssmkit.distributed.ring_attention as ring
    import ssmkit.distributed.sequence_recurrent as recurrent

    ring.CHUNK = 3  # several query tiles per shard, so tiling and tile skipping are exercised
    recurrent.SUMMARY_CHUNK = 2  # the summary pass in pieces, passing the state
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size,
                            timeout=timedelta(seconds=TIMEOUT))
    try:
        fails, ran = [], 0
        cases = [(n, m, 3 * size + 2, r) for n, m in _families().items() for r in (False, True)]
        cases += [(n, m, 2 * size - 1, True) for n, m in _families().items()]  # shards of 1-2 tokens < halo
        cases += [("hybrid", _hybrid, 3 * size + 2, False), ("hybrid", _hybrid, 4 * size + 1, True)]
        for name, make, length, with_reset in cases:
            fails += _check_case(name, make, length, with_reset, size, rank)
            ran += 1
        fails += _gather_case(size, rank)
        fails += _errors_case(size)
        queue.put((rank, ran, fails))
    except BaseException:
        queue.put((rank, -1, [traceback.format_exc()]))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("size", [2, 3])
def test_sequence_parallel_equals_one_process(size):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_worker, args=(r, size, init_file, queue)) for r in range(size)]
        for p in procs:
            p.start()
        results, deadline = [], time.monotonic() + TIMEOUT
        try:  # stop waiting at the deadline, or as soon as a rank died without reporting
            while len(results) < size and time.monotonic() < deadline:
                try:
                    results.append(queue.get(timeout=1.0))
                except queue_mod.Empty:
                    if any(p.exitcode not in (None, 0) for p in procs):
                        break
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
    reported = "\n".join(f for _, _, fails in results for f in fails)
    assert len(results) == size, f"only {len(results)} of {size} ranks reported within {TIMEOUT} s:\n{reported}"
    n_cases = 3 * len(_families()) + 2
    for rank, ran, fails in sorted(results):
        assert not fails, "\n".join(fails)
        assert ran == n_cases, f"rank {rank} ran {ran} of {n_cases} cases"
