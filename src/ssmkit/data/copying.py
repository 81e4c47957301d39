"""Memory tasks from the Mamba paper: copying, selective copying and induction heads.

Token layout for the copying tasks: 0 = blank, 1 = marker, data symbols are 2..V-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import IGNORE_INDEX, Example, GeneratedTask
from .params import GeneratedParams, param

BLANK, MARKER = 0, 1


@dataclass(frozen=True, kw_only=True)
class SelectiveCopyParams(GeneratedParams):
    vocab_size: int = param(16, "vocabulary V including blank (0) and marker (1); data symbols are 2..V-1", ge=3)
    seq_len: int = param(256, "length L of the region the data tokens are scattered in", ge=1)
    num_tokens: int = param(16, "data tokens M to remember (then M marker positions)", ge=1)

    def validate(self) -> None:
        if self.num_tokens > self.seq_len:
            self.fail("num_tokens", f"need num_tokens <= seq_len={self.seq_len}")


class SelectiveCopy(GeneratedTask):
    """Selective copying (Mamba): M data tokens at random positions among L blanks, then M markers.

    Input ``(L scattered region) + (M markers)``; the label at marker j is the j-th data token in order of
    appearance, -100 elsewhere. Solving it needs content-dependent (selective) memory: the spacing is random.

    Metric ``accuracy`` over the M marker positions; chance is 1/(V-2). ``sequence_accuracy``: all M right.
    """

    name: ClassVar[str] = "selective_copy"
    description: ClassVar[str] = "selective copying (Mamba): copy M tokens scattered among L blanks, in order"
    Params = SelectiveCopyParams

    def _setup(self) -> None:
        self.vocab_size = self.params.vocab_size
        self.max_length = self.params.seq_len + self.params.num_tokens

    @property
    def chance_level(self) -> float:
        return 1.0 / (self.params.vocab_size - 2)

    def _example(self, rng: np.random.Generator) -> Example:
        p = self.params
        positions = np.sort(rng.choice(p.seq_len, size=p.num_tokens, replace=False))
        data = rng.integers(2, p.vocab_size, size=p.num_tokens)
        ids = np.full(p.seq_len + p.num_tokens, BLANK, dtype=np.int64)
        ids[positions] = data
        ids[p.seq_len :] = MARKER
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        labels[p.seq_len :] = data
        return {"input_ids": ids, "labels": labels}


@dataclass(frozen=True, kw_only=True)
class CopyingParams(GeneratedParams):
    vocab_size: int = param(16, "vocabulary V including blank (0) and marker (1); data symbols are 2..V-1", ge=3)
    num_tokens: int = param(16, "length M of the sequence to copy", ge=1)
    lag: int = param(64, "blank tokens between the sequence and its reproduction", ge=0)


class Copying(GeneratedTask):
    """Copying: M random data tokens, a run of ``lag`` blanks, then M markers at which the data is reproduced.

    The spacing is constant, so time-invariant models (S4, LongConv) can solve it. Metric ``accuracy`` over the
    marker positions; chance is 1/(V-2).
    """

    name: ClassVar[str] = "copying"
    description: ClassVar[str] = "copying: reproduce M tokens after a blank run of fixed length"
    Params = CopyingParams

    def _setup(self) -> None:
        p = self.params
        self.vocab_size = p.vocab_size
        self.max_length = 2 * p.num_tokens + p.lag

    @property
    def chance_level(self) -> float:
        return 1.0 / (self.params.vocab_size - 2)

    def _example(self, rng: np.random.Generator) -> Example:
        p = self.params
        data = rng.integers(2, p.vocab_size, size=p.num_tokens)
        ids = np.concatenate(
            [data, np.full(p.lag, BLANK, dtype=np.int64), np.full(p.num_tokens, MARKER, dtype=np.int64)]
        )
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        labels[p.num_tokens + p.lag :] = data
        return {"input_ids": ids, "labels": labels}


@dataclass(frozen=True, kw_only=True)
class InductionParams(GeneratedParams):
    vocab_size: int = param(16, "vocabulary V: token 0 is the trigger, the rest are drawn from 1..V-1", ge=3)
    seq_len: int = param(64, "sequence length (the last token is the repeated trigger)", ge=3)


class InductionHeads(GeneratedTask):
    """Induction heads: random tokens; the trigger (token 0) appears once followed by a target token, and the
    sequence ends with the trigger again. The only label is at the last position: the token that followed the
    first trigger.

    Metric ``accuracy`` on that position; chance is 1/(V-1).
    """

    name: ClassVar[str] = "induction_heads"
    description: ClassVar[str] = "induction heads: after the final trigger, recall the token that followed it earlier"
    Params = InductionParams
    TRIGGER: ClassVar[int] = 0

    def _setup(self) -> None:
        self.vocab_size = self.params.vocab_size
        self.max_length = self.params.seq_len

    @property
    def chance_level(self) -> float:
        return 1.0 / (self.params.vocab_size - 1)

    def _example(self, rng: np.random.Generator) -> Example:
        p = self.params
        ids = rng.integers(1, p.vocab_size, size=p.seq_len)
        pos = int(rng.integers(0, p.seq_len - 2))
        ids[pos] = self.TRIGGER
        ids[-1] = self.TRIGGER
        labels = np.full(p.seq_len, IGNORE_INDEX, dtype=np.int64)
        labels[-1] = ids[pos + 1]
        return {"input_ids": ids.astype(np.int64), "labels": labels}
