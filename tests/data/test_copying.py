"""Copying, selective copying and induction heads: labels are exactly the tokens to reproduce."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.data import IGNORE_INDEX, get_task


@given(vocab=st.integers(3, 20), seq_len=st.integers(1, 40), m=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_selective_copy_labels_are_data_tokens_in_order(vocab, seq_len, m, seed):
    m = min(m, seq_len)
    task = get_task("selective_copy", vocab_size=vocab, seq_len=seq_len, num_tokens=m, num_train=5)
    batch = task.sample(5, seed=seed)
    assert batch["input_ids"].shape == (5, seq_len + m)
    for ids, labels in zip(batch["input_ids"].numpy(), batch["labels"].numpy(), strict=True):
        region, markers = ids[:seq_len], ids[seq_len:]
        data = region[region != 0]
        assert len(data) == m and (data >= 2).all() and (data < vocab).all()
        assert (markers == 1).all()
        assert (labels[:seq_len] == IGNORE_INDEX).all()
        assert labels[seq_len:].tolist() == data.tolist()


def test_selective_copy_spacing_is_random():
    task = get_task("selective_copy", vocab_size=16, seq_len=64, num_tokens=4, num_train=20)
    ids = task.sample(20, seed=0)["input_ids"][:, :64].numpy()
    positions = {tuple(np.flatnonzero(row)) for row in ids}
    assert len(positions) > 15


@given(vocab=st.integers(3, 20), m=st.integers(1, 20), lag=st.integers(0, 30), seed=st.integers(0, 2**31))
def test_copying_reproduces_the_prefix(vocab, m, lag, seed):
    task = get_task("copying", vocab_size=vocab, num_tokens=m, lag=lag, num_train=4)
    batch = task.sample(4, seed=seed)
    assert batch["input_ids"].shape == (4, 2 * m + lag) == (4, task.max_length)
    for ids, labels in zip(batch["input_ids"].numpy(), batch["labels"].numpy(), strict=True):
        assert ((ids[:m] >= 2) & (ids[:m] < vocab)).all()
        assert (ids[m : m + lag] == 0).all() and (ids[m + lag :] == 1).all()
        assert (labels[: m + lag] == IGNORE_INDEX).all()
        assert labels[m + lag :].tolist() == ids[:m].tolist()


@given(vocab=st.integers(3, 20), seq_len=st.integers(3, 50), seed=st.integers(0, 2**31))
def test_induction_label_is_the_token_after_the_trigger(vocab, seq_len, seed):
    task = get_task("induction_heads", vocab_size=vocab, seq_len=seq_len, num_train=4)
    batch = task.sample(4, seed=seed)
    for ids, labels in zip(batch["input_ids"].numpy(), batch["labels"].numpy(), strict=True):
        triggers = np.flatnonzero(ids == 0)
        assert len(triggers) == 2 and triggers[1] == seq_len - 1
        assert (labels[:-1] == IGNORE_INDEX).all()
        assert labels[-1] == ids[triggers[0] + 1] != 0
