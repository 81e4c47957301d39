"""One thread-count policy for every parallel numba kernel, and the lock that makes them safe to call from threads.

    with kernel_threads(work) as n:      # n: the numba threads the enclosed launch uses
        kernel(..., n)

- A launch uses one thread when it does less than :data:`PARALLEL_MIN_WORK` units of work (state updates or
  multiply-adds: waking a second thread costs more than it saves), else as many as torch uses
  (``torch.get_num_threads()``, capped at numba's pool size).
- numba's workqueue threading layer (the one ssmkit selects, see :mod:`._numba_kernels`) aborts the process when two
  Python threads launch parallel kernels at the same time. Every launch therefore holds :data:`KERNEL_LOCK`: calls
  from several Python threads are safe and run one launch at a time (each launch still uses all its threads).
- The kernels split their work into tasks fixed by the problem's shape and add partial results in a fixed order,
  so the thread count changes only their speed (the selective-scan backward sums its B and C gradients over a
  fixed number of stripes, not one per thread). PyTorch's own CPU ops (matrix products, reductions) can differ in
  the last bits between thread counts, so bitwise-reproducible training needs a fixed ``train.threads``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numba as nb
import torch

#: below this much work (state updates or multiply-adds) a launch runs on one thread
PARALLEL_MIN_WORK = 1 << 17

#: held by every parallel kernel launch and thread-count change (re-entrant: a launch may nest in another's setup)
KERNEL_LOCK = threading.RLock()


def threads_for(work: int) -> int:
    """The numba threads a launch of ``work`` units uses: 1 below :data:`PARALLEL_MIN_WORK`, else torch's
    thread count capped at numba's pool size."""
    if work < PARALLEL_MIN_WORK:
        return 1
    return max(1, min(torch.get_num_threads(), nb.config.NUMBA_NUM_THREADS))


@contextlib.contextmanager
def kernel_threads(work: int) -> Iterator[int]:
    """Hold :data:`KERNEL_LOCK` and run the enclosed launches on :func:`threads_for` (work) numba threads;
    yields that count. Restores numba's count (and torch's, which starting some numba pools resets) after."""
    with KERNEL_LOCK:
        torch_threads = torch.get_num_threads()  # read first: starting numba's thread pool can reset torch's count
        want = threads_for(work)
        old = nb.get_num_threads()
        nb.set_num_threads(want)
        try:
            yield want
        finally:
            nb.set_num_threads(old)
            if torch.get_num_threads() != torch_threads:
                torch.set_num_threads(torch_threads)
