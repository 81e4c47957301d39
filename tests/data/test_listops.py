"""ListOps: the label equals an independent evaluation of the token sequence."""

from __future__ import annotations

import numpy as np
import pytest

from ssmkit.data import get_task
from ssmkit.data.listops import to_text


def evaluate_text(text: str) -> tuple[int, int, int]:
    """Stack evaluation of LRA text -> (value, depth, widest argument list)."""
    stack: list[list] = []
    depth = widest = 0
    result = None
    for tok in text.split():
        if tok.startswith("["):
            stack.append([tok[1:]])
            depth = max(depth, len(stack))
        elif tok == "]":
            op, *args = stack.pop()
            widest = max(widest, len(args))
            value = {"MIN": min, "MAX": max, "SM": lambda a: sum(a) % 10,
                     "MED": lambda a: int(np.median(a))}[op](args)
            if stack:
                stack[-1].append(value)
            else:
                result = value
        else:
            if stack:
                stack[-1].append(int(tok))
            else:
                result = int(tok)
    assert not stack
    return result, depth, widest


@pytest.mark.parametrize("params", [
    dict(min_length=5, max_length=40, max_depth=4, max_args=5),
    dict(min_length=60, max_length=200, max_depth=10, max_args=10),
])
def test_label_is_the_value_of_the_expression(params):
    task = get_task("listops", **params, num_train=60)
    batch = task.sample(60, seed=4)
    assert batch["labels"].shape == (60,)
    lengths = batch["mask"].sum(1)
    assert int(lengths.min()) >= params["min_length"] and int(lengths.max()) <= params["max_length"]
    ops = set()
    for ids, label, n in zip(batch["input_ids"], batch["labels"], lengths, strict=True):
        text = to_text(ids[: int(n)].tolist())
        value, depth, widest = evaluate_text(text)
        assert value == int(label)
        assert depth <= params["max_depth"] - 1 and widest <= params["max_args"]
        assert text.count("[") == text.count("]")
        ops |= {t for t in text.split() if t.startswith("[")}
    assert ops == {"[MIN", "[MAX", "[MED", "[SM"}
    assert len(set(batch["labels"].tolist())) >= 5


def test_median_truncates_like_lra():
    from ssmkit.data.listops import apply_op

    assert apply_op(14, [1, 2]) == 1 and apply_op(14, [3, 8, 1, 6]) == 4 and apply_op(14, [5, 1, 9]) == 5
    assert apply_op(15, [9, 9, 3]) == 1 and apply_op(12, [4, 2, 7]) == 2 and apply_op(13, [4, 2, 7]) == 7


def test_text_form_round_trip():
    task = get_task("listops", min_length=3, max_length=12, max_depth=3, max_args=3, num_train=5)
    ex = task.example(0)
    text = to_text(ex["input_ids"])
    assert text.split()[0] in ("[MIN", "[MAX", "[MED", "[SM") and text.endswith("]")
