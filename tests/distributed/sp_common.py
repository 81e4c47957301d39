"""Shared by the sequence-parallel tests: the spawn harness (P gloo processes, a bounded wait) and the check that
one module, sharded over the group, equals one process (float64: outputs, input and weight gradients)."""

from __future__ import annotations

import os
import queue as queue_mod
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = 600.0  # generous: in a fresh clone on a loaded machine each rank may compile numba kernels first
TOL = 1e-10


def warm_kernels(makers: dict[str, Callable], d_model: int, length: int = 7) -> None:
    """Run each ``maker()`` once in float64 in the calling process (forward with a reset, backward), so numba
    compiles its kernels into the on-disk cache once, before spawned ranks would each compile them at the same
    time; layers with recurrent state also run with an initial state and ``return_final_state``."""
    torch.manual_seed(0)
    for make in makers.values():
        layer = make().double()
        x = torch.randn(2, length, d_model, dtype=torch.float64, requires_grad=True)
        reset = torch.zeros(2, length, dtype=torch.bool)
        reset[0, length // 2] = True
        layer(x, reset=reset).sum().backward()
        try:
            s0 = layer.init_state(2)
        except (AttributeError, NotImplementedError):
            continue
        if s0 is not None:
            y, _ = layer(x, s0, reset=reset, return_final_state=True)
            y.sum().backward()


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))


def check_case(name: str, make: Callable, length: int, with_reset: bool, size: int, rank: int, *,
               tokens: bool = False, d_model: int = 8, vocab: int = 11, prefix: bool = False) -> list[str]:
    """Messages for every quantity of ``make()`` (a layer, or with ``tokens`` a CausalLM) on a random (2, length)
    batch that differs from one process by more than TOL; ``prefix``: a PrefixLM prefix mask crossing shards."""
    from ssmkit.distributed.sequence import SequenceParallel, shard_bounds, shard_sequence

    torch.manual_seed(0)
    module = make().double()
    if tokens:
        x = torch.randint(0, vocab, (2, length))
    else:
        x = torch.randn(2, length, d_model, dtype=torch.float64, requires_grad=True)
    reset = None
    bounds = shard_bounds(length, size)
    if with_reset:
        reset = torch.rand(2, length) < 0.2
        reset[0, bounds[1][0]] = True  # a segment starts exactly at rank 1's first token
        reset[1, bounds[-1][0] - 1] = True  # ... and at the last token before the last shard
    kw = {}
    if prefix:  # row 0: a prefix over every shard but the last and a bit of it; row 1: one ending in shard 0 and
        # (with resets) one opening the segment that starts just before the last shard, crossing into it
        pm = torch.zeros(2, length, dtype=torch.bool)
        pm[0, : bounds[-1][0] + 1] = True
        pm[1, : max(1, bounds[0][1] - 1)] = True
        if reset is not None:
            pm[1, bounds[-1][0] - 1: bounds[-1][0] + 1] = True
        kw["prefix_mask"] = pm

    def run(mod, inp, rst, **extra):
        out = mod(inp, reset=rst, **extra)
        return out.logits if tokens else out

    y = run(module, x, reset, **kw)
    w = torch.randn(y.shape, dtype=torch.float64)
    (y * w).sum().backward()
    want_grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad()
    xl = shard_sequence(x.detach(), None)
    if not tokens:
        xl.requires_grad_()
    local = {k: shard_sequence(v, None) for k, v in kw.items()}
    rl = None if reset is None else shard_sequence(reset, None)
    yl = run(SequenceParallel(module, None), xl, rl, **local)
    (yl * shard_sequence(w, None)).sum().backward()
    with torch.no_grad():  # inference: no graph is built, same outputs
        y_ng = run(SequenceParallel(module, None), xl, rl, **local)
    errs = {"y": max_err(yl.detach(), shard_sequence(y.detach(), None)),
            "y no_grad": max_err(y_ng, shard_sequence(y.detach(), None))}
    if not tokens:
        errs["dx"] = max_err(xl.grad, shard_sequence(x.grad, None))
    for n, p in module.named_parameters():
        g = torch.zeros_like(p) if p.grad is None else p.grad.clone()
        dist.all_reduce(g)
        errs[f"d{n}"] = max_err(g, want_grads.get(n, torch.zeros_like(p)))
    tag = f"{name} L={length} reset={with_reset} P={size} rank={rank}"
    return [f"{tag}: {k} differs by {v:.3g}" for k, v in errs.items() if not v <= TOL]


def _entry(target: Callable, rank: int, size: int, init_file: str, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size,
                            timeout=timedelta(seconds=TIMEOUT))
    try:
        ran, fails = target(size, rank)
        queue.put((rank, ran, fails))
    except BaseException:
        queue.put((rank, -1, [traceback.format_exc()]))
    finally:
        dist.destroy_process_group()


def spawn(target: Callable, size: int) -> list[tuple[int, int, list[str]]]:
    """Run ``target(size, rank) -> (cases run, failure messages)`` on ``size`` gloo processes; every rank's
    report, sorted by rank. The wait ends at TIMEOUT or as soon as a rank died without reporting."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_entry, args=(target, r, size, init_file, queue)) for r in range(size)]
        for p in procs:
            p.start()
        results, deadline = [], time.monotonic() + TIMEOUT
        try:
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
    return sorted(results)
