"""Atomic counters for numba kernels (numba has no CPU atomics): work claiming and stage barriers.

Decode kernels run one parallel launch per layer instead of one per matrix product, because waking numba's
workqueue threads costs about as much as a small product. Inside the launch, the threads share each stage's
work through an int64 counter (``claim``: an atomic fetch-add) and wait for the stage to finish
(``wait_for``: spin on an acquire load) before the next stage reads its results. A thread only ever waits for
chunks that another thread has already claimed and is running, so the scheme cannot deadlock, also when the
launch runs its iterations one after another on a single thread.
"""

from __future__ import annotations

import platform

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
