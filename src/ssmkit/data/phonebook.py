"""Multi-number phone-book lookup (the Birdie paper's retrieval task), tokenised byte-level by default."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from .base import IGNORE_INDEX, Example, GeneratedTask
from .params import GeneratedParams, param
from .tokenizers import TOKENIZERS, get_tokenizer

ONSETS = ("b", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh", "br", "tr")
NUCLEI = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
CODAS = ("", "", "", "n", "l", "r", "s", "m")
MAX_SYLLABLES = 3


@dataclass(frozen=True, kw_only=True)
class PhonebookParams(GeneratedParams):
    num_entries: int = param(20, "names in the phone book", ge=1)
    min_queries: int = param(1, "fewest names asked for per example", ge=1)
    max_queries: int = param(3, "most names asked for per example (the count is uniform in between)", ge=1)
    question: str = param("both", "where the question goes relative to the book", choices=("before", "after", "both"))
    tokenizer: str = param("byte", "tokenizer of the text", choices=TOKENIZERS)
    name_parts: int = param(2, "words per name: 2 ('First Last', the paper's) or 1 (shorter books)", ge=1, le=2)
    digits: int = param(10, "digits per number (10: the paper's XXX-XXX-XXXX; otherwise plain digits)", ge=1,
                        le=10)

    def validate(self) -> None:
        if self.max_queries < self.min_queries:
            self.fail("max_queries", f"need max_queries >= min_queries={self.min_queries}")
        if self.max_queries > self.num_entries:
            self.fail("max_queries", f"need max_queries <= num_entries={self.num_entries}")
        if self.num_entries > 10 ** self.digits:
            self.fail("num_entries", f"need num_entries <= 10**digits={10 ** self.digits} (numbers are distinct)")


def random_name(rng: np.random.Generator, parts_: int = 2) -> str:
    """'First Last' (``parts_`` = 2) or 'First' (1), each part 2-3 syllables (onset + nucleus + optional coda),
    capitalised."""
    parts = []
    for _ in range(parts_):
        n = int(rng.integers(2, MAX_SYLLABLES + 1))
        syl = [ONSETS[rng.integers(len(ONSETS))] + NUCLEI[rng.integers(len(NUCLEI))] + CODAS[rng.integers(len(CODAS))]
               for _ in range(n)]
        parts.append("".join(syl).capitalize())
    return " ".join(parts)


def random_number(rng: np.random.Generator, digits: int = 10) -> str:
    """``digits`` random digits: ``XXX-XXX-XXXX`` for 10 (the paper's format), else the plain digits."""
    d = "".join(str(x) for x in rng.integers(0, 10, size=digits))
    return f"{d[:3]}-{d[3:6]}-{d[6:]}" if digits == 10 else d


def format_question(names: list[str]) -> str:
    if len(names) == 1:
        return f"What is the phone number for {names[0]}?"
    return f"What are the phone numbers for {', '.join(names)}?"


class Phonebook(GeneratedTask):
    """Phone-book retrieval with several numbers per request (Birdie).

    Text: ``"What are the phone numbers for A, B? Find them in the phonebook below.\\n"`` (when the question is
    "before" or "both"), then one line ``Name : XXX-XXX-XXXX`` per entry, then the question again (when "after"
    or "both"; "... in the phonebook above." when it is only after), then ``"Answer: "``. The target is the
    queried numbers in the order asked, joined by ``", "``, followed by <eos>. Labels are -100 on the prompt and
    the target tokens on the answer (teacher forcing: the input holds the answer shifted by one).

    Metric ``digit_accuracy``: fraction of digit positions of the answer predicted right; chance is 10% (a random
    or constant digit). Also ``accuracy`` (every answer token), ``sequence_accuracy`` (whole answer right) and ``loss``.
    """

    name: ClassVar[str] = "phonebook"
    description: ClassVar[str] = "phone-book lookup (Birdie): give the numbers of 1..k named people from a book"
    metric: ClassVar[str] = "digit_accuracy"
    padded: ClassVar[bool] = True
    cache_elements: ClassVar[int] = 20_000_000
    Params = PhonebookParams

    def _setup(self) -> None:
        p = self.params
        self.tokenizer = get_tokenizer(p.tokenizer)
        self.vocab_size = self.tokenizer.vocab_size
        self.pad_id = self.tokenizer.pad_id
        self._digit_token = self.tokenizer.digit_mask()
        # upper bound of the token length (tokens never outnumber bytes)
        syllable = max(map(len, ONSETS)) + max(map(len, NUCLEI)) + max(map(len, CODAS))
        longest = 2 * MAX_SYLLABLES * syllable + 1  # longest possible "First Last"
        q = len(format_question(["x"] * p.max_queries)) - p.max_queries + p.max_queries * longest
        n_questions = 2 if p.question == "both" else 1
        self.max_length = (
            n_questions * (q + 1) + len(" Find them in the phonebook below.") + p.num_entries * (longest + 16)
            + len("Answer: ") + 14 * p.max_queries + 1
        )

    @property
    def chance_level(self) -> float:
        return 0.1

    def text(self, rng: np.random.Generator) -> tuple[str, str, dict[str, str], list[str]]:
        """(prompt, target, book {name: number}, queried names) of one example."""
        p = self.params
        book: dict[str, str] = {}
        numbers: set[str] = set()
        while len(book) < p.num_entries:
            name, number = random_name(rng, p.name_parts), random_number(rng, p.digits)
            if name not in book and number not in numbers:
                book[name] = number
                numbers.add(number)
        names = list(book)
        k = int(rng.integers(p.min_queries, p.max_queries + 1))
        asked = [names[i] for i in rng.choice(len(names), size=k, replace=False)]
        question = format_question(asked)
        it = "it" if k == 1 else "them"
        lines = "".join(f"{n} : {book[n]}\n" for n in names)
        if p.question == "before":
            prompt = f"{question} Find {it} in the phonebook below.\n{lines}"
        elif p.question == "after":
            prompt = f"{lines}{question} Find {it} in the phonebook above.\n"
        else:
            prompt = f"{question} Find {it} in the phonebook below.\n{lines}{question}\n"
        prompt += "Answer: "
        target = ", ".join(book[n] for n in asked)
        return prompt, target, book, asked

    def _example(self, rng: np.random.Generator) -> Example:
        prompt, target, _, _ = self.text(rng)
        prompt_ids = self.tokenizer.encode(prompt)
        target_ids = [*self.tokenizer.encode(target), self.tokenizer.eos_id]
        full = np.asarray(prompt_ids + target_ids, dtype=np.int64)
        labels = np.full(len(full) - 1, IGNORE_INDEX, dtype=np.int64)
        labels[len(prompt_ids) - 1 :] = target_ids
        return {"input_ids": full[:-1], "labels": labels}

    def _metric_sums(self, outputs: Tensor, batch: Mapping[str, Tensor]) -> dict[str, tuple[float, float]]:
        sums = super()._metric_sums(outputs, batch)
        labels = batch["labels"]
        logits = self._check_logits(outputs, labels)
        preds = (logits.argmax(-1) if logits is not None else outputs).cpu()
        scored = labels != IGNORE_INDEX
        is_digit = scored.clone()
        is_digit[scored] = torch.from_numpy(self._digit_token[labels[scored].numpy()])
        sums["digit_accuracy"] = (float(((preds == labels) & is_digit).sum()), float(is_digit.sum()))
        return sums
