"""The integer-activation row products on every instruction set (VNNI ``vpdpbusd``, AVX-512BW, generic) and on
several threads, against the float64 oracle ssmkit.ops.reference.q8_linear: the int32 lane sums are exact, so in
float64 only the float summation order of the scaled sums differs (1e-12)."""

from __future__ import annotations

import os
import subprocess
import sys

import numba as nb
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.ops import _numba_decode as D
from ssmkit.ops import _numba_q4 as Q4
from ssmkit.ops import _numba_q8 as Q8
from ssmkit.ops import fused_kernels, reference
from ssmkit.ops.decode_linear import decode_linear
from ssmkit.ops.int4_linear import quantize_int4
from ssmkit.ops.int8_linear import quantize_int8
from ssmkit.ops.threads import KERNEL_LOCK

# the host's own set (Q8.ISA) runs in every decode test (decode_linear, the fused stacks); here the others are
# forced (their row functions compiled apart, without the cache); "vnni-emulated" checks VNNI's unsigned weights
# and per-lane offsets on any CPU (for int4 it is the generic set, which already starts from the offsets)
FORCED = [isa for isa in Q8.ISAS if isa not in ("vnni", Q8.ISA)]
FORCED_INT4 = [isa for isa in FORCED if isa != "vnni-emulated"]
_RUNNERS: dict = {}


def _runner(isa: str):
    """A jitted f(x, w, scale, bias, buf): quantize x, lay it out and run ``isa``'s row function over all rows."""
    if isa not in _RUNNERS:
        r8, r4 = Q8.make_rows_int8(isa), Q4.make_rows_int4(isa)

        @nb.njit
        def run(x, w, scale, bias, buf):
            qb = D._act_buffers(x.shape[0], x.shape[1], x)
            Q8.quantize_rows(x, qb[0], qb[1], qb[2])
            if scale.ndim == 2:
                Q4.pack_acts(qb[0], qb[1], x.shape[1] // scale.shape[1], qb[3], qb[4], qb[5])
                r4(qb[3], qb[4], qb[5], w, 0, w.shape[0], scale, bias, buf)
            else:
                Q8.pack_acts8(qb[0], qb[1], qb[4], qb[5])
                r8(qb[0], qb[1], qb[4], qb[5], w, 0, w.shape[0], scale, bias, buf)

        _RUNNERS[isa] = run
    return _RUNNERS[isa]


def _case(rows: int, k: int, out: int, group: int, seed: int, extreme: bool = False):
    """x (rows, k) float64, the weight (int8 for group 0, else int4 of ``group``), its scale and a bias.
    ``extreme``: every activation and weight at the end of its range (|q| = 127, nibbles 1 and 15)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g, dtype=torch.float64)
    w = torch.randn(out, k, generator=g)
    if extreme:
        x, w = x.sign() + (x == 0), w.sign() + (w == 0)
    q, s = quantize_int4(w, group) if group else quantize_int8(w)
    return x, q, s.double(), torch.randn(out, generator=g, dtype=torch.float64)


def _check(isa: str, x, q, s, b) -> None:
    """``isa``'s rows (or, for "host", decode_linear's fused kernel) against the float64 oracle."""
    if isa == "host":
        with fused_kernels(True):
            got = decode_linear(x, q, b, scale=s, act_quant=True)
    else:
        buf = np.zeros((q.shape[0], x.shape[0]))
        _runner(isa)(x.numpy(), q.numpy(), s.numpy(), b.numpy(), buf)
        got = torch.from_numpy(buf.T)
    torch.testing.assert_close(got, reference.q8_linear(x, q, s, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("isa", FORCED)
@settings(max_examples=8, deadline=None)
@given(rows=st.integers(1, 3), k=st.integers(1, 200), out=st.integers(1, 9), seed=st.integers(0, 99))
def test_int8_rows_on_each_instruction_set(isa, rows, k, out, seed):
    """Any in_features: full steps of 64 in lanes, the rest (a partial step) per element."""
    _check(isa, *_case(rows, k, out, 0, seed))


@pytest.mark.parametrize("isa", FORCED_INT4)
@settings(max_examples=8, deadline=None)
@given(rows=st.integers(1, 3), groups=st.integers(1, 5), group=st.sampled_from([32, 64, 128]),
       out=st.integers(1, 9), seed=st.integers(0, 99))
def test_int4_rows_on_each_instruction_set(isa, rows, groups, group, out, seed):
    """An odd number of groups of 32 ends in a half step (16 bytes)."""
    _check(isa, *_case(rows, groups * group, out, group, seed))


@pytest.mark.parametrize(("isa", "group"), [(isa, group) for isa in ["host", *FORCED] for group in (0, 32, 128)
                                             if group == 0 or isa in ("host", *FORCED_INT4)])
def test_products_at_the_ends_of_the_ranges(isa, group):
    """|q| = 127 everywhere and weights +-127 / nibbles 1 and 15: no 16-bit saturation, exact offsets."""
    _check(isa, *_case(2, 256 + 32 * (group != 128), 6, group, 0, extreme=True))


def test_instruction_set_follows_the_compile_target(monkeypatch):
    """The row functions' set is the widest the features numba compiles for allow: NUMBA_CPU_FEATURES when set
    (a cache built for a portable target must not hold VNNI code), else the host's."""
    pick = lambda spec: Q8.isa_for(Q8.target_features(spec))  # noqa: E731
    assert pick("+avx2,+avx512f,+avx512bw,+avx512vnni") == "vnni"
    assert pick("+avx512f,+avx512bw,-avx512vnni") == "avx512bw"
    assert pick("+avx2,-avx512bw,+avx512vnni") == "generic"
    assert pick("") == "generic"
    monkeypatch.setattr(nb.config, "CPU_FEATURES", "+avx2,+fma,-avx512bw")
    assert Q8.isa_for(Q8.target_features()) == "generic"
    monkeypatch.setattr(nb.config, "CPU_FEATURES", None)
    from numba.core.codegen import get_host_cpu_features

    assert Q8.target_features() == Q8.target_features(get_host_cpu_features())
    assert Q8.ISA == Q8.isa_for(Q8.target_features())  # this process's own setting
    env = {**os.environ, "NUMBA_CPU_FEATURES": "+sse2,+avx2,+fma"}
    out = subprocess.run([sys.executable, "-c", "from ssmkit.ops import _numba_q8 as Q8; print(Q8.ISA)"], env=env,
                         capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "generic"


def test_unknown_instruction_set_is_refused():
    with pytest.raises(ValueError, match="isa must be one of"):
        Q8.make_rows_int8("sse2")
    with pytest.raises(ValueError, match="isa must be one of"):
        Q4.make_rows_int4("neon")


@pytest.mark.parametrize("group", [0, 32, 64])
@pytest.mark.parametrize("n_threads", [2, 3])
def test_linear_kernel_with_integer_activations_on_several_threads(group, n_threads):
    """The one-launch linear kernel with 2 numba threads sharing 2 or 3 workers' chunks (several chunks of 64
    rows each): every row as the oracle, and bitwise the one-thread result."""
    x, q, s, b = _case(3, 160 if group != 64 else 192, 203, group, 1)
    outs = []
    with KERNEL_LOCK:
        old = nb.get_num_threads()
        try:
            for threads in (1, n_threads):
                nb.set_num_threads(min(2, nb.config.NUMBA_NUM_THREADS) if threads > 1 else 1)
                out = np.zeros((3, q.shape[0]))
                counters = np.zeros(D.counter_slots(1, threads), dtype=np.int64)
                D.linear(x.numpy(), q.numpy(), s.numpy(), b.numpy(), out, counters, threads, True)
                outs.append(out)
        finally:
            nb.set_num_threads(old)
    torch.testing.assert_close(torch.from_numpy(outs[1]), reference.q8_linear(x, q, s, b), rtol=1e-12, atol=1e-12)
    assert np.array_equal(outs[0], outs[1])
