"""The one thread policy (ssmkit.ops.threads): thread counts, the launch lock, every kernel using it, and kernel
results that are bitwise the same for any thread count (and equal the loop oracles, also for blocks of uneven
width, such as dim 96 = 64 + 32 lanes, that one task runs one after the other)."""

from __future__ import annotations

import threading

import numba
import pytest
import torch

from ssmkit.layers.short_conv import ShortConv
from ssmkit.ops import linear_scan, reference, selective_scan
from ssmkit.ops import threads as T


def test_small_work_runs_on_one_thread_large_on_torchs_count():
    assert T.threads_for(T.PARALLEL_MIN_WORK - 1) == 1
    want = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    assert T.threads_for(T.PARALLEL_MIN_WORK) == want


def test_kernel_threads_sets_numba_count_holds_the_lock_and_restores():
    before_numba, before_torch = numba.get_num_threads(), torch.get_num_threads()
    others = []
    with T.kernel_threads(0) as n:
        assert n == 1 and numba.get_num_threads() == 1
        probe = threading.Thread(target=lambda: others.append(T.KERNEL_LOCK.acquire(blocking=False)))
        probe.start()
        probe.join()
    assert others == [False], "another thread could take the launch lock during a launch"
    assert numba.get_num_threads() == before_numba and torch.get_num_threads() == before_torch
    assert T.KERNEL_LOCK.acquire(blocking=False)
    T.KERNEL_LOCK.release()


def test_short_conv_uses_the_policy(monkeypatch):
    seen = []
    real = T.kernel_threads

    def spy(work):
        seen.append(work)
        return real(work)

    monkeypatch.setattr(T, "kernel_threads", spy)
    conv = ShortConv(8, 4)
    x = torch.randn(2, 16, 8, requires_grad=True)
    conv(x)[0].sum().backward()
    assert len(seen) == 2  # forward and backward launches


COUNTS = sorted({1, min(2, numba.config.NUMBA_NUM_THREADS), numba.config.NUMBA_NUM_THREADS})


def _on_threads(monkeypatch, n: int) -> None:
    """Every launch on n numba threads, whatever its size."""
    monkeypatch.setattr(T, "threads_for", lambda work: n)


def _selective_inputs(dim: int, groups: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    b, length, n = 2, 45, 4
    u, dt, z = r(b, length, dim), r(b, length, dim), r(b, length, dim)
    A = (-torch.rand(dim, n, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    B, C = r(b, length, groups, n), r(b, length, groups, n)
    return u, dt, A, B, C, r(dim), z


def _selective(inputs, reverse=False):
    u, dt, A, B, C, D, z = inputs
    y, h = selective_scan(u, dt, A, B, C, D, z, delta_softplus=True, reverse=reverse, return_final_state=True)
    (y.square().sum() + h.sum()).backward()
    return [y.detach(), h.detach(), *(t.grad for t in (u, dt, A, B, C, D, z))]


@pytest.mark.parametrize("dim,groups", [(96, 1), (200, 1), (192, 2), (640, 1)])
def test_selective_scan_same_bits_on_any_thread_count_and_matches_oracle(dim, groups, monkeypatch):
    results = []
    for n in COUNTS:
        _on_threads(monkeypatch, n)
        results.append(_selective(_selective_inputs(dim, groups, torch.float32)))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)
    _on_threads(monkeypatch, 1)
    for reverse in (False, True):
        x64 = _selective_inputs(dim, groups, torch.float64)
        got = _selective(x64, reverse)
        ref = [t.detach().clone().requires_grad_() for t in x64]
        y, h = reference.selective_scan(*ref, delta_softplus=True, reverse=reverse, return_final_state=True)
        (y.square().sum() + h.sum()).backward()
        u, dt, A, B, C, D, z = ref
        want = [y.detach(), h.detach(), *(t.grad for t in (u, dt, A, B, C, D, z))]
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_linear_scan_and_short_conv_same_bits_on_any_thread_count(monkeypatch):
    g = torch.Generator().manual_seed(1)
    a0, b0 = torch.rand(3, 300, 70, generator=g), torch.randn(3, 300, 70, generator=g)
    conv = ShortConv(70, 4)
    results = []
    for n in COUNTS:
        _on_threads(monkeypatch, n)
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        h = linear_scan(a, b)
        x = b0.clone().requires_grad_()
        y = conv(x)[0]
        (h.square().sum() + y.square().sum()).backward()
        results.append([h.detach(), a.grad, b.grad, y.detach(), x.grad, conv.weight.grad.clone()])
        conv.zero_grad()
    for other in results[1:]:
        for p, q in zip(results[0], other, strict=True):
            assert torch.equal(p, q)
