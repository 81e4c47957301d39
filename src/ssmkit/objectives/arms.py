"""The objective registry, the Birdie arm grid and per-class reward weights.

Paper grid (:func:`birdie_arms` defaults, 45 arms): next-token; prefix-LM; infilling over lengths 128-256,
256-512, 512-1024 x mask rates 5%, 15%, 50% x mean spans 3, 8, 32 (27 arms); copying (64-256); selective copying;
deshuffling 50% and 100%; autoencoding and autoencoding + deshuffling, each at 15% and 85% x mean spans 3, 8, 32.
Every grid is an argument, and ``length_scale`` scales all text lengths for short CPU runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .objectives import Copying, Deshuffling, NextToken, Objective, PrefixLM
from .selective import SelectiveCopying
from .spans import Autoencoding, AutoencodingDeshuffle, Infilling
from .vocab import ObjectiveVocab

OBJECTIVES: dict[str, type[Objective]] = {
    "next_token": NextToken,
    "prefix_lm": PrefixLM,
    "infilling": Infilling,
    "copying": Copying,
    "selective_copying": SelectiveCopying,
    "deshuffling": Deshuffling,
    "autoencoding": Autoencoding,
    "autoencoding_deshuffle": AutoencodingDeshuffle,
}


def make_objective(spec: Mapping[str, Any], vocab: ObjectiveVocab) -> Objective:
    """Build an objective from ``{"family": ..., "lengths": [lo, hi], **params}`` (:meth:`Objective.to_dict`)."""
    if not isinstance(spec, Mapping) or "family" not in spec:
        raise ValueError(f"make_objective: spec must be a mapping with a 'family' key, got {spec!r}")
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items() if k != "family"}
    family = spec["family"]
    if family not in OBJECTIVES:
        raise ValueError(f"make_objective: unknown family {family!r}; expected one of {', '.join(OBJECTIVES)}")
    try:
        return OBJECTIVES[family](vocab, **kw)
    except TypeError as e:
        raise ValueError(f"make_objective: bad parameters for {family!r}: {e}") from e


def _scale(lengths: tuple[int, int], factor: float, minimum: int) -> tuple[int, int]:
    lo = max(minimum, round(lengths[0] * factor))
    return lo, max(lo, round(lengths[1] * factor))


def birdie_arms(
    vocab: ObjectiveVocab,
    *,
    length_scale: float = 1.0,
    text_lengths: tuple[int, int] = (256, 1024),
    infill_lengths: Sequence[tuple[int, int]] = ((128, 256), (256, 512), (512, 1024)),
    infill_rates: Sequence[float] = (0.05, 0.15, 0.5),
    infill_spans: Sequence[int] = (3, 8, 32),
    copy_lengths: tuple[int, int] = (64, 256),
    deshuffle_fractions: Sequence[float] = (0.5, 1.0),
    deshuffle_lengths: tuple[int, int] = (128, 512),
    autoencoding_rates: Sequence[float] = (0.15, 0.85),
    autoencoding_spans: Sequence[int] = (3, 8, 32),
    prefix_fraction: float = 0.75,
    families: Sequence[str] | None = None,
) -> list[Objective]:
    """The Birdie arms (one per parameter setting), in a fixed order.

    ``text_lengths`` is the text range of next-token, prefix-LM, selective copying and the autoencoders.
    ``length_scale`` multiplies every length range (e.g. 1/16 for CPU runs at seq_len 128). ``families``
    keeps only the listed objective families.
    """
    if not isinstance(length_scale, (int, float)) or isinstance(length_scale, bool) or not length_scale > 0:
        raise ValueError(f"birdie_arms: length_scale must be a positive number, got {length_scale!r}")
    if families is not None:
        unknown = [f for f in families if f not in OBJECTIVES]
        if unknown:
            raise ValueError(f"birdie_arms: unknown families {unknown}; expected some of {', '.join(OBJECTIVES)}")

    def sc(lengths: tuple[int, int], minimum: int = 1) -> tuple[int, int]:
        return _scale(tuple(lengths), length_scale, minimum)

    arms: list[Objective] = [NextToken(vocab, sc(text_lengths)),
                             PrefixLM(vocab, sc(text_lengths, 2), fraction=prefix_fraction)]
    for lengths in infill_lengths:
        for rate in infill_rates:
            for span in infill_spans:
                arms.append(Infilling(vocab, sc(lengths), mask_rate=rate, mean_span=span))
    arms.append(Copying(vocab, sc(copy_lengths)))
    sel_min = SelectiveCopying(vocab).min_text
    arms.append(SelectiveCopying(vocab, sc(text_lengths, sel_min)))
    arms += [Deshuffling(vocab, sc(deshuffle_lengths), fraction=f) for f in deshuffle_fractions]
    for cls in (Autoencoding, AutoencodingDeshuffle):
        for rate in autoencoding_rates:
            for span in autoencoding_spans:
                arms.append(cls(vocab, sc(text_lengths), mask_rate=rate, mean_span=span))
    if families is not None:
        arms = [a for a in arms if a.family in families]
    check_unique_arms(arms)
    return arms


def check_unique_arms(arms: Sequence[Objective]) -> None:
    """Arms must be Objectives with distinct names, sharing one vocab."""
    if not arms:
        raise ValueError("arms must hold at least one objective")
    bad = [a for a in arms if not isinstance(a, Objective)]
    if bad:
        raise TypeError(f"arms must be Objective instances, got {type(bad[0]).__name__}")
    names = [a.name for a in arms]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"arms must have distinct parameter settings; duplicated: {dup}")
    if any(a.vocab != arms[0].vocab for a in arms):
        raise ValueError("all arms must share one ObjectiveVocab")


def arm_classes(arms: Sequence[Objective]) -> list[str]:
    """The objective class (family) of each arm."""
    return [a.family for a in arms]


def class_weights(classes: Sequence[str]) -> np.ndarray:
    """(num_arms,) weight 1 / (number of arms in the arm's class): each class weighs 1 in a summed reward."""
    classes = list(classes)
    if not classes:
        raise ValueError("class_weights: classes must be non-empty")
    return np.array([1.0 / classes.count(c) for c in classes], dtype=np.float64)
