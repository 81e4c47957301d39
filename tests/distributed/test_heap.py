"""The bounded heap (:mod:`ssmkit.distributed.heap`) and the released layer output of the sequence-parallel true pass
(:func:`ssmkit.distributed.sequence_recurrent._release_output`), in a fresh interpreter each (the mmap threshold is
process-wide): a freed 8 MiB block stays resident in glibc's heap once the dynamic threshold has risen, and goes back
to the OS with the heap bounded; a released output keeps its graph usable for the backward."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc (Linux) only")

RSS = """
import json, os, torch
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
out = {"bounded": False}
if BOUND:
    from ssmkit.distributed.heap import bound_heap
    out["bounded"] = bound_heap()
big = torch.ones(4 << 20)  # 16 MiB: once freed, glibc's dynamic threshold rises to its size
del big
before = rss()
t = torch.ones(2 << 20)  # 8 MiB, below the risen threshold: from the brk heap unless bounded
del t
out["kept_MiB"] = (rss() - before) / 2**20
"""

RELEASE = """
from ssmkit.distributed.sequence_recurrent import _release_output
torch.manual_seed(0)
w = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
x = torch.randn(4, 8, dtype=torch.float64)
def traced(f):  # f's output and the storages its graph saved (as _ShardPass collects them)
    saved = set()
    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return f(), saved
y, saved = traced(lambda: torch.tanh(x @ w) @ w)  # the last op saves its inputs, not its output
want = y.detach().clone()
released = _release_output(y, saved)
g = torch.randn_like(want)
(grad,) = torch.autograd.grad([y], [w], [g])
(ref,) = torch.autograd.grad([torch.tanh(x @ w) @ w], [w], [g])
z, saved_z = traced(lambda: torch.exp(x @ w))  # exp saves its output: kept
kept = _release_output(z, saved_z)
(gz,) = torch.autograd.grad([z], [w], [g])
out.update(copy=bool(torch.equal(released, want)), freed=y.untyped_storage().nbytes() == 0,
           grad=float((grad - ref).abs().max()), exp_kept=z.untyped_storage().nbytes() > 0,
           shares=kept.data_ptr() == z.data_ptr(), exp_grad_finite=bool(gz.isfinite().all()))
"""
PRINT = "print(json.dumps(out))\n"


def _run(*codes: str) -> list[dict]:
    """Each code in its own fresh interpreter, all at once; their last stdout lines as JSON."""
    procs = [subprocess.Popen([sys.executable, "-c", c], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in codes]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def test_bounded_heap_and_released_output():
    plain, got = _run(RSS.replace("BOUND", "False") + PRINT, RSS.replace("BOUND", "True") + RELEASE + PRINT)
    assert plain["kept_MiB"] > 6, plain  # the oracle: glibc's default keeps the freed block resident
    assert got["bounded"] is True and got["kept_MiB"] < 1, got
    assert got["copy"] and got["freed"], got
    assert got["grad"] < 1e-14, got
    assert got["exp_kept"] and got["shares"] and got["exp_grad_finite"], got
