"""The objective interface and the simple objectives: next-token, prefix-LM, copying, deshuffling.

An objective turns a text segment (token ids below ``vocab.base_vocab_size``) into an (input, label) pair::

    pair = objective(text, rng, budget)      # text: (n,) int; rng: np.random.Generator; budget: int or None

``budget`` bounds the packed length ``len(input) + len(label)`` (packing adds [START] and drops the label's last
token, see :mod:`ssmkit.objectives.packing`). An objective that cannot fit the budget uses only a prefix of the
text (``pair.consumed`` says how many text tokens it used); if even its smallest sample does not fit it returns
None. Every input starts with the objective family's paradigm token.

Every distinct parameter setting is its own *arm* (``objective.name`` is unique per setting); ``family`` is the
objective class used for reward scaling and exploration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .vocab import PARADIGMS, ObjectiveVocab


@dataclass(frozen=True)
class Pair:
    """input: (n_in,) int64 starting with the paradigm token; label: (n_label,) int64, n_label >= 1;
    consumed: how many leading text tokens the pair was built from."""

    input: np.ndarray
    label: np.ndarray
    consumed: int

    @property
    def packed_len(self) -> int:
        """Length in the packed stream: input + [START] + label[:-1]."""
        return len(self.input) + len(self.label)


def check_range(owner: str, name: str, value: object, minimum: int = 1) -> tuple[int, int]:
    """An int pair (lo, hi) with minimum <= lo <= hi."""
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value))
    if not ok or not minimum <= value[0] <= value[1]:
        raise ValueError(f"{owner}: {name} must be an int pair (lo, hi) with {minimum} <= lo <= hi, got {value!r}")
    return int(value[0]), int(value[1])


def check_fraction(owner: str, name: str, value: object, *, low: float = 0.0, high: float = 1.0,
                   low_open: bool = True) -> float:
    """A float in (low, high] (or [low, high] when not low_open)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (low < value <= high if low_open else low <= value <= high):
        lb = "(" if low_open else "["
        raise ValueError(f"{owner}: {name} must be a number in {lb}{low}, {high}], got {value!r}")
    return float(value)


class Objective:
    """Base class. Subclasses set ``family`` and implement :meth:`build` and :meth:`params`.

    Args:
        vocab: the special-token layout (:class:`ObjectiveVocab`).
        lengths: (lo, hi) range of text-segment lengths (tokens) the batch source draws for this arm.
    """

    family: ClassVar[str]
    #: fewest text tokens a sample needs
    min_text: ClassVar[int] = 1

    def __init__(self, vocab: ObjectiveVocab, lengths: tuple[int, int]) -> None:
        if not isinstance(vocab, ObjectiveVocab):
            raise TypeError(f"{type(self).__name__}: vocab must be an ObjectiveVocab, got {type(vocab).__name__}")
        self.vocab = vocab
        self.lengths = check_range(type(self).__name__, "lengths", lengths, self.min_text)
        self.paradigm_id = vocab.paradigm_id(self.family)

    # ----------------------------------------------------------------------------------------- identity
    @property
    def paradigm(self) -> str:
        """The paradigm string, e.g. ``'<|INFILL|>'``."""
        return PARADIGMS[self.family]

    def params(self) -> dict[str, Any]:
        """The parameters that distinguish this arm (besides ``lengths``)."""
        return {}

    @property
    def name(self) -> str:
        """Unique arm name, e.g. ``'infilling(len=128-256,rate=0.15,span=3)'``."""
        parts = [f"len={self.lengths[0]}-{self.lengths[1]}"]
        parts += [f"{_SHORT.get(k, k)}={_fmt(v)}" for k, v in self.params().items()]
        return f"{self.family}({','.join(parts)})"

    def to_dict(self) -> dict[str, Any]:
        """``{"family", "lengths", **params}``: rebuild with :func:`ssmkit.objectives.make_objective`."""
        return {"family": self.family, "lengths": list(self.lengths), **self.params()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"

    # ----------------------------------------------------------------------------------------- building
    @property
    def min_budget(self) -> int:
        """The smallest budget (packed length) for which :meth:`build` can return a pair."""
        return 1 + self.min_text

    def __call__(self, text: object, rng: np.random.Generator, budget: int | None = None) -> Pair | None:
        """text: (n,) int token ids (n >= ``min_text``) -> Pair, or None if ``budget`` is too small."""
        owner = type(self).__name__
        arr = np.asarray(text)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{owner}: text must be a 1-D integer array, got shape {arr.shape} {arr.dtype}")
        if len(arr) < self.min_text:
            raise ValueError(f"{owner}: text must hold at least {self.min_text} tokens, got {len(arr)}")
        if len(arr) and (arr.min() < 0 or arr.max() >= self.vocab.base_vocab_size):
            raise ValueError(
                f"{owner}: text ids must lie in [0, base_vocab_size={self.vocab.base_vocab_size}) (ids above are "
                f"reserved for special tokens), got range [{arr.min()}, {arr.max()}]"
            )
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"{owner}: rng must be a numpy Generator, got {type(rng).__name__}")
        if budget is None:
            budget = 1 << 62
        elif isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
            raise ValueError(f"{owner}: budget must be a positive int or None, got {budget!r}")
        if budget < self.min_budget:
            return None
        pair = self.build(arr.astype(np.int64), rng, int(budget))
        if pair is not None and (pair.packed_len > budget or len(pair.label) < 1):
            raise RuntimeError(f"{self.name}: built a pair of packed length {pair.packed_len} with "
                               f"{len(pair.label)} label tokens for budget {budget} (a bug)")
        return pair

    def build(self, text: np.ndarray, rng: np.random.Generator, budget: int) -> Pair | None:
        raise NotImplementedError

    def _with_paradigm(self, *parts: np.ndarray | list[int]) -> np.ndarray:
        return np.concatenate([np.array([self.paradigm_id], dtype=np.int64),
                               *(np.asarray(p, dtype=np.int64) for p in parts)])


_SHORT = {"mask_rate": "rate", "mean_span": "span", "num_queries": "queries", "delimiter": "delim",
          "query_position": "query"}


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (tuple, list)):
        return "-".join(_fmt(x) for x in v)
    return str(v)


class NextToken(Objective):
    """Next-token prediction: input = [<|NEXT_TOKEN|>]; label = the text."""

    family = "next_token"

    def __init__(self, vocab: ObjectiveVocab, lengths: tuple[int, int] = (256, 1024)) -> None:
        super().__init__(vocab, lengths)

    def build(self, text: np.ndarray, rng: np.random.Generator, budget: int) -> Pair | None:
        m = min(len(text), budget - 1)
        return Pair(self._with_paradigm(), text[:m].copy(), m)


class PrefixLM(Objective):
    """Prefix language modelling: input = paradigm + the first ``fraction`` of the text; label = the rest.

    The split point is round(fraction * m) clipped to [1, m - 1] for a text of m tokens.
    """

    family = "prefix_lm"
    min_text = 2

    def __init__(self, vocab: ObjectiveVocab, lengths: tuple[int, int] = (256, 1024), fraction: float = 0.75) -> None:
        self.fraction = check_fraction(type(self).__name__, "fraction", fraction, high=0.999999)
        super().__init__(vocab, lengths)

    def params(self) -> dict[str, Any]:
        return {"fraction": self.fraction}

    def build(self, text: np.ndarray, rng: np.random.Generator, budget: int) -> Pair | None:
        m = min(len(text), budget - 1)
        k = min(m - 1, max(1, round(self.fraction * m)))
        return Pair(self._with_paradigm(text[:k]), text[k:m].copy(), m)


class Copying(Objective):
    """Copying: input = paradigm + text; label = the text. Paper lengths 64-256."""

    family = "copying"

    def __init__(self, vocab: ObjectiveVocab, lengths: tuple[int, int] = (64, 256)) -> None:
        super().__init__(vocab, lengths)

    @property
    def min_budget(self) -> int:
        return 3

    def build(self, text: np.ndarray, rng: np.random.Generator, budget: int) -> Pair | None:
        m = min(len(text), (budget - 1) // 2)
        return Pair(self._with_paradigm(text[:m]), text[:m].copy(), m)


class Deshuffling(Objective):
    """Deshuffling: permute a ``fraction`` of the tokens (0.5 or 1.0 in the paper); the label is the original.

    round(fraction * m) positions (at least 2 when m >= 2) are chosen without replacement and their tokens
    permuted among themselves; input = paradigm + the shuffled text.
    """

    family = "deshuffling"

    def __init__(self, vocab: ObjectiveVocab, lengths: tuple[int, int] = (128, 512), fraction: float = 1.0) -> None:
        self.fraction = check_fraction(type(self).__name__, "fraction", fraction)
        super().__init__(vocab, lengths)

    def params(self) -> dict[str, Any]:
        return {"fraction": self.fraction}

    @property
    def min_budget(self) -> int:
        return 3

    def build(self, text: np.ndarray, rng: np.random.Generator, budget: int) -> Pair | None:
        m = min(len(text), (budget - 1) // 2)
        orig = text[:m].copy()
        shuffled = orig.copy()
        c = min(m, max(2, round(self.fraction * m)))
        if m >= 2:
            idx = np.sort(rng.choice(m, size=c, replace=False))
            shuffled[idx] = orig[idx][rng.permutation(c)]
        return Pair(self._with_paradigm(shuffled), orig, m)
