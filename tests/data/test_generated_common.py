"""Properties every generated task shares: determinism, batching, shapes/dtypes, labels, metrics and loss."""

from __future__ import annotations

import math

import pytest
import torch

from ssmkit.data import IGNORE_INDEX, get_task

from .util import assert_batches_equal, perfect_logits

SMALL = {
    "mqar": dict(vocab_size=64, seq_len=32, num_pairs=4),
    "joint_recall": dict(vocab_size=64, num_contexts=3, num_pairs=4, num_queries=5),
    "phonebook": dict(num_entries=4, max_queries=2),
    "selective_copy": dict(vocab_size=10, seq_len=24, num_tokens=5),
    "copying": dict(vocab_size=10, num_tokens=5, lag=7),
    "induction_heads": dict(vocab_size=8, seq_len=20),
    "listops": dict(min_length=5, max_length=30, max_depth=4, max_args=4),
}
SIZES = dict(num_train=40, num_val=13, num_test=9)


@pytest.fixture(scope="module", params=sorted(SMALL))
def task(request):
    return get_task(request.param, **SMALL[request.param], **SIZES)


def cat(batches, pad_id=0):
    """Concatenate batches (right-padding sequence keys to a common length)."""
    out = {}
    for key in batches[0]:
        parts = [b[key] for b in batches]
        if parts[0].ndim >= 2 and key != "inputs":
            length = max(p.shape[1] for p in parts)
            fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "mask": False, "reset": False}[key]
            parts = [torch.nn.functional.pad(p, (0, length - p.shape[1]), value=fill) for p in parts]
        out[key] = torch.cat(parts)
    return out


def test_deterministic_per_seed(task):
    assert_batches_equal(task.sample(6, seed=3), task.sample(6, seed=3))
    a, b = task.sample(6, seed=3)["input_ids"], task.sample(6, seed=4)["input_ids"]
    assert a.shape != b.shape or not torch.equal(a, b)


def test_global_rng_untouched(task):
    torch.manual_seed(0)
    state = torch.get_rng_state()
    import numpy as np

    np_state = np.random.get_state()[1].copy()
    task.sample(4, seed=1)
    assert torch.equal(state, torch.get_rng_state())
    assert (np_state == np.random.get_state()[1]).all()


def test_content_independent_of_batch_size(task):
    whole = cat(list(task.batches("val", 13, seed=5)), task.pad_id)
    pieces = list(task.batches("val", 4, seed=5))
    assert [len(p["labels"]) for p in pieces] == [4, 4, 4, 1]
    assert task.num_batches("val", 4) == 4
    assert_batches_equal(whole, cat(pieces, task.pad_id))
    # the example API gives the same rows
    ex = task.example(2, seed=5, split="val")
    n = len(ex["input_ids"])
    assert torch.equal(whole["input_ids"][2, :n], torch.tensor(ex["input_ids"]))


def test_splits_differ_and_epochs_reshuffle(task):
    train = task.sample(8, seed=0)["input_ids"]
    val = next(task.batches("val", 8, seed=0))["input_ids"]
    assert train.shape != val.shape or not torch.equal(train, val)
    e0 = cat(list(task.batches("train", 40, seed=1, epoch=0)))
    e1 = cat(list(task.batches("train", 40, seed=1, epoch=1)))
    assert not torch.equal(e0["input_ids"], e1["input_ids"])  # order changes
    key = lambda b: sorted(tuple(r.tolist()) for r in b["input_ids"])  # noqa: E731
    assert key(e0) == key(e1)  # same examples
    assert sum(1 for _ in task.batches("train", 16, drop_last=True)) == 2
    with pytest.raises(ValueError, match="split='dev' is invalid: must be one of train, val, test"):
        next(task.batches("dev", 4))
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        next(task.batches("train", 0))
    with pytest.raises(ValueError, match="only 9 examples"):
        task.sample(10, split="test")


def test_shapes_dtypes_and_labels(task):
    batch = task.sample(8, seed=2)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.dtype == torch.long and ids.ndim == 2 and ids.shape[0] == 8
    assert ids.shape[1] <= task.max_length
    assert 0 <= int(ids.min()) and int(ids.max()) < task.vocab_size
    assert labels.dtype == torch.long
    if task.kind == "lm":
        assert labels.shape == ids.shape
        scored = labels != IGNORE_INDEX
        assert scored.any(1).all()
        assert int(labels[scored].min()) >= 0 and int(labels[scored].max()) < task.vocab_size
        assert (labels[~scored] == IGNORE_INDEX).all()
    else:
        assert labels.shape == (8,)
        assert 0 <= int(labels.min()) and int(labels.max()) < task.num_classes
    if task.padded:
        mask = batch["mask"]
        assert mask.dtype == torch.bool and mask.shape == ids.shape
        assert (ids[~mask] == task.pad_id).all()
        assert mask[:, 0].all() and mask.any(0).all()  # right padding, no all-pad column
        if task.kind == "lm":
            assert (labels[~mask] == IGNORE_INDEX).all()
    else:
        assert "mask" not in batch


def test_metrics_and_loss(task):
    batch = task.sample(8, seed=7)
    logits = perfect_logits(task, batch)
    m = task.evaluate(logits, batch)
    assert m[task.metric] == 1.0 and m["accuracy"] == 1.0
    assert m["loss"] < 1e-3
    assert task.evaluate(logits.argmax(-1), batch)["accuracy"] == 1.0
    wrong = (logits.argmax(-1) + 1) % (task.vocab_size if task.kind == "lm" else task.num_classes)
    assert task.evaluate(wrong, batch)["accuracy"] == 0.0
    # the evaluator weights scored items, not batches
    ev = task.evaluator()
    halves = [{k: v[:3] for k, v in batch.items()}, {k: v[3:] for k, v in batch.items()}]
    ev.update(logits[:3], halves[0])
    ev.update(wrong[3:], halves[1])
    scored = lambda b: int((b["labels"] != IGNORE_INDEX).sum())  # noqa: E731
    assert math.isclose(ev.compute()["accuracy"], scored(halves[0]) / scored(batch))
    # differentiable loss; padded vocab is accepted
    raw = torch.randn(*logits.shape[:-1], logits.shape[-1] + 3, requires_grad=True)
    loss = task.loss(raw, batch)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and raw.grad is not None
    with pytest.raises(ValueError, match="outputs"):
        task.evaluate(logits[:, :-1] if task.kind == "lm" else logits[:, :2], batch)
    with pytest.raises(ValueError, match="logits"):
        task.loss(logits.argmax(-1), batch)


def test_chance_level(task):
    assert 0.0 < task.chance_level <= 0.5
