"""Decoding a pure-SSM model holds constant memory: 4096 new tokens after a 1024-token prompt cost no more than
1024 new tokens (within 5%).

Memory is the bytes malloc has handed out and not taken back (glibc ``mallinfo2``: ``uordblks + hblkhd``),
sampled after every step. That is where torch's CPU tensors live (and anything else C/C++ holds, such as an
autograd graph kept alive through a state), so it sees what tracemalloc cannot. The cost of generating n tokens
is the peak over those samples minus the heap in use before the call (so it includes the prefill's leftovers and
the state). Anything kept per step (a token tensor, logits, a state, a graph node: all >= ~100 B) adds well
over 5% across the 3072 extra steps; ``test_the_measure_sees_per_step_growth`` shows the measure failing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np
import pytest
import torch

from ssmkit.infer import stream_generate
from ssmkit.models import CausalLM, ModelConfig


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


MALLINFO2 = _mallinfo2()
pytestmark = pytest.mark.skipif(MALLINFO2 is None, reason="needs glibc >= 2.33 (mallinfo2)")


def heap_in_use() -> int:
    m = MALLINFO2()
    return m.uordblks + m.hblkhd


def decode_costs(stream, samples: np.ndarray, n_short: int, consume=None) -> tuple[int, int]:
    """(peak of the first n_short tokens, peak of all of them): the heap in use sampled after every step into
    ``samples`` (preallocated by the caller, so the measurement itself does not grow the heap)."""
    n = 0
    for tok in stream:
        if consume is not None:
            consume(tok)
        samples[n] = heap_in_use()
        n += 1
    samples = samples[:n]
    return int(samples[:n_short].max()), int(samples.max())


def small_lm(pattern: str) -> CausalLM:
    """Wide enough that a sequence's state (64 KB per layer) dwarfs the allocator's own jitter (a few KB of
    chunks parked in glibc's per-thread caches), short enough to step fast."""
    torch.manual_seed(0)
    opts = {"mamba": {"d_state": 64}, "mamba2": {"d_state": 64, "headdim": 32, "chunk_size": 64},
            "attn": {"n_heads": 2}}
    return CausalLM(ModelConfig(d_model=128, pattern=pattern, vocab_size=256, mixer_options=opts)).eval()


def _run(model, prompt_len: int, n_short: int, n_long: int, consume=None) -> tuple[int, int]:
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    # warm-up on the measured prompt: lazy imports, and numba compiling (or loading) every kernel the prefill and
    # the steps use, which with a cold cache would otherwise land inside the measurement
    for _ in stream_generate(model, prompt, 4, temperature=0):
        pass
    samples = np.zeros(n_long, dtype=np.int64)
    before = heap_in_use()
    short, long = decode_costs(stream_generate(model, prompt, n_long, temperature=0), samples, n_short,
                               consume)
    return short - before, long - before


def test_pure_ssm_decoding_memory_is_constant_in_generated_length():
    short, long = _run(small_lm("mamba"), 1024, 1024, 4096)
    assert short > 0
    assert long <= 1.05 * short, f"generating 4096 tokens cost {long} B vs {short} B for 1024"


def test_the_measure_sees_per_step_growth():
    """The same measure fails for things that grow per step: the caller keeping every token, and an attention
    layer's KV cache."""
    kept = []
    short, long = _run(small_lm("mamba2"), 256, 128, 512, consume=kept.append)
    assert long > 1.05 * short
    short, long = _run(small_lm("mamba,attn"), 256, 128, 512)
    assert long > 1.05 * short
