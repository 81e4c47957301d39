"""chunked_loss_backward(resident_heap=True): the same gradients, bit for bit; only the heap policy changes."""

from __future__ import annotations

import threading

import pytest
import torch

from ssmkit.models import CausalLM
from ssmkit.train import resident_heap as rh
from ssmkit.train.chunked import chunked_loss_backward
from tests.train.test_chunked import build, chunked, lm_batch


@pytest.mark.parametrize("pattern", ["mamba*2", "mamba2,s4d"])
def test_same_gradients_bitwise(pattern):
    model = build(CausalLM, pattern, seed=1)
    batch = lm_batch(2, 37, seed=3)
    s0, g0 = chunked(model, batch, 8)
    s1, g1 = chunked(model, batch, 8, resident_heap=True)
    assert s0 == s1
    assert g0.keys() == g1.keys()
    for name, g in g0.items():
        assert torch.equal(g, g1[name]), name


def test_environment_threshold_rules(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    with rh.resident_heap() as on:
        assert on is False


def test_bad_flag_names_the_argument():
    model = build(CausalLM, "mamba", seed=0)
    with pytest.raises(TypeError, match="resident_heap"):
        chunked_loss_backward(model, lm_batch(1, 8), 4, resident_heap=1)


def test_thresholds_raised_inside_and_restored_after(monkeypatch):
    calls = []
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setattr(rh, "_MALLOPT", lambda param, value: calls.append((param, value)) or 1)
    monkeypatch.setattr(rh, "heap_bounded", lambda: False)
    with rh.resident_heap() as on:
        assert on is True
        assert calls == [(rh.M_MMAP_THRESHOLD, rh.RESIDENT_THRESHOLD), (rh.M_TRIM_THRESHOLD, rh.RESIDENT_THRESHOLD)]
    assert calls[2:] == [(rh.M_MMAP_THRESHOLD, rh.GLIBC_MMAP_MAX), (rh.M_TRIM_THRESHOLD, 2 * rh.GLIBC_MMAP_MAX)]
    calls.clear()
    monkeypatch.setattr(rh, "heap_bounded", lambda: True)  # the bounded heap's 1 MiB threshold comes back
    with rh.resident_heap():
        pass
    assert calls[2:] == [(rh.M_MMAP_THRESHOLD, rh.MMAP_THRESHOLD), (rh.M_TRIM_THRESHOLD, 2 * rh.MMAP_THRESHOLD)]


def test_nested_and_threaded_blocks_restore_once_at_the_last_exit(monkeypatch):
    """The thresholds are process-wide: an inner block (or another thread's) must not restore them while an
    outer block still runs."""
    calls = []
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setattr(rh, "_MALLOPT", lambda param, value: calls.append((param, value)) or 1)
    monkeypatch.setattr(rh, "heap_bounded", lambda: False)
    raised = [(rh.M_MMAP_THRESHOLD, rh.RESIDENT_THRESHOLD), (rh.M_TRIM_THRESHOLD, rh.RESIDENT_THRESHOLD)]
    restored = [(rh.M_MMAP_THRESHOLD, rh.GLIBC_MMAP_MAX), (rh.M_TRIM_THRESHOLD, 2 * rh.GLIBC_MMAP_MAX)]
    with rh.resident_heap():
        with rh.resident_heap():
            pass
        assert calls == raised  # the inner exit left them raised
    assert calls == raised + restored
    calls.clear()
    inside, release = threading.Barrier(3), threading.Event()

    def worker():
        with rh.resident_heap():
            inside.wait(timeout=30)
            release.wait(timeout=30)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait(timeout=30)  # both threads are inside
    assert calls == raised
    release.set()
    for t in threads:
        t.join(timeout=30)
    assert calls == raised + restored and rh._users == 0


def test_chunked_backward_enters_it_only_when_asked(monkeypatch):
    calls = []
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setattr(rh, "_MALLOPT", lambda param, value: calls.append((param, value)) or 1)
    model = build(CausalLM, "mamba", seed=0)
    chunked_loss_backward(model, lm_batch(1, 8), 4)
    assert calls == []
    chunked_loss_backward(model, lm_batch(1, 8), 4, resident_heap=True)
    assert (rh.M_MMAP_THRESHOLD, rh.RESIDENT_THRESHOLD) in calls and len(calls) == 4
