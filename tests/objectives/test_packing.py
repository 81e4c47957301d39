"""Packing: label alignment, reset codes, prefix/suffix masks, rows, and independence of packed samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.data import IGNORE_INDEX
from ssmkit.layers import Attention
from ssmkit.objectives import (
    CODE_PREFIX,
    CODE_START,
    CODE_SUFFIX,
    ObjectiveVocab,
    Pair,
    masks_from_codes,
    pack_pair,
    pack_rows,
)
from tests.layers.contract import assert_close

VOCAB = ObjectiveVocab(260, num_placeholders=16)
START, PAD = VOCAB.start_id, 256


def pair(n_in: int, n_lab: int, seed: int = 0) -> Pair:
    rng = np.random.default_rng(seed)
    inp = np.concatenate([[VOCAB.paradigm_id("copying")], rng.integers(0, 256, n_in - 1)]).astype(np.int64)
    return Pair(inp, rng.integers(0, 256, n_lab).astype(np.int64), n_lab)


@given(st.integers(1, 20), st.integers(1, 20))
def test_pack_pair_alignment(n_in, n_lab):
    p = pair(n_in, n_lab)
    tokens, labels, codes = pack_pair(p, START)
    n = n_in + n_lab
    assert tokens.shape == labels.shape == codes.shape == (n,)
    assert tokens.tolist() == [*p.input.tolist(), START, *p.label[:-1].tolist()]
    assert labels.tolist() == [IGNORE_INDEX] * n_in + p.label.tolist()
    # "labels[t] is the target of the output at t": [START] (position n_in) predicts label[0], and every later
    # position predicts the token that follows it in the stream
    assert tokens[n_in] == START and labels[n_in] == p.label[0]
    assert np.array_equal(labels[n_in:-1], tokens[n_in + 1:])
    assert labels[-1] == p.label[-1]
    assert codes.tolist() == [CODE_START] + [CODE_PREFIX] * n_in + [CODE_SUFFIX] * (n_lab - 1)


def test_masks_from_codes():
    codes = torch.tensor([[1, 0, 0, 2, 2, 1, 0, 2, 1, 2]])
    reset, prefix = masks_from_codes(codes)
    assert reset.dtype == prefix.dtype == torch.bool
    assert reset[0].tolist() == [c == 1 for c in codes[0].tolist()]
    assert prefix[0].tolist() == [c != 2 for c in codes[0].tolist()], "prefix = input incl. [START]"
    with pytest.raises(ValueError, match="codes"):
        masks_from_codes(codes.float())


def segments(row_reset: torch.Tensor) -> list[tuple[int, int]]:
    starts = row_reset.nonzero().flatten().tolist()
    return list(zip(starts, [*starts[1:], len(row_reset)], strict=True))


@given(st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=12), st.integers(24, 40))
def test_pack_rows_never_splits(sizes, seq_len):
    pairs = [pair(a, b, i) for i, (a, b) in enumerate(sizes)]
    batch, stats = pack_rows(pairs, seq_len, pad_id=PAD, start_id=START)
    assert stats["pairs"] == len(pairs) and stats["skipped"] == stats["truncated"] == 0
    assert batch["input_ids"].shape == (stats["rows"], seq_len)
    assert torch.equal(batch["reset"], batch["reset_codes"] == 1) and torch.equal(batch["prefix_mask"],
                                                                                  batch["reset_codes"] != 2)
    assert batch["reset"][:, 0].all(), "every row starts a segment"
    seen = []
    for r in range(stats["rows"]):
        for s, e in segments(batch["reset"][r]):
            ids = batch["input_ids"][r, s:e]
            if ids[0] == PAD:  # padding: its own segment, unscored, only at the row end
                assert e == seq_len and (ids == PAD).all() and (batch["labels"][r, s:e] == IGNORE_INDEX).all()
                continue
            seen.append((ids.tolist(), batch["labels"][r, s:e].tolist(), batch["reset_codes"][r, s:e].tolist()))
    expected = [tuple(x.tolist() for x in pack_pair(p, START)) for p in pairs]
    assert seen == expected, "each pair appears whole, in order, exactly once"


def test_pack_rows_too_long():
    long_pair, short = pair(5, 30), pair(3, 4)
    batch, stats = pack_rows([long_pair, short], 16, pad_id=PAD, start_id=START)
    assert stats["truncated"] == 1 and stats["rows"] == 2
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 5 + long_pair.label[:11].tolist()
    _, stats = pack_rows([long_pair, short], 16, pad_id=PAD, start_id=START, too_long="skip")
    assert stats["skipped"] == 1 and stats["rows"] == 1
    _, stats = pack_rows([pair(16, 3), short], 16, pad_id=PAD, start_id=START)
    assert stats["skipped"] == 1, "an input that leaves no room for a label is skipped"
    with pytest.raises(ValueError, match="exceeds seq_len"):
        pack_rows([long_pair], 16, pad_id=PAD, start_id=START, too_long="error")
    with pytest.raises(ValueError, match="too_long"):
        pack_rows([short], 16, pad_id=PAD, start_id=START, too_long="drop")


def test_packed_samples_are_independent_through_prefix_attention():
    """A prefix-LM attention layer on a packed row (reset + prefix_mask) equals each sample run alone."""
    torch.manual_seed(0)
    d = 16
    layer = Attention(d, n_heads=2, mask="prefix", rotary=True).double()
    emb = torch.nn.Embedding(VOCAB.vocab_size, d).double()
    pairs = [pair(4, 6, 1), pair(7, 3, 2), pair(2, 9, 3)]
    batch, stats = pack_rows(pairs, 40, pad_id=PAD, start_id=START)
    assert stats["rows"] == 1
    with torch.no_grad():
        y = layer(emb(batch["input_ids"]), reset=batch["reset"], prefix_mask=batch["prefix_mask"])
        for (s, e), p in zip(segments(batch["reset"][0])[: len(pairs)], pairs, strict=True):
            tokens, _, codes = pack_pair(p, START)
            alone = layer(emb(torch.from_numpy(tokens)[None]), prefix_mask=torch.from_numpy(codes != 2)[None])
            assert_close(y[:, s:e], alone, 1e-12, f"segment {s}:{e}")
            # the suffix is causal: changing a later label token leaves earlier outputs unchanged
            t2 = tokens.copy()
            t2[-1] = (t2[-1] + 1) % 256
            alt = layer(emb(torch.from_numpy(t2)[None]), prefix_mask=torch.from_numpy(codes != 2)[None])
            assert_close(alt[:, :-1], alone[:, :-1], 1e-12, "suffix causality")
