"""Objective construction: vocab layout, each objective's (input, label) pair, budgets and the arm grid."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.data import ByteTokenizer
from ssmkit.objectives import (
    OBJECTIVES,
    PARADIGMS,
    Autoencoding,
    AutoencodingDeshuffle,
    Copying,
    Deshuffling,
    Infilling,
    NextToken,
    ObjectiveVocab,
    PrefixLM,
    SelectiveCopying,
    birdie_arms,
    make_objective,
)

VOCAB = ObjectiveVocab(ByteTokenizer().vocab_size, num_placeholders=256)


def text(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n)


def split_placeholders(seq: np.ndarray) -> list[tuple[int, list[int]]]:
    """[<i> tokens... <j> tokens...] -> [(i, tokens), (j, tokens), ...]; asserts it starts with a placeholder."""
    out: list[tuple[int, list[int]]] = []
    for t in seq.tolist():
        if VOCAB.is_placeholder(t):
            out.append((t - VOCAB.placeholder_base, []))
        else:
            assert out, "sequence must start with a placeholder"
            out[-1][1].append(t)
    return out


def test_vocab_layout():
    v = ObjectiveVocab(260, num_placeholders=10)
    ids = [v.start_id, v.done_id, v.context_open_id, v.context_close_id, v.query_id, v.sep_id]
    ids += [v.paradigm_id(f) for f in PARADIGMS] + [v.placeholder(i) for i in range(10)]
    assert ids == list(range(260, v.vocab_size)), "special ids are contiguous above the base vocabulary"
    assert v.vocab_size == 260 + 6 + len(PARADIGMS) + 10
    assert v.token_name(v.paradigm_id("infilling")) == "<|INFILL|>"
    assert v.token_name(v.placeholder(3)) == "<3>" and v.token_name(v.start_id) == "[START]"
    assert v.layout()["placeholders"] == (v.placeholder(0), v.vocab_size - 1)
    with pytest.raises(ValueError, match="placeholder index"):
        v.placeholder(10)
    with pytest.raises(ValueError, match="unknown objective family"):
        v.paradigm_id("bogus")
    with pytest.raises(ValueError, match="base_vocab_size"):
        ObjectiveVocab(0)


def test_next_token_and_prefix_lm():
    t = text(100)
    p = NextToken(VOCAB)(t, np.random.default_rng(0))
    assert p.input.tolist() == [VOCAB.paradigm_id("next_token")] and np.array_equal(p.label, t)
    obj = PrefixLM(VOCAB)
    assert obj.paradigm == "<|PREFIX_LM|>"
    p = obj(t, np.random.default_rng(0))
    assert p.input[0] == VOCAB.paradigm_id("prefix_lm")
    assert len(p.input) - 1 == 75, "default prefix fraction 0.75"
    assert np.array_equal(np.concatenate([p.input[1:], p.label]), t)


def test_copying_and_deshuffling():
    t = text(80, 1)
    p = Copying(VOCAB)(t, np.random.default_rng(0))
    assert np.array_equal(p.input[1:], t) and np.array_equal(p.label, t)
    for fraction in (0.5, 1.0):
        obj = Deshuffling(VOCAB, fraction=fraction)
        p = obj(t, np.random.default_rng(2))
        assert np.array_equal(p.label, t), "the label is the original text"
        assert np.array_equal(np.sort(p.input[1:]), np.sort(t)), "the input is a permutation"
        moved = int((p.input[1:] != t).sum())
        assert moved <= round(fraction * len(t))
        assert moved >= (0.25 if fraction == 0.5 else 0.7) * len(t), f"too few tokens moved: {moved}"


@pytest.mark.parametrize("seed", range(5))
def test_infilling_structure(seed):
    rng = np.random.default_rng(seed)
    t = text(256, seed)
    p = Infilling(VOCAB, mask_rate=0.15, mean_span=8)(t, rng)
    assert p.input[0] == VOCAB.paradigm_id("infilling")
    inp = p.input[1:]
    in_ph = [x - VOCAB.placeholder_base for x in inp.tolist() if VOCAB.is_placeholder(x)]
    blocks = split_placeholders(p.label)
    assert in_ph == list(range(len(in_ph))) and len(in_ph) >= 1, "placeholders numbered 0..k-1 in order"
    assert [i for i, _ in blocks] == in_ph, "the label lists each placeholder once, in order"
    lo, hi = 8 // 3, 3 * 8
    assert all(1 <= len(s) <= hi for _, s in blocks) and all(len(s) >= lo for _, s in blocks[:-1])
    # putting each span back in place of its placeholder reconstructs the text
    spans = dict(blocks)
    rebuilt = [y for x in inp.tolist() for y in (spans[x - VOCAB.placeholder_base] if VOCAB.is_placeholder(x)
                                                 else [x])]
    assert rebuilt == t[:p.consumed].tolist()


def masked_fraction(rate: float, span: int, n_texts: int = 80) -> float:
    rng = np.random.default_rng(7)
    obj = Infilling(VOCAB, lengths=(256, 256), mask_rate=rate, mean_span=span)
    masked = total = 0
    for i in range(n_texts):
        p = obj(text(256, 100 + i), rng)
        masked += sum(len(s) for _, s in split_placeholders(p.label))
        total += p.consumed
    return masked / total


def test_infilling_mask_rate():
    f05, f15, f50 = (masked_fraction(r, 3) for r in (0.05, 0.15, 0.5))
    assert 0.035 < f05 < 0.08, f05
    assert 0.11 < f15 < 0.21, f15
    assert 0.35 < f50 < 0.55, f50  # the paper's rule masks a bit less than r at high rates (see spans.py)
    assert masked_fraction(0.15, 8) == pytest.approx(0.15, abs=0.05)


@pytest.mark.parametrize("cls,rate,span", [(Autoencoding, 0.15, 3), (Autoencoding, 0.85, 8),
                                           (AutoencodingDeshuffle, 0.15, 8), (AutoencodingDeshuffle, 0.85, 3)])
def test_autoencoding(cls, rate, span):
    t = text(300, 3)
    p = cls(VOCAB, mask_rate=rate, mean_span=span)(t, np.random.default_rng(4))
    assert p.input[0] == VOCAB.paradigm_id(cls.family)
    assert np.array_equal(p.label, t[:p.consumed]), "the label is the whole original text"
    inp = p.input[1:].tolist()
    ph = [x for x in inp if VOCAB.is_placeholder(x)]
    kept = [x for x in inp if not VOCAB.is_placeholder(x)]
    assert ph == [VOCAB.placeholder(i) for i in range(len(ph))] and ph
    frac = 1 - len(kept) / p.consumed
    assert (0.05 < frac < 0.35) if rate == 0.15 else (frac > 0.4), frac  # see spans.py on high rates
    if cls is Autoencoding:
        # the input is the text with each placeholder standing for one or more tokens
        pattern = b"".join(b".+" if VOCAB.is_placeholder(x) else re.escape(bytes([x])) for x in inp)
        assert re.fullmatch(pattern, bytes(t[:p.consumed].tolist()), flags=re.DOTALL)


def test_autoencoding_deshuffle_permutes_runs():
    t = text(400, 5)
    obj, plain = AutoencodingDeshuffle(VOCAB, mask_rate=0.15, mean_span=3), Autoencoding(VOCAB, mask_rate=0.15,
                                                                                         mean_span=3)
    a, b = obj(t, np.random.default_rng(9)), plain(t, np.random.default_rng(9))

    def runs(p):
        out, cur = [], []
        for x in p.input[1:].tolist():
            if VOCAB.is_placeholder(x):
                out.append(tuple(cur))
                cur = []
            else:
                cur.append(x)
        return [*out, tuple(cur)]

    # same RNG draws for the spans: the same runs, in another order
    assert sorted(runs(a)) == sorted(runs(b)) and runs(a) != runs(b)
    assert np.array_equal(a.label, b.label)


@pytest.mark.parametrize("seed", range(6))
def test_selective_copying(seed):
    obj = SelectiveCopying(VOCAB)
    t = text(512, seed)
    p = obj(t, np.random.default_rng(seed))
    v = VOCAB
    inp = p.input.tolist()
    assert inp[0] == v.paradigm_id("selective_copying")
    o, c = inp.index(v.context_open_id), inp.index(v.context_close_id)
    context = inp[o + 1:c]
    assert context == t[:p.consumed].tolist()
    queries_part = inp[1:o] if o > 1 else inp[c + 1:]
    # queries: [QUERY] <i> before [SEP] after
    qs = []
    for block in ([v.query_id, *rest] for rest in _split(queries_part, v.query_id)):
        assert block[1] == v.placeholder(len(qs))
        sep = block.index(v.sep_id)
        qs.append((block[2:sep], block[sep + 1:]))
    assert 1 <= len(qs) <= 4
    assert p.label[-1] == v.done_id
    answers = split_placeholders(p.label[:-1])
    assert [i for i, _ in answers] == list(range(len(qs))), "answers in query order, then [DONE]"
    for (before, after), (_, span) in zip(qs, answers, strict=True):
        assert 1 <= len(before) <= 8 and 1 <= len(after) <= 8 and 4 <= len(span) <= 32
        whole = before + span + after
        assert any(context[i:i + len(whole)] == whole for i in range(len(context))), "span found in the context"


def _split(seq: list[int], sep: int) -> list[list[int]]:
    out: list[list[int]] = []
    for x in seq:
        if x == sep:
            out.append([])
        else:
            out[-1].append(x)
    return out


def test_selective_copying_query_position():
    t = text(300)
    positions = set()
    for seed in range(12):
        p = SelectiveCopying(VOCAB)(t, np.random.default_rng(seed))
        positions.add("before" if p.input[1] == VOCAB.query_id else "after")
    assert positions == {"before", "after"}
    p = SelectiveCopying(VOCAB, query_position="after")(t, np.random.default_rng(0))
    assert p.input[1] == VOCAB.context_open_id


ALL = [NextToken(VOCAB), PrefixLM(VOCAB), Infilling(VOCAB, mask_rate=0.5, mean_span=3), Copying(VOCAB),
       SelectiveCopying(VOCAB), Deshuffling(VOCAB), Autoencoding(VOCAB, mask_rate=0.85, mean_span=32),
       AutoencodingDeshuffle(VOCAB)]


@given(st.sampled_from(ALL), st.integers(1, 600), st.integers(0, 400), st.integers(0, 2**31))
def test_budget_is_respected(obj, budget, n, seed):
    n = max(n, obj.min_text)
    t = text(n, seed % 1000)
    p = obj(t, np.random.default_rng(seed), budget)
    if budget < obj.min_budget:
        assert p is None
        return
    assert p is not None, f"{obj.name}: no pair for budget {budget} >= min_budget {obj.min_budget}"
    assert p.packed_len <= budget and len(p.label) >= 1 and 1 <= p.consumed <= n
    assert p.input[0] == VOCAB.paradigm_id(obj.family)
    assert p.input.dtype == np.int64 and p.label.dtype == np.int64


def test_determinism_per_seed():
    t = text(300)
    for obj in ALL:
        a, b = obj(t, np.random.default_rng(5)), obj(t, np.random.default_rng(5))
        assert np.array_equal(a.input, b.input) and np.array_equal(a.label, b.label)


def test_bad_input():
    obj = Copying(VOCAB)
    with pytest.raises(ValueError, match="reserved"):
        obj(np.array([1, 2, VOCAB.start_id]), np.random.default_rng(0))
    with pytest.raises(ValueError, match="1-D integer"):
        obj(np.zeros((2, 2), dtype=np.int64), np.random.default_rng(0))
    with pytest.raises(TypeError, match="numpy Generator"):
        obj(np.array([1, 2]), 0)
    with pytest.raises(ValueError, match="budget"):
        obj(np.array([1, 2]), np.random.default_rng(0), 0)
    with pytest.raises(ValueError, match="mask_rate"):
        Infilling(VOCAB, mask_rate=1.5)
    with pytest.raises(ValueError, match="lengths"):
        Copying(VOCAB, lengths=(10, 5))
    with pytest.raises(ValueError, match="query_position"):
        SelectiveCopying(VOCAB, query_position="middle")


def test_arm_grid_and_registry():
    arms = birdie_arms(VOCAB)
    assert len(arms) == 45 and len({a.name for a in arms}) == 45, "every parameter setting is its own arm"
    infill = [a for a in arms if a.family == "infilling"]
    assert len(infill) == 27
    assert {a.lengths for a in infill} == {(128, 256), (256, 512), (512, 1024)}
    assert {(a.mask_rate, a.mean_span) for a in infill} == {(r, s) for r in (0.05, 0.15, 0.5) for s in (3, 8, 32)}
    assert [a.lengths for a in arms if a.family == "copying"] == [(64, 256)]
    small = birdie_arms(VOCAB, length_scale=1 / 8, infill_rates=(0.15,), infill_spans=(3,))
    assert [a.lengths for a in small if a.family == "infilling"] == [(16, 32), (32, 64), (64, 128)]
    for a in arms:
        b = make_objective(a.to_dict(), VOCAB)
        assert type(b) is type(a) and b.name == a.name
    assert set(OBJECTIVES) == set(PARADIGMS)
    with pytest.raises(ValueError, match="unknown family"):
        make_objective({"family": "nope"}, VOCAB)
    with pytest.raises(ValueError, match="bad parameters"):
        make_objective({"family": "copying", "mask_rate": 0.1}, VOCAB)
