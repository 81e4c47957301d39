"""Opt-in for chunked training: keep glibc's heap resident for the length of one step, so that freed activation
blocks are reused instead of unmapped and mapped afresh (``chunked_loss_backward(..., resident_heap=True)``).

By default glibc maps every block of 32 MiB or more on its own (``mmap``) and unmaps it when freed. At chunk 32,768
most activations of a d_model-256 model are such blocks (32,768 × 512 × 4 bytes = 64 MiB), so every allocation
faults in and zeroes its pages again: measured at 131,072 tokens, one thread, 20 GB of fresh pages per step for
the 2-layer Mamba of ``benchmarks/bench_longseq.py`` (7 s of system time in 24 s) and 31 GB for the Mamba2 one.
Inside :func:`resident_heap` blocks up to 1 GiB come from the heap and stay there when freed (the trim
threshold is raised as well); the chunked driver still returns the free heap to the OS between chunks
(:func:`~ssmkit.distributed.heap.trim_heap`), so the memory kept is one chunk's, plus the heap's fragmentation
(measured: +23% peak RSS for that Mamba, see ``bench_longseq.py --resident-heap``). Off glibc, or when
``MALLOC_MMAP_THRESHOLD_`` is set in the environment (the user's choice rules), it does nothing.

On exit the thresholds go back to fixed values, since glibc cannot restore its dynamic ones: the mmap threshold to
1 MiB if :func:`~ssmkit.distributed.heap.bound_heap` fixed it, else to 32 MiB (the ceiling of glibc's dynamic
threshold), the trim threshold to twice that (glibc's own rule when it adjusts them). The thresholds are
process-wide, so the context counts its users: nested blocks, or blocks in several threads, set them on the first
entry and restore them on the last exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import threading
from collections.abc import Iterator

from ..distributed.heap import M_MMAP_THRESHOLD, MMAP_THRESHOLD, heap_bounded, trim_heap

#: mallopt's parameter number for the trim threshold (glibc malloc.h)
M_TRIM_THRESHOLD = -1
#: blocks below this come from the heap inside :func:`resident_heap`; the trim threshold is the same
RESIDENT_THRESHOLD = 1 << 30
#: glibc's ceiling for its dynamic mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
GLIBC_MMAP_MAX = 32 << 20


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "mallopt", None)
    except OSError:
        return None


_MALLOPT = _mallopt()
_LOCK = threading.Lock()
_users = 0  # blocks inside resident_heap now, over all threads


@contextlib.contextmanager
def resident_heap() -> Iterator[bool]:
    """Raise glibc's mmap and trim thresholds to :data:`RESIDENT_THRESHOLD` inside the block (see the module
    docstring); yields whether it did."""
    global _users
    if _MALLOPT is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        yield False
        return
    with _LOCK:
        _users += 1
        if _users == 1:
            _MALLOPT(M_MMAP_THRESHOLD, RESIDENT_THRESHOLD)
            _MALLOPT(M_TRIM_THRESHOLD, RESIDENT_THRESHOLD)
    try:
        yield True
    finally:
        with _LOCK:
            _users -= 1
            if _users == 0:
                back = MMAP_THRESHOLD if heap_bounded() else GLIBC_MMAP_MAX
                _MALLOPT(M_MMAP_THRESHOLD, back)
                _MALLOPT(M_TRIM_THRESHOLD, 2 * back)
                trim_heap()
