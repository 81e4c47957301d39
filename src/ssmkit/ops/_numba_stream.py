"""A Mamba-2 state row updated with non-temporal (streaming) stores, for the decode kernels.

A Mamba-2 decode step reads its SSM state (layers x heads x headdim x d_state floats: 18.9 MB per token at 130M
size) and writes a new one. Written with ordinary stores, every line of the new state is first read into the
cache (read for ownership) and pushes weights out of it; written with non-temporal stores it goes to memory
without that read. :func:`ssd_row` does one state row (one channel) with full-vector streaming stores; the caller
checks :func:`streamable` first and runs its plain loop otherwise, and ends its chunk with :func:`store_fence`
(streaming stores are weakly ordered: the fence orders them before the stage's done counter).
"""

from __future__ import annotations

import numba as nb
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._numba_atomics import _X86
from ._numba_q8 import call, data_ptr, load, reduce_sum

VECTOR_BYTES = 64  # one streaming store: a cache line (16 float32 / 8 float64)
#: a layer's new state goes out with streaming stores only from this size on (the 130M Mamba-2's is 768 KiB); a
#: smaller one may stay in cache until the next token reads it, which streaming stores would prevent
STREAM_MIN_BYTES = 1 << 19


@intrinsic
def ssd_row(typingctx, ss, sn, off, x, boff, coff, da, dx, n):
    """sum_k s[k] * x[coff + k] for s[k] = ss[off + k] * da + dx * x[boff + k], k < n, storing s to sn[off:off + n]
    with streaming stores; ss, sn, x 1-d C-contiguous of one float dtype, n a multiple of the vector width
    (:data:`VECTOR_BYTES` / itemsize) and sn[off] aligned to :data:`VECTOR_BYTES` (:func:`streamable`)."""
    if not all(isinstance(a, types.Array) and a.ndim == 1 for a in (ss, sn, x)):
        return None
    sig = ss.dtype(ss, sn, types.intp, x, types.intp, types.intp, ss.dtype, ss.dtype, types.intp)

    def codegen(context, builder, sg, args):
        ass, asn, aoff, ax, aboff, acoff, ada, adx, an = args
        fty = context.get_value_type(sg.args[0].dtype)
        width = VECTOR_BYTES // context.get_abi_sizeof(fty)
        vty = ir.VectorType(fty, width)
        mask = ir.Constant(ir.VectorType(ir.IntType(32), width), [0] * width)
        splat = [builder.shuffle_vector(builder.insert_element(ir.Constant(vty, ir.Undefined), v,
                                                               ir.Constant(ir.IntType(32), 0)),
                                        ir.Constant(vty, ir.Undefined), mask) for v in (ada, adx)]
        acc = cgutils.alloca_once_value(builder, ir.Constant(vty, [0.0] * width))
        nontemporal = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        steps = builder.udiv(an, ir.Constant(an.type, width))
        with cgutils.for_range(builder, steps) as loop:
            k = builder.mul(loop.index, ir.Constant(an.type, width))
            s = load(builder, ass, builder.add(aoff, k), vty)
            b = load(builder, ax, builder.add(aboff, k), vty)
            c = load(builder, ax, builder.add(acoff, k), vty)
            v = builder.fadd(builder.fmul(s, splat[0], flags=("fast",)), builder.fmul(b, splat[1], flags=("fast",)),
                             flags=("fast",))
            ptr = builder.bitcast(data_ptr(builder, asn, builder.add(aoff, k)), vty.as_pointer())
            builder.store(v, ptr, align=VECTOR_BYTES).set_metadata("nontemporal", nontemporal)
            builder.store(builder.fadd(builder.load(acc), builder.fmul(v, c, flags=("fast",)), flags=("fast",)), acc)
        return reduce_sum(builder, builder.load(acc))

    return sig, codegen


@intrinsic
def store_fence(typingctx):
    """``sfence`` on x86 (orders this thread's streaming stores before its later stores); nothing elsewhere."""

    def codegen(context, builder, sig, args):
        if _X86:
            call(builder, "llvm.x86.sse.sfence", ir.VoidType(), [])
        return context.get_dummy_value()

    return types.void(), codegen


@nb.njit(inline="always", cache=True)
def streamable(sn, n):
    """Whether rows of n items of sn (C-contiguous, rows starting at multiples of n) take :func:`ssd_row`: sn of
    at least :data:`STREAM_MIN_BYTES`, n a multiple of the vector width and sn's data aligned to
    :data:`VECTOR_BYTES`."""
    width = VECTOR_BYTES // sn.itemsize
    return (_X86 and sn.size * sn.itemsize >= STREAM_MIN_BYTES and n % width == 0
            and sn.ctypes.data % VECTOR_BYTES == 0)
