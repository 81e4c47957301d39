"""Span-corruption objectives: infilling and autoencoding (optionally with deshuffling).

Span sampling (Birdie): walk the text left to right. At each position outside a span draw a local rate
r' ~ U(0.5 r, min(0.95, 2 r)) and a span length l ~ Poisson(mean) clipped to [max(1, mean // 3), 3 mean]; start a
span there with probability r' / l (a span reaching the text end is cut there), else keep the token.

So each unmasked step starts a span with probability r'/l and the expected masked fraction is about
E[r' / (1 + r' - r'/l)]: close to r for small rates (5%, 15%), lower for large ones (about 0.35-0.45 for
r = 0.5, 0.45-0.6 for r = 0.85). That is the paper's rule, kept as is.

Spans are numbered by placeholders <0>, <1>, ... in order; masking stops when the vocabulary's placeholders run
out. If a text gets no span at all, one span is forced at a uniformly drawn position, so every pair has a
non-empty label (this raises the realised rate of low-rate, long-span arms on short texts).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .objectives import Objective, Pair, check_fraction
from .vocab import ObjectiveVocab


def span_length_bounds(mean_span: int) -> tuple[int, int]:
    """The clip range [max(1, mean // 3), 3 * mean] of span lengths."""
    return max(1, mean_span // 3), 3 * mean_span


def sample_spans(
    n: int,
    rate: float,
    mean_span: int,
    rng: np.random.Generator,
    *,
    max_spans: int,
    budget: int,
    token_cost: int,
    span_cost: int,
) -> tuple[list[tuple[int, int]], int]:
    """Spans (start, length) over a text of ``n`` tokens, and how many leading tokens were used.

    Costs count packed length: 1 for the paradigm token, ``token_cost`` per kept token, ``length + span_cost``
    per span. The walk stops before the total would exceed ``budget``.
    """
    lo_len, hi_len = span_length_bounds(mean_span)
    local = rng.uniform(0.5 * rate, min(0.95, 2.0 * rate), size=n)
    lengths = np.clip(rng.poisson(mean_span, size=n), lo_len, hi_len)
    coin = rng.random(n)
    spans: list[tuple[int, int]] = []
    used, i = 1, 0
    while i < n:
        ell = int(lengths[i])
        if len(spans) < max_spans and coin[i] < local[i] / ell:
            ell = min(ell, n - i)
            if used + ell + span_cost <= budget:
                spans.append((i, ell))
                used += ell + span_cost
                i += ell
                continue
        if used + token_cost > budget:
            break
        used += token_cost
        i += 1
    consumed = i
    if not spans and consumed >= 1:
        # Force one span. A span of length l costs 1 + tc (m - l) + l + span_cost in total, non-increasing in l
        # for tc >= 1, so shrink the text until a one-token span fits.
        while consumed >= 1 and 1 + token_cost * (consumed - 1) + 1 + span_cost > budget:
            consumed -= 1
        if consumed >= 1:
            start = int(rng.integers(consumed))
            ell = min(int(lengths[start]), consumed - start)
            spans.append((start, ell))
    return spans, consumed


class _SpanObjective(Objective):
    min_text = 1

    def __init__(self, vocab: ObjectiveVocab, lengths: tuple[int, int], mask_rate: float, mean_span: int) -> None:
        owner = type(self).__name__
        self.mask_rate = check_fraction(owner, "mask_rate", mask_rate, high=0.95)
        if isinstance(mean_span, bool) or not isinstance(mean_span, (int, np.integer)) or mean_span < 1:
            raise ValueError(f"{owner}: mean_span must be an int >= 1, got {mean_span!r}")
        self.mean_span = int(mean_span)
        super().__init__(vocab, lengths)

    def params(self) -> dict[str, Any]:
        return {"mask_rate": self.mask_rate, "mean_span": self.mean_span}

    def _spans(self, text: np.ndarray, rng: np.random.Generator, budget: int, token_cost: int,
               span_cost: int) -> tuple[list[tuple[int, int]], int]:
        return sample_spans(len(text), self.mask_rate, self.mean_span, rng, max_spans=self.vocab.num_placeholders,
                            budget=budget, token_cost=token_cost, span_cost=span_cost)

    def _masked_input(self, text: np.ndarray, spans: list[tuple[int, int]], consumed: int) -> list[np.ndarray]:
        """The kept runs and placeholders in text order: [run_0, <0>, run_1, <1>, ..., run_k]."""
        pieces, prev = [], 0
        for k, (s, ell) in enumerate(spans):
            pieces.append(text[prev:s])
            pieces.append(np.array([self.vocab.placeholder(k)], dtype=np.int64))
            prev = s + ell
        pieces.append(text[prev:consumed])
        return pieces


class Infilling(_SpanObjective):
    """Infilling (span corruption): spans replaced by numbered placeholders; label = each placeholder followed by
    its original span. Paper grid: lengths 128-256, 256-512, 512-1024; mask rates 5%, 15%, 50%; mean spans 3, 8, 32.

    Packed length = 1 + m + 2k for m text tokens and k spans.
    """

    family = "infilling"

    def __init__(self, vocab: ObjectiveVocab, lengths: tuple[int, int] = (128, 256), mask_rate: float = 0.15,
                 mean_span: int = 3) -> None:
        super().__init__(vocab, lengths, mask_rate, mean_span)

    @property
    def min_budget(self) -> int:
        return 4

    def build(self, text: np.ndarray, rng: np.random.Generator, budget: int) -> Pair | None:
        spans, consumed = self._spans(text, rng, budget, token_cost=1, span_cost=2)
        if not spans:
            return None
        label = []
        for k, (s, ell) in enumerate(spans):
            label.append(np.array([self.vocab.placeholder(k)], dtype=np.int64))
            label.append(text[s:s + ell])
        return Pair(self._with_paradigm(*self._masked_input(text, spans, consumed)), np.concatenate(label), consumed)


class Autoencoding(_SpanObjective):
    """Autoencoding: mask spans as in infilling (paper: 15% or 85%, mean span 3/8/32); label = the whole text.

    Packed length = 1 + 2m - masked + k for m text tokens, k spans.
    """

    family = "autoencoding"
    shuffle_runs = False

    def __init__(self, vocab: ObjectiveVocab, lengths: tuple[int, int] = (256, 1024), mask_rate: float = 0.15,
                 mean_span: int = 3) -> None:
        super().__init__(vocab, lengths, mask_rate, mean_span)

    @property
    def min_budget(self) -> int:
        return 3

    def build(self, text: np.ndarray, rng: np.random.Generator, budget: int) -> Pair | None:
        spans, consumed = self._spans(text, rng, budget, token_cost=2, span_cost=1)
        if not spans:
            return None
        pieces = self._masked_input(text, spans, consumed)
        if self.shuffle_runs:
            runs = pieces[0::2]
            order = rng.permutation(len(runs))
            pieces[0::2] = [runs[j] for j in order]
        return Pair(self._with_paradigm(*pieces), text[:consumed].copy(), consumed)


class AutoencodingDeshuffle(Autoencoding):
    """Autoencoding + deshuffling: mask spans as in autoencoding, then shuffle the kept runs: the runs between
    placeholders are permuted among their slots while the placeholders stay in place. Label = the whole text."""

    family = "autoencoding_deshuffle"
    shuffle_runs = True
