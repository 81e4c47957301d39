"""Work sharing for the decode kernels: per-stage chunk counters, the claim / finish / wait of a stage, and the
per-stage clock.

A kernel is one parallel launch of ``prange(n_threads)`` workers; each stage's chunks are claimed through the
atomic counters of :mod:`._numba_atomics` (worker t first claims chunks of its own contiguous region, then helps
with the others) and a stage's readers wait until every chunk of it is done.
"""

from __future__ import annotations

import numba as nb

from ._numba_atomics import atomic_add, atomic_load, cpu_relax, cycle_counter, thread_yield

_PAD = 8  # int64 slots per counter: each counter owns a 64-byte cache line (no false sharing between threads)
_SPINS = 64  # pause-spins of a stage wait before it starts yielding the core


def counter_slots(n_stages: int, n_threads: int) -> int:
    """Length of a kernel's int64 counters array: per stage, a claim counter per thread's region and a done counter
    (the linear kernel has 1 stage, mamba_stack 5 per layer + 2), each on its own 64-byte line."""
    return n_stages * (n_threads + 1) * _PAD


@nb.njit(inline="always", cache=True)
def _slot(stage, index, n_threads):
    """The counters index of counter ``index`` (a region, or n_threads for the done counter) of ``stage``."""
    return (stage * (n_threads + 1) + index) * _PAD


@nb.njit(inline="always", cache=True)
def _claim(counters, stage, region, n_threads):
    """The next unclaimed chunk of ``region`` of ``stage``, counted from the region's start."""
    return atomic_add(counters, _slot(stage, region, n_threads), 1)


@nb.njit(inline="always", cache=True)
def _region(n_chunks, region, n_threads):
    """Chunks [lo, hi) of ``region``: thread t first takes chunks from region t (a contiguous share, which the
    hardware prefetcher streams well), then helps with the other regions."""
    return region * n_chunks // n_threads, (region + 1) * n_chunks // n_threads


@nb.njit(inline="always", cache=True)
def _next_chunk(counters, stage, n_chunks, t, n_threads, cursor):
    """The next chunk of ``stage`` for thread t, or -1 when every chunk is claimed. ``cursor[0]`` (set to 0 before
    a stage) counts the regions this thread has emptied: its own first, then the next ones."""
    while cursor[0] < n_threads:
        region = (t + cursor[0]) % n_threads
        lo, hi = _region(n_chunks, region, n_threads)
        chunk = lo + _claim(counters, stage, region, n_threads)
        if chunk < hi:
            return chunk
        cursor[0] += 1
    return -1


@nb.njit(inline="always", cache=True)
def _finish_stage(counters, stage, n_threads):
    """Count one finished chunk of ``stage``: a seq_cst fetch-add, which releases the chunk's stores (the memory
    ordering argument is in :mod:`._numba_atomics`)."""
    atomic_add(counters, _slot(stage, n_threads, n_threads), 1)


@nb.njit(inline="always", cache=True)
def _wait_stage(counters, stage, n_chunks, n_threads):
    """Return once all ``n_chunks`` chunks of ``stage`` are done. The acquire load of the done counter makes every
    counted chunk's stores visible here. Spins with ``pause`` for _SPINS rounds (a stage usually ends within
    microseconds), then yields the core each round, so a waiter does not starve a descheduled thread it waits
    for on a busy machine."""
    spins = 0
    while atomic_load(counters, _slot(stage, n_threads, n_threads)) < n_chunks:
        if spins < _SPINS:
            cpu_relax()
            spins += 1
        else:
            thread_yield()


@nb.njit(inline="always", cache=True)
def _mark(prof, t, i):
    """With a profile array (n_threads, 2 stages + 1) of nonzero length, prof[t, i] = the cycle counter: the
    kernels mark their start (i = 0) and each stage's barrier, entered (1 + 2 s) and left (2 + 2 s); ticks per
    second: :func:`counter_hz`."""
    if prof.shape[0] > 0:
        prof[t, i] = cycle_counter()
