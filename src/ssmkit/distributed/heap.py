"""The C heap under sequence parallelism: glibc's malloc keeps freed memory resident, which inflates the peak RSS.

Tensors of a few MiB (activations of a shard piece: 16,384 positions × 512 channels × 4 bytes = 32 MiB) sit near
glibc's *dynamic* mmap threshold, which rises to 32 MiB after the first such block is freed; from then on they come
from the brk heap, whose freed blocks stay resident and fragment under the next ones. :func:`bound_heap` fixes the
threshold at 1 MiB, so every larger block is its own mapping and goes back to the OS when freed: RSS then follows the
live tensors, at the cost of page faults on every large allocation; the chunked driver
(:func:`~.sequence_chunked.sequence_parallel_chunked_backward`) calls it unless ``bounded_heap=False``.
:func:`trim_heap` returns the heap's free pages (``malloc_trim``). Both are no-ops off glibc.

Measured (2-layer Mamba LM, d_model 256, chunked training, 16,384 positions per chunk piece, one process; growth of
peak RSS over the RSS before the step): the one-process ``chunked_loss_backward`` at chunk 16,384 927 -> 654 MiB,
``sequence_parallel_chunked_backward`` on a one-rank group at the same piece 792 -> 722 MiB; at chunk 32,768 (blocks
of 64 MiB, mapped anyway) one process 1,324 vs 1,317 MiB, no change. CPU per step (single runs, load 10-14): +3% for
that one process, +14% per rank for P = 2 (d_model 256), +48% for one process of a d_model-64 model over 4M tokens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: mallopt's parameter number for the mmap threshold (glibc malloc.h)
M_MMAP_THRESHOLD = -3
#: blocks at least this large are mapped on their own (and unmapped when freed) once :func:`bound_heap` ran
MMAP_THRESHOLD = 1 << 20


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)
_MALLOPT = getattr(_LIBC, "mallopt", None)
_bounded = False


def trim_heap() -> None:
    """Give the heap's free memory back to the OS (glibc's malloc_trim; a no-op elsewhere). The summary pass's
    freed buffers otherwise stay resident under the true pass: measured for one Mamba2 layer (d_model 256,
    65,536 tokens, P = 2), peak RSS growth per rank 1701-1762 MB without, 1648-1675 MB with (one process 3042 MB)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def heap_bounded() -> bool:
    """Whether :func:`bound_heap` fixed the threshold in this process (or ``MALLOC_MMAP_THRESHOLD_`` is set)."""
    import os

    return _bounded or "MALLOC_MMAP_THRESHOLD_" in os.environ


def bound_heap() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` for this process (once; a no-op off glibc or when
    ``MALLOC_MMAP_THRESHOLD_`` is set in the environment, which then rules). Returns whether the threshold is fixed.
    Process-wide: every later allocation of at least 1 MiB is mapped on its own."""
    global _bounded
    if not _bounded and _MALLOPT is not None:
        import os

        _bounded = "MALLOC_MMAP_THRESHOLD_" in os.environ or bool(_MALLOPT(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return _bounded
