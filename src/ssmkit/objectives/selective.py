"""Selective copying: find spans of a context from the tokens around them.

Format (P = <|SELECTIVE_COPY|>, C = [CONTEXT] text [/CONTEXT], Q_i = [QUERY] <i> before_i [SEP] after_i)::

    input = P Q_0 Q_1 ... Q_{k-1} C      (query before the context)   or   P C Q_0 ... Q_{k-1}   (after)
    label = <0> span_0 <1> span_1 ... <k-1> span_{k-1} [DONE]

k in [1, 4] queries; span_i is 4-32 tokens of the context and before_i / after_i are the 1-8 tokens just before and
just after it (delimiters). Spans and their delimiters do not overlap; they are laid out left to right with
random gaps, then presented in a random order, numbered in the order presented, and answered in that order.
A delimiter pair may also occur elsewhere in the text (as in the paper; nothing checks uniqueness).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .objectives import Objective, Pair, check_range
from .vocab import ObjectiveVocab

_POSITIONS = ("random", "before", "after")


class SelectiveCopying(Objective):
    """Selective copying (see the module docstring).

    Args:
        vocab: special tokens.
        lengths: context lengths drawn by the batch source.
        num_queries: (lo, hi) number of query blocks.
        delimiter: (lo, hi) length of each delimiter.
        span: (lo, hi) length of each requested span.
        query_position: "random" (before or after with probability 1/2), "before" or "after" the context.
    """

    family = "selective_copying"

    def __init__(self, vocab: ObjectiveVocab, lengths: tuple[int, int] = (256, 1024),
                 num_queries: tuple[int, int] = (1, 4), delimiter: tuple[int, int] = (1, 8),
                 span: tuple[int, int] = (4, 32), query_position: str = "random") -> None:
        owner = type(self).__name__
        self.num_queries = check_range(owner, "num_queries", num_queries)
        self.delimiter = check_range(owner, "delimiter", delimiter)
        self.span = check_range(owner, "span", span)
        if query_position not in _POSITIONS:
            raise ValueError(f"{owner}: unknown query_position {query_position!r}; expected one of {_POSITIONS}")
        self.query_position = query_position
        if self.num_queries[1] > vocab.num_placeholders:
            raise ValueError(f"{owner}: num_queries up to {self.num_queries[1]} needs as many placeholders, the "
                             f"vocab has {vocab.num_placeholders}")
        super().__init__(vocab, lengths)

    @property
    def min_text(self) -> int:  # type: ignore[override]
        return 2 * self.delimiter[0] + self.span[0]

    def params(self) -> dict[str, Any]:
        return {"num_queries": self.num_queries, "delimiter": self.delimiter, "span": self.span,
                "query_position": self.query_position}

    @staticmethod
    def _overhead(db: np.ndarray, da: np.ndarray, lens: np.ndarray) -> int:
        """Packed length besides the context text: paradigm, context markers, queries, answers, [DONE]."""
        return int(1 + 2 + (db + da + 3).sum() + (lens + 1).sum() + 1)

    @property
    def min_budget(self) -> int:
        d, s = self.delimiter[0], self.span[0]
        one = np.array([d])
        return self._overhead(one, one, np.array([s])) + self.min_text

    def build(self, text: np.ndarray, rng: np.random.Generator, budget: int) -> Pair | None:
        n = len(text)
        k = int(rng.integers(self.num_queries[0], self.num_queries[1] + 1))
        lens = rng.integers(self.span[0], self.span[1] + 1, size=k)
        db = rng.integers(self.delimiter[0], self.delimiter[1] + 1, size=k)
        da = rng.integers(self.delimiter[0], self.delimiter[1] + 1, size=k)
        while True:
            m = min(n, budget - self._overhead(db, da, lens))
            if int((db + lens + da).sum()) <= m:
                break
            if k > 1:  # drop the last query
                k -= 1
                lens, db, da = lens[:k], db[:k], da[:k]
            elif (lens[0], db[0], da[0]) != (self.span[0], self.delimiter[0], self.delimiter[0]):
                lens[0], db[0], da[0] = self.span[0], self.delimiter[0], self.delimiter[0]
            else:
                return None
        free = m - int((db + lens + da).sum())
        cuts = np.sort(rng.integers(0, free + 1, size=k))
        gaps = np.diff(np.concatenate([[0], cuts, [free]]))
        starts, pos = [], int(gaps[0])
        for j in range(k):
            starts.append(pos + int(db[j]))  # the span's first token
            pos += int(db[j] + lens[j] + da[j] + gaps[j + 1])
        v = self.vocab
        queries, answers = [], []
        for q, j in enumerate(rng.permutation(k)):
            s, e = starts[j], starts[j] + int(lens[j])
            ph = v.placeholder(q)
            queries.append(np.concatenate([[v.query_id, ph], text[s - db[j]:s], [v.sep_id], text[e:e + da[j]]]))
            answers.append(np.concatenate([[ph], text[s:e]]))
        context = np.concatenate([[v.context_open_id], text[:m], [v.context_close_id]])
        before = self.query_position == "before" or (self.query_position == "random" and rng.random() < 0.5)
        body = [*queries, context] if before else [context, *queries]
        label = np.concatenate([*answers, [v.done_id]]).astype(np.int64)
        return Pair(self._with_paradigm(*body), label, m)
