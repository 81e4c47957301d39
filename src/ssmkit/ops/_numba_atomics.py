"""Atomic counters for numba kernels (numba has no CPU atomics): work claiming and stage barriers.

Decode kernels run one parallel launch per layer instead of one per matrix product, because waking numba's
workqueue threads costs about as much as a small product. Inside the launch, the threads share each stage's
work through an int64 counter (``claim``: an atomic fetch-add) and wait for the stage to finish
(``wait_for``: spin on an acquire load) before the next stage reads its results. A thread only ever waits for
chunks that another thread has already claimed and is running, so the scheme cannot deadlock, also when the
launch runs its iterations one after another on a single thread.

Memory ordering. A thread writes a chunk's results with plain stores, then counts the chunk done with
:func:`atomic_add` (sequentially consistent, so also a *release*: the stores before it cannot move after it).
A waiter reads the done counter with :func:`atomic_load` (*acquire*: the loads after it cannot move before it).
When the waiter reads a count that includes a chunk's increment, the read synchronises with that increment
(later fetch-adds by other threads continue its release sequence), so every store of every counted chunk is
visible to the waiter's next loads. Claims need only atomicity: each fetch-add hands out a distinct chunk index.
Counters are never reset within a launch: every stage has its own.
"""

from __future__ import annotations

import platform
import sys
import time

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_X86 = platform.machine().lower() in {"x86_64", "amd64", "i386", "i686"}


def _slot_pointer(context, builder, arrty, arr, idx):
    ary = context.make_array(arrty)(context, builder, arr)
    return cgutils.get_item_pointer(context, builder, arrty, ary, [idx], wraparound=False)


@intrinsic
def atomic_add(typingctx, counters, idx, value):
    """``old = counters[idx]; counters[idx] += value`` as one sequentially consistent atomic step; returns old.
    counters: 1-d int64 array."""
    if not (isinstance(counters, types.Array) and counters.dtype == types.int64 and counters.ndim == 1):
        return None

    def codegen(context, builder, sig, args):
        arr, i, v = args
        ptr = _slot_pointer(context, builder, sig.args[0], arr, i)
        v = context.cast(builder, v, sig.args[2], types.int64)
        return builder.atomic_rmw("add", ptr, v, "seq_cst")

    return types.int64(counters, idx, value), codegen


@intrinsic
def atomic_load(typingctx, counters, idx):
    """``counters[idx]`` read with acquire ordering (never hoisted out of a spin loop)."""
    if not (isinstance(counters, types.Array) and counters.dtype == types.int64 and counters.ndim == 1):
        return None

    def codegen(context, builder, sig, args):
        arr, i = args
        ptr = _slot_pointer(context, builder, sig.args[0], arr, i)
        return builder.load_atomic(ptr, "acquire", 8)

    return types.int64(counters, idx), codegen


@intrinsic
def cpu_relax(typingctx):
    """The x86 ``pause`` hint inside a spin loop (a no-op elsewhere)."""

    def codegen(context, builder, sig, args):
        if _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def thread_yield(typingctx):
    """``sched_yield()``: give the core to another runnable thread (a spin-wait's back-off when the thread it
    waits for may have been descheduled, e.g. on a busy machine). A ``pause`` on Windows, which has no
    sched_yield."""

    def codegen(context, builder, sig, args):
        if sys.platform == "win32":
            if _X86:
                fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                    "llvm.x86.sse2.pause")
                builder.call(fn, [])
        else:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def cycle_counter(typingctx):
    """The CPU's cycle counter (``rdtsc`` on x86, ``llvm.readcyclecounter``): the decode kernels' optional
    per-stage clock. Ticks per second: :func:`counter_hz`."""

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(64), []),
                                            "llvm.readcyclecounter")
        return builder.call(fn, [])

    return types.int64(), codegen


_HZ: list[float] = []


def counter_hz() -> float:
    """Ticks per second of :func:`cycle_counter`, measured once against ``time.perf_counter`` over 50 ms."""
    if not _HZ:
        from numba import njit

        read = njit(lambda: cycle_counter())
        read()
        t0, c0 = time.perf_counter(), read()
        time.sleep(0.05)
        t1, c1 = time.perf_counter(), read()
        _HZ.append((c1 - c0) / (t1 - t0))
    return _HZ[0]
