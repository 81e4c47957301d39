"""Phone-book samples and scoring, infilling accuracy, the phone-book fine-tune and ObjectiveText rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ssmkit.experiments.retrieval as R
from ssmkit.data import IGNORE_INDEX
from ssmkit.models import CausalLM, ModelConfig, PrefixLM
from ssmkit.objectives import NextToken, ObjectiveVocab
from ssmkit.objectives.packing import RowBuilder
from ssmkit.objectives.text_task import ObjectiveText

VOCAB = ObjectiveVocab(260, 8)


def tiny(cls=CausalLM, pattern="gated"):
    torch.manual_seed(0)
    return cls(ModelConfig(d_model=16, n_layers=2, pattern=pattern, vocab_size=VOCAB.vocab_size)).eval()


def test_phonebook_pair_format():
    s = R.phonebook_pair(VOCAB, np.random.default_rng(0), 6, 3)
    assert s.pair.input[0] == VOCAB.paradigm_id("prefix_lm") and s.pair.label[-1] == VOCAB.done_id
    text = bytes(s.pair.input[1:].astype(np.uint8)).decode()
    lines = text.split("\n")
    assert lines[0].startswith("What are the phone numbers for ") and lines[0].endswith(
        "Find them in the phonebook below.")
    book = dict(line.split(" : ") for line in lines[1:7])
    assert len(book) == 6 and all(len(v) == 12 and v[3] == v[7] == "-" for v in book.values())
    assert lines[7] == lines[0].removesuffix(" Find them in the phonebook below.") and lines[8] == "Answer: "
    asked = lines[7].removeprefix("What are the phone numbers for ").removesuffix("?").split(", ")
    assert s.target == ", ".join(book[n] for n in asked)
    assert bytes(s.pair.label[:-1].astype(np.uint8)).decode() == s.target


def _fake_generate(samples, mutate=None):
    def fake(model, ids, new, **kw):
        rows = []
        for s in samples[:ids.shape[0]]:
            t = list(s.target.encode()) + [VOCAB.done_id]
            if mutate:
                t = mutate(t)
            rows.append((t + [0] * new)[:new])
        del samples[:ids.shape[0]]
        return torch.tensor(rows)
    return fake


def test_digit_accuracy_scoring(monkeypatch):
    rng = np.random.default_rng([5, 4, 2])
    samples = [R.phonebook_pair(VOCAB, rng, 4, 2) for _ in range(3)]
    monkeypatch.setattr(R, "generate", _fake_generate(list(samples)))
    m = R.phonebook_digit_accuracy(tiny(), VOCAB, num_entries=4, num_queries=2, num_examples=3, seed=5)
    assert m == {"digit_accuracy": 1.0, "number_accuracy": 1.0, "exact": 1.0}

    def one_wrong_digit(t):  # first digit of the first number changed
        t = list(t)
        t[0] = ord("0") + (t[0] - ord("0") + 1) % 10
        return t
    monkeypatch.setattr(R, "generate", _fake_generate(list(samples), one_wrong_digit))
    m = R.phonebook_digit_accuracy(tiny(), VOCAB, num_entries=4, num_queries=2, num_examples=3, seed=5)
    assert m["digit_accuracy"] == pytest.approx(1 - 3 / 60) and m["number_accuracy"] == pytest.approx(0.5)
    assert m["exact"] == 0.0


@pytest.mark.parametrize("cls", [CausalLM, PrefixLM])
def test_digit_accuracy_runs_real_generation(cls):
    m = R.phonebook_digit_accuracy(tiny(cls), VOCAB, num_entries=3, num_queries=2, num_examples=3, batch_size=2)
    assert set(m) == {"digit_accuracy", "number_accuracy", "exact"} and all(0 <= v <= 1 for v in m.values())


class Oracle(torch.nn.Module):
    """Predicts the labels it was told about (for scoring tests): logits peak at ``self.labels``."""

    def __init__(self, wrong_every: int = 0):
        super().__init__()
        self.backbone = type("B", (), {"accepts_prefix": False})()
        self.wrong_every = wrong_every

    def forward(self, ids, reset=None, **kw):
        target = self.labels[: ids.shape[0]].clone()
        self.labels = self.labels[ids.shape[0]:]
        target[target == IGNORE_INDEX] = 0
        if self.wrong_every:
            target.view(-1)[:: self.wrong_every] = 1
        return type("O", (), {"logits": torch.nn.functional.one_hot(target, VOCAB.vocab_size).float() * 10})()


@pytest.fixture
def captured(monkeypatch):
    """The labels of every batch the retrieval evaluations build, in order."""
    seen = []
    real = R.rows_to_batch

    def spy(rows):
        b = real(rows)
        seen.append(b["labels"])
        return b
    monkeypatch.setattr(R, "rows_to_batch", spy)
    return seen


def test_infilling_accuracy_scores_only_span_text(captured):
    tokens = np.random.default_rng(0).integers(0, 256, 5000)
    kw = dict(seq_len=128, pad_id=256, rows=6, batch_size=4)
    model = Oracle()
    # first pass to learn the labels, then score a model that predicts them
    R.infilling_accuracy(tiny(), VOCAB, tokens, **kw)
    model.labels = torch.cat(captured)
    m = R.infilling_accuracy(model, VOCAB, tokens, **kw)
    labels = torch.cat(captured[:2])
    scored = (labels != IGNORE_INDEX) & (labels < 260)
    assert m["token_accuracy"] == 1.0 and m["span_accuracy"] == 1.0 and m["scored_tokens"] == int(scored.sum())
    assert ((labels >= VOCAB.placeholder_base) & (labels != IGNORE_INDEX)).any(), "placeholders are in the labels"


def test_finetune_phonebook_trains_in_place():
    model = tiny(PrefixLM)
    before = [p.detach().clone() for p in model.parameters()]
    losses = R.finetune_phonebook(model, VOCAB, steps=3, batch_size=2, lr=1e-3, num_entries=3, max_queries=2,
                                  pad_id=256)
    assert len(losses) == 3 and all(np.isfinite(losses)) and not model.training
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_objective_text_rows_match_training_packing(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 50)
    task = ObjectiveText(path=str(path), seq_len=16, val_fraction=0.2, num_placeholders=8)
    assert task.vocab == VOCAB and task.vocab_size == VOCAB.vocab_size
    val = task.split_tokens("val")
    assert task.num_examples("val") == -(-len(val) // 15)
    b = next(task.batches("val", task.num_examples("val")))
    row = RowBuilder(16, task.pad_id, VOCAB.start_id)
    row.add(NextToken(VOCAB, (1, 15))(val[:15], np.random.default_rng(0), 16))
    want = row.finish()
    assert torch.equal(b["input_ids"][0], torch.from_numpy(want["input_ids"]))
    assert torch.equal(b["labels"][0], torch.from_numpy(want["labels"]))
    assert b["reset"][0].tolist() == [True] + [False] * 15 and b["prefix_mask"][0].tolist() == [True] * 2 + [False] * 14
    scored = b["labels"][b["labels"] != IGNORE_INDEX]
    assert torch.equal(scored, torch.from_numpy(val)), "every held-out token is scored exactly once"
    causal = ObjectiveText(path=str(path), seq_len=16, val_fraction=0.2, num_placeholders=8, prefix_mask=False)
    assert "prefix_mask" not in causal.sample(2, split="val")
    with pytest.raises(ValueError, match="seq_len"):
        ObjectiveText(path=str(path), seq_len=2)


def test_mqar_pair_and_accuracy():
    p = R.mqar_pair(VOCAB, np.random.default_rng(0), 6, 4)
    inp, lab = p.input, p.label
    assert inp[0] == VOCAB.paradigm_id("prefix_lm") and inp[13] == VOCAB.sep_id and lab[-1] == VOCAB.done_id
    keys, values = inp[1:13:2], inp[2:13:2]
    assert len(set(keys.tolist())) == 6 and (keys < 130).all() and (values >= 130).all() and (values < 260).all()
    lookup = dict(zip(keys.tolist(), values.tolist(), strict=True))
    assert lab[:-1].tolist() == [lookup[k] for k in inp[14:].tolist()]
    with pytest.raises(ValueError, match="num_queries"):
        R.mqar_pair(VOCAB, np.random.default_rng(0), 3, 4)
    acc = R.mqar_accuracy(tiny(PrefixLM), VOCAB, num_pairs=4, num_examples=5, pad_id=256, batch_size=2)
    assert 0 <= acc <= 1
    model = tiny()
    losses = R.finetune_mqar(model, VOCAB, steps=2, batch_size=2, lr=1e-3, max_pairs=4, pad_id=256)
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_mqar_accuracy_scores_values_only(captured):
    kw = dict(num_pairs=4, num_examples=5, pad_id=256, batch_size=2)
    R.mqar_accuracy(tiny(), VOCAB, **kw)  # learn the labels
    model = Oracle()
    model.labels = _padded(captured)
    assert R.mqar_accuracy(model, VOCAB, **kw) == 1.0
    wrong = Oracle(wrong_every=1)  # predicts token 1 everywhere: no value right
    wrong.labels = _padded(captured)
    assert R.mqar_accuracy(wrong, VOCAB, **kw) == 0.0


def _padded(batches):
    width = max(b.shape[1] for b in batches)
    return torch.cat([torch.nn.functional.pad(b, (0, width - b.shape[1]), value=IGNORE_INDEX) for b in batches])
