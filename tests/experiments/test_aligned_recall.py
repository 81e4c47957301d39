"""Aligned in-context recall: the row layout, padding, scoring against a lookup oracle, and the fine-tune."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ssmkit.data import IGNORE_INDEX
from ssmkit.experiments import aligned_recall as A
from ssmkit.models import CausalLM, ModelConfig, PrefixLM
from ssmkit.objectives import ObjectiveVocab

VOCAB = ObjectiveVocab(260, 8)


def test_row_layout_queries_are_scored_on_their_values_and_never_fed_back():
    rng = np.random.default_rng(0)
    for n, m in ((2, 1), (5, 3), (8, 8)):
        r = A.aligned_row(VOCAB, rng, n, m, num_keys=8)
        ids, lab, codes = r["input_ids"], r["labels"], r["reset_codes"]
        assert len(ids) == len(lab) == len(codes) == 2 * n + 3 + m
        assert ids[0] == VOCAB.paradigm_id("prefix_lm") and ids[2 * n + 1] == VOCAB.sep_id
        assert ids[2 * n + 2] == VOCAB.start_id
        keys, values = ids[1:2 * n + 1:2], ids[2:2 * n + 1:2]
        assert len(set(keys.tolist())) == n and ((keys >= ord("a")) & (keys < ord("a") + 8)).all()
        assert len(set(values.tolist())) == n and ((values >= ord("A")) & (values < ord("A") + 8)).all()
        lookup = dict(zip(keys.tolist(), values.tolist(), strict=True))
        queries = ids[2 * n + 3:]
        assert len(set(queries.tolist())) == m and all(q in lookup for q in queries.tolist())
        assert lab[2 * n + 3:].tolist() == [lookup[q] for q in queries.tolist()]
        assert (lab[:2 * n + 3] == IGNORE_INDEX).all()
        assert codes.tolist() == [1] + [0] * (2 * n + 2) + [2] * m
    with pytest.raises(ValueError, match="num_queries"):
        A.aligned_row(VOCAB, rng, 3, 4, num_keys=8)
    with pytest.raises(ValueError, match="num_keys"):
        A.aligned_row(VOCAB, rng, 3, 3, num_keys=27)
    with pytest.raises(ValueError, match="byte-level"):
        A.aligned_row(ObjectiveVocab(64, 8), rng, 3, 3, num_keys=8)


def test_rows_batch_pads_as_its_own_segment():
    rng = np.random.default_rng(1)
    rows = [A.aligned_row(VOCAB, rng, 2, 2, 8), A.aligned_row(VOCAB, rng, 4, 4, 8)]
    b = A.rows_batch(rows, pad_id=256)
    short = len(rows[0]["input_ids"])
    assert b["input_ids"].shape == (2, len(rows[1]["input_ids"]))
    assert (b["input_ids"][0, short:] == 256).all() and (b["labels"][0, short:] == IGNORE_INDEX).all()
    assert b["reset"][0].nonzero().flatten().tolist() == [0, short]
    assert b["reset"][1].nonzero().flatten().tolist() == [0]
    assert b["prefix_mask"][1].tolist() == (torch.from_numpy(rows[1]["reset_codes"]) != 2).tolist()
    with pytest.raises(ValueError, match="row"):
        A.rows_batch([], pad_id=256)


class Lookup(torch.nn.Module):
    """Reads the context's key-value pairs and, at each position after [START], predicts the value of the key
    there; ``miss`` counts query positions (0-based) it gets wrong on purpose."""

    def __init__(self, miss: int = 0) -> None:
        super().__init__()
        self.backbone = SimpleNamespace(accepts_prefix=False)
        self.miss = miss

    def forward(self, ids, reset=None, **_):
        logits = torch.zeros(*ids.shape, VOCAB.vocab_size)
        for r, row in enumerate(ids.tolist()):
            start = row.index(VOCAB.start_id)
            table = dict(zip(row[1:start - 1:2], row[2:start - 1:2], strict=True))
            for j, t in enumerate(range(start + 1, len(row))):
                if row[t] in table:
                    logits[r, t, table[row[t]] + (1 if j < self.miss else 0)] = 1.0
        return SimpleNamespace(logits=logits)


def test_accuracy_against_a_lookup_oracle():
    kw = dict(num_pairs=6, num_examples=5, pad_id=256, num_keys=16, batch_size=2)
    assert A.aligned_accuracy(Lookup(), VOCAB, **kw) == 1.0
    assert A.aligned_accuracy(Lookup(miss=2), VOCAB, **kw) == pytest.approx(4 / 6)
    assert A.aligned_accuracy(Lookup(miss=2), VOCAB, **kw, query_fraction=0.5) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="num_examples"):
        A.aligned_accuracy(Lookup(), VOCAB, **{**kw, "num_examples": 0})


@pytest.mark.parametrize("cls", [CausalLM, PrefixLM])
def test_finetune_trains_in_place(cls):
    torch.manual_seed(0)
    model = cls(ModelConfig(d_model=16, n_layers=1, pattern="gated", vocab_size=VOCAB.vocab_size))
    before = [p.detach().clone() for p in model.parameters()]
    losses = A.finetune_aligned(model, VOCAB, steps=3, batch_size=2, lr=1e-3, max_pairs=4, pad_id=256,
                                num_keys=8)
    assert len(losses) == 3 and all(np.isfinite(losses)) and not model.training
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert 0 <= A.aligned_accuracy(model, VOCAB, num_pairs=4, num_examples=3, pad_id=256, num_keys=8) <= 1
    with pytest.raises(ValueError, match="min_pairs"):
        A.finetune_aligned(model, VOCAB, steps=1, batch_size=1, lr=1e-3, max_pairs=2, min_pairs=3, pad_id=256,
                           num_keys=8)
