"""ListOps (Long Range Arena): evaluate nested MIN/MAX/MED/SM expressions over digits; 10-way classification."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Example, GeneratedTask
from .params import GeneratedParams, param

PAD, CLOSE = 0, 11
DIGIT0 = 1  # digit d is token 1 + d
OPS = {12: "[MIN", 13: "[MAX", 14: "[MED", 15: "[SM"}
VOCAB = ["<pad>", *map(str, range(10)), "]", *OPS.values()]
LEAF_THRESHOLD = 0.25  # LRA's VALUE_P: a node below max depth is an operator when a uniform draw is <= 0.25
MAX_TRIES = 200_000


def apply_op(op: int, args: Sequence[int]) -> int:
    """MIN, MAX, MED (median truncated to an int, as LRA's int(np.median)) or SM (sum mod 10)."""
    if op == 12:
        return min(args)
    if op == 13:
        return max(args)
    if op == 14:
        s, n = sorted(args), len(args)
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2
    if op == 15:
        return sum(args) % 10
    raise ValueError(f"listops: unknown operator token {op}")


class _TooLong(Exception):
    pass


class _Uniforms:
    """Uniform draws from a numpy Generator, fetched in blocks (per-call Generator overhead dominates otherwise)."""

    def __init__(self, rng: np.random.Generator, block: int = 4096) -> None:
        self.rng, self.block = rng, block
        self.buf: list[float] = []
        self.pos = 0

    def next(self) -> float:
        if self.pos == len(self.buf):
            self.buf, self.pos = self.rng.random(self.block).tolist(), 0
        self.pos += 1
        return self.buf[self.pos - 1]

    def integer(self, low: int, high: int) -> int:
        """Uniform integer in [low, high)."""
        return low + min(int(self.next() * (high - low)), high - low - 1)


def generate_expression(
    rng: np.random.Generator | _Uniforms, max_depth: int, max_args: int, max_length: int, *, root_op: bool = False
) -> tuple[list[int], int] | None:
    """One LRA-style random tree as (tokens, value), or None once it grows past ``max_length`` tokens.

    ``root_op`` forces the root to be an operator: the same distribution as rejecting single-digit trees.
    """
    u = rng if isinstance(rng, _Uniforms) else _Uniforms(rng)
    out: list[int] = []

    def node(depth: int) -> int:
        if len(out) >= max_length:
            raise _TooLong
        if depth < max_depth and ((root_op and depth == 1) or u.next() <= LEAF_THRESHOLD):
            op = 12 + u.integer(0, 4)
            out.append(op)
            args = [node(depth + 1) for _ in range(u.integer(2, max_args + 1))]
            out.append(CLOSE)
            return apply_op(op, args)
        value = u.integer(0, 10)
        out.append(DIGIT0 + value)
        return value

    try:
        value = node(1)
    except _TooLong:
        return None
    return (out, value) if len(out) <= max_length else None


def max_tree_length(max_depth: int, max_args: int) -> int:
    length = 1
    for _ in range(max_depth - 1):
        length = 2 + max_args * length
    return length


def to_text(ids: Sequence[int]) -> str:
    """Tokens back to LRA's text form, e.g. '[MAX 2 9 [MIN 4 7 ] 0 ]' (padding dropped)."""
    return " ".join(VOCAB[int(i)] for i in ids if int(i) != PAD)


@dataclass(frozen=True, kw_only=True)
class ListOpsParams(GeneratedParams):
    min_length: int = param(32, "shortest expression in tokens (LRA: 500)", ge=1)
    max_length: int = param(128, "longest expression in tokens (LRA: 2000)", ge=1)
    max_depth: int = param(10, "maximum nesting depth", ge=1)
    max_args: int = param(10, "maximum arguments per operator", ge=2)

    def validate(self) -> None:
        if self.max_length < self.min_length:
            self.fail("max_length", f"need max_length >= min_length={self.min_length}")
        biggest = max_tree_length(self.max_depth, self.max_args)
        if self.min_length > biggest:
            self.fail("min_length", f"trees of max_depth={self.max_depth} and max_args={self.max_args} have at "
                                    f"most {biggest} tokens")


class ListOps(GeneratedTask):
    """ListOps as generated for LRA: random trees (an operator below depth 10 with probability 1/4, else a digit;
    2..max_args arguments) kept when their token count lies in [min_length, max_length].

    Tokens: pad 0, digits 1..10 (digit d is d+1), ']' 11, [MIN 12, [MAX 13, [MED 14, [SM 15. The label is the
    expression's value (0..9). Batches are right-padded with ``mask``.

    Metric ``accuracy`` of the 10-way classification; chance is 10% (a uniform guess; the majority class scores
    more).
    """

    name: ClassVar[str] = "listops"
    description: ClassVar[str] = "ListOps (LRA): value of a nested MIN/MAX/MED/SM expression, 10 classes"
    kind: ClassVar[str] = "classification"
    padded: ClassVar[bool] = True
    cache_elements: ClassVar[int] = 20_000_000
    Params = ListOpsParams

    def _setup(self) -> None:
        self.vocab_size = len(VOCAB)
        self.num_classes = 10
        self.pad_id = PAD
        self.max_length = self.params.max_length

    @property
    def chance_level(self) -> float:
        return 0.1

    def _example(self, rng: np.random.Generator) -> Example:
        p = self.params
        u = _Uniforms(rng)
        for _ in range(MAX_TRIES):
            tree = generate_expression(u, p.max_depth, p.max_args, p.max_length, root_op=p.min_length > 1)
            if tree is not None and len(tree[0]) >= p.min_length:
                return {"input_ids": np.asarray(tree[0], dtype=np.int64), "labels": np.asarray(tree[1])}
        raise RuntimeError(
            f"listops: no expression with {p.min_length}..{p.max_length} tokens in {MAX_TRIES} tries; "
            "widen the length range or change max_depth/max_args"
        )
