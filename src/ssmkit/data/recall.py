"""Associative recall tasks: MQAR (Zoology) and joint recall (context-dependent key-value lookup)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import IGNORE_INDEX, Example, GeneratedTask
from .params import GeneratedParams, param


@dataclass(frozen=True, kw_only=True)
class MQARParams(GeneratedParams):
    vocab_size: int = param(8192, "vocabulary size V: keys come from [1, V/2), values from [V/2, V)", ge=4)
    seq_len: int = param(64, "input length L (context of 2N tokens, then the query region)", ge=4)
    num_pairs: int = param(4, "key-value pairs N in the context; every key is queried once", ge=1)
    power_a: float = param(0.01, "query gaps are drawn with p(i) proportional to a*i^(a-1)", gt=0.0, le=1.0)

    def validate(self) -> None:
        n, length, v = self.num_pairs, self.seq_len, self.vocab_size
        if 2 * n > length:
            self.fail("num_pairs", f"need 2*num_pairs <= seq_len={length}")
        if (length - 2 * n) // 2 < n:
            self.fail(
                "seq_len",
                f"the {n} queries need (seq_len - 2*num_pairs) // 2 >= num_pairs, i.e. seq_len >= {4 * n}",
            )
        if length >= v:
            self.fail("seq_len", f"need seq_len < vocab_size={v}")
        if n > v // 2 - 1:
            self.fail("num_pairs", f"need num_pairs <= vocab_size//2 - 1 = {v // 2 - 1} distinct keys")


class MQAR(GeneratedTask):
    """Multi-query associative recall (Zoology).

    Context ``k1 v1 k2 v2 ... kN vN`` (keys distinct from [1, V/2), values distinct from [V/2, V)); then every key
    appears once more in the query region, at even offsets ``2*g`` whose gaps ``g`` are drawn without replacement
    with p(g) proportional to ``a*g^(a-1)`` (a=0.01: early positions are favoured). The label at each query key
    is the value paired with it in the context; every other position is -100. Slots that are not queries hold
    random tokens from [0, V).

    Metric ``accuracy``: fraction of query positions where the predicted token is the right value. Chance is
    1/(V - V/2) (guessing among the value tokens); ``sequence_accuracy`` needs all N queries right.
    """

    name: ClassVar[str] = "mqar"
    description: ClassVar[str] = "multi-query associative recall (Zoology): recall the value of each queried key"
    Params = MQARParams

    def _setup(self) -> None:
        p = self.params
        self.vocab_size = p.vocab_size
        self.max_length = p.seq_len
        space = (p.seq_len - 2 * p.num_pairs) // 2
        i = np.arange(1, space + 1, dtype=np.float64)
        self._gap_logp = np.log(p.power_a * i ** (p.power_a - 1))

    @property
    def chance_level(self) -> float:
        return 1.0 / (self.params.vocab_size - self.params.vocab_size // 2)

    def _example(self, rng: np.random.Generator) -> Example:
        p = self.params
        v, n, length = p.vocab_size, p.num_pairs, p.seq_len
        keys = rng.choice(np.arange(1, v // 2), size=n, replace=False)
        values = rng.choice(np.arange(v // 2, v), size=n, replace=False)
        # n distinct gaps, drawn one after another with probability proportional to p (Gumbel top-k)
        gaps = np.argsort(-(self._gap_logp + rng.gumbel(size=len(self._gap_logp))), kind="stable")[:n]
        seq = np.zeros(length + 1, dtype=np.int64)  # one longer: labels are the next tokens
        seq[0 : 2 * n : 2] = keys
        seq[1 : 2 * n : 2] = values
        query_pos = 2 * n + 2 * gaps
        seq[query_pos] = keys
        target = np.full(length + 1, IGNORE_INDEX, dtype=np.int64)
        target[query_pos + 1] = values
        free = seq == 0
        seq[free] = rng.integers(0, v, size=int(free.sum()))
        return {"input_ids": seq[:length], "labels": target[1:]}


@dataclass(frozen=True, kw_only=True)
class JointRecallParams(GeneratedParams):
    vocab_size: int = param(
        256, "vocabulary V: contexts from [1, V/4), keys from [V/4, V/2), values from [V/2, V)", ge=8
    )
    num_contexts: int = param(4, "contexts n_c, each listing the same keys with its own values", ge=1)
    num_pairs: int = param(8, "key-value pairs n_k per context", ge=1)
    num_queries: int = param(8, "(context, key) queries at the end, distinct", ge=1)

    def validate(self) -> None:
        v = self.vocab_size
        if self.num_contexts > v // 4 - 1:
            self.fail("num_contexts", f"need num_contexts <= vocab_size//4 - 1 = {v // 4 - 1}")
        if self.num_pairs > v // 2 - v // 4:
            self.fail("num_pairs", f"need num_pairs <= vocab_size//2 - vocab_size//4 = {v // 2 - v // 4}")
        if self.num_queries > self.num_contexts * self.num_pairs:
            most = self.num_contexts * self.num_pairs
            self.fail("num_queries", f"need num_queries <= num_contexts*num_pairs = {most}")


class JointRecall(GeneratedTask):
    """Joint recall ("Overcoming Long-Context Limitations of SSMs via Context-Dependent Sparse Attention").

    ``n_c`` context blocks ``c k1 v1 ... kn vn``: each starts with a distinct context token, and all blocks list
    the same ``n_k`` keys (in their own random order) with values drawn per (context, key). Then ``num_queries``
    distinct pairs ``c k``; the label at each queried key is the value that key has in context ``c`` (-100
    elsewhere). A key alone is ambiguous: the model must recall it jointly with its context.

    Metric ``accuracy`` over the query positions; chance is 1/(V - V/2).
    """

    name: ClassVar[str] = "joint_recall"
    description: ClassVar[str] = "joint recall: recall the value a key has in a given context (n_c contexts x n_k keys)"
    Params = JointRecallParams

    def _setup(self) -> None:
        p = self.params
        self.vocab_size = p.vocab_size
        self.max_length = p.num_contexts * (1 + 2 * p.num_pairs) + 2 * p.num_queries

    @property
    def chance_level(self) -> float:
        return 1.0 / (self.params.vocab_size - self.params.vocab_size // 2)

    def _example(self, rng: np.random.Generator) -> Example:
        p = self.params
        v, nc, nk = p.vocab_size, p.num_contexts, p.num_pairs
        contexts = rng.choice(np.arange(1, v // 4), size=nc, replace=False)
        keys = rng.choice(np.arange(v // 4, v // 2), size=nk, replace=False)
        values = rng.integers(v // 2, v, size=(nc, nk))
        parts = []
        for c in range(nc):
            order = rng.permutation(nk)
            block = np.empty(1 + 2 * nk, dtype=np.int64)
            block[0] = contexts[c]
            block[1::2] = keys[order]
            block[2::2] = values[c, order]
            parts.append(block)
        picks = rng.choice(nc * nk, size=p.num_queries, replace=False)
        qc, qk = np.divmod(picks, nk)
        queries = np.empty(2 * p.num_queries, dtype=np.int64)
        queries[0::2] = contexts[qc]
        queries[1::2] = keys[qk]
        ids = np.concatenate([*parts, queries])
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        labels[len(ids) - 2 * p.num_queries + 1 :: 2] = values[qc, qk]
        return {"input_ids": ids, "labels": labels}
