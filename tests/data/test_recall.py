"""MQAR and joint recall: every scored label must be recoverable from the context."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.data import IGNORE_INDEX, JointRecall, get_task


def check_mqar_example(ids: np.ndarray, labels: np.ndarray, v: int, n: int) -> list[int]:
    """Assert MQAR's invariants on one example; return the query offsets (in pairs) within the query region."""
    keys, values = ids[0 : 2 * n : 2], ids[1 : 2 * n : 2]
    assert len(set(keys.tolist())) == n, "keys must be distinct"
    assert len(set(values.tolist())) == n, "values must be distinct"
    assert ((keys >= 1) & (keys < v // 2)).all() and ((values >= v // 2) & (values < v)).all()
    assert (labels[: 2 * n] == IGNORE_INDEX).all()
    scored = np.flatnonzero(labels != IGNORE_INDEX)
    assert len(scored) == n, "every key is queried exactly once"
    assert ((scored - 2 * n) % 2 == 0).all()
    pair = dict(zip(keys.tolist(), values.tolist(), strict=True))
    assert sorted(ids[scored].tolist()) == sorted(keys.tolist())
    for t in scored:
        assert labels[t] == pair[int(ids[t])], "label = the value paired with the queried key"
    return ((scored - 2 * n) // 2).tolist()


@given(
    n=st.integers(1, 6),
    extra=st.integers(0, 20),
    vocab_extra=st.integers(1, 40),
    seed=st.integers(0, 2**31),
)
def test_mqar_labels_are_the_paired_values(n, extra, vocab_extra, seed):
    seq_len = 4 * n + extra
    vocab = seq_len + vocab_extra
    task = get_task("mqar", vocab_size=vocab, seq_len=seq_len, num_pairs=n, num_train=8)
    batch = task.sample(8, seed=seed)
    assert batch["input_ids"].shape == (8, seq_len)
    for ids, labels in zip(batch["input_ids"].numpy(), batch["labels"].numpy(), strict=True):
        check_mqar_example(ids, labels, vocab, n)


def test_mqar_query_gaps_follow_the_power_law():
    # p(i) ~ a*i^(a-1) with a=0.01 puts most mass on small gaps; a uniform placement would put half the queries
    # in the second half of the query region.
    n, seq_len = 4, 64
    task = get_task("mqar", vocab_size=256, seq_len=seq_len, num_pairs=n, num_train=400)
    space = (seq_len - 2 * n) // 2
    gaps = []
    for batch in task.batches("train", 200, seed=0):
        for ids, labels in zip(batch["input_ids"].numpy(), batch["labels"].numpy(), strict=True):
            gaps += check_mqar_example(ids, labels, 256, n)
    gaps = np.asarray(gaps)
    assert gaps.min() >= 0 and gaps.max() < space
    assert (gaps < space // 2).mean() > 0.65
    flat = get_task("mqar", vocab_size=256, seq_len=seq_len, num_pairs=n, power_a=1.0, num_train=400)
    flat_gaps = []
    for batch in flat.batches("train", 400, seed=0):
        for ids, labels in zip(batch["input_ids"].numpy(), batch["labels"].numpy(), strict=True):
            flat_gaps += check_mqar_example(ids, labels, 256, n)
    assert 0.4 < (np.asarray(flat_gaps) < space // 2).mean() < 0.6  # a=1 is uniform


def test_mqar_non_query_slots_are_random_tokens():
    task = get_task("mqar", vocab_size=64, seq_len=48, num_pairs=2, num_train=50)
    batch = task.sample(50, seed=1)
    ids, labels = batch["input_ids"], batch["labels"]
    free = (labels == IGNORE_INDEX)
    free[:, :4] = False
    vals = ids[free]
    assert len(set(vals.tolist())) > 40  # spread over the vocabulary, not a constant filler
    assert int(vals.min()) >= 0 and int(vals.max()) < 64


def test_joint_recall_labels_depend_on_context_and_key():
    task = get_task("joint_recall", vocab_size=64, num_contexts=3, num_pairs=5, num_queries=7, num_train=30)
    v, nc, nk, nq = 64, 3, 5, 7
    batch = task.sample(30, seed=2)
    assert batch["input_ids"].shape == (30, nc * (1 + 2 * nk) + 2 * nq) == (30, task.max_length)
    ambiguous = 0
    for ids, labels in zip(batch["input_ids"].numpy(), batch["labels"].numpy(), strict=True):
        table, key_sets = {}, []
        for c in range(nc):
            block = ids[c * (1 + 2 * nk) : (c + 1) * (1 + 2 * nk)]
            ctx = int(block[0])
            assert 1 <= ctx < v // 4
            keys = block[1::2].tolist()
            assert len(set(keys)) == nk and all(v // 4 <= k < v // 2 for k in keys)
            assert all(v // 2 <= x < v for x in block[2::2].tolist())
            key_sets.append(sorted(keys))
            for k, x in zip(keys, block[2::2].tolist(), strict=True):
                table[(ctx, k)] = x
        assert all(ks == key_sets[0] for ks in key_sets), "every context lists the same keys"
        q = ids[nc * (1 + 2 * nk) :]
        lab = labels[nc * (1 + 2 * nk) :]
        assert (labels[: nc * (1 + 2 * nk)] == IGNORE_INDEX).all()
        assert (lab[0::2] == IGNORE_INDEX).all()
        pairs = list(zip(q[0::2].tolist(), q[1::2].tolist(), strict=True))
        assert len(set(pairs)) == nq
        for (c, k), y in zip(pairs, lab[1::2].tolist(), strict=True):
            assert y == table[(c, k)]
            ambiguous += len({table[(c2, k)] for c2 in {cc for cc, _ in table}}) > 1
    assert ambiguous > 0  # the same key maps to different values in different contexts


def test_joint_recall_constraints():
    with pytest.raises(ValueError, match=r"num_contexts=20 is invalid: need num_contexts <= vocab_size//4 - 1 = 15"):
        JointRecall(vocab_size=64, num_contexts=20)
    with pytest.raises(ValueError, match=r"num_pairs=17 is invalid"):
        JointRecall(vocab_size=64, num_pairs=17)
