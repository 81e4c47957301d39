"""chunked_loss_backward(resident_heap=True): the same gradients, bit for bit; only the heap policy changes."""

from __future__ import annotations

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
