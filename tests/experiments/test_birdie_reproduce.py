"""ssmkit reproduce birdie: the quick pipeline, its settings, and the short phone books it evaluates on."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from ssmkit.data import get_task
from ssmkit.experiments import retrieval as R
from ssmkit.experiments.birdie_config import EVALS, BirdieConfig
from ssmkit.experiments.reproduce import birdie as B
from ssmkit.experiments.reproduce import get_reproduction, run_reproduction
from ssmkit.experiments.reproduce.runner import select
from ssmkit.objectives import ObjectiveVocab

VOCAB = ObjectiveVocab(260, 8)


def test_short_phonebook_format():
    s = R.phonebook_pair(VOCAB, np.random.default_rng(3), 5, 2, digits=4, name_parts=1)
    lines = bytes(s.pair.input[1:].astype(np.uint8)).decode().split("\n")
    book = dict(line.split(" : ") for line in lines[1:6])
    assert len(book) == 5 and len(set(book.values())) == 5
    assert all(re.fullmatch(r"[A-Z][a-z]+", n) and re.fullmatch(r"\d{4}", v) for n, v in book.items())
    asked = lines[6].removeprefix("What are the phone numbers for ").removesuffix("?").split(", ")
    assert len(asked) == 2 and s.target == ", ".join(book[n] for n in asked)
    # the default stays the paper's format
    paper = R.phonebook_pair(VOCAB, np.random.default_rng(3), 5, 2)
    assert re.fullmatch(r"\d{3}-\d{3}-\d{4}(, \d{3}-\d{3}-\d{4})", paper.target)
    assert R.phonebook_length(VOCAB, 5, 2, digits=4, name_parts=1) < R.phonebook_length(VOCAB, 5, 2)


def test_phonebook_task_digits_and_name_parts_are_checked():
    task = get_task("phonebook", num_entries=3, max_queries=1, digits=2, name_parts=1, num_train=4)
    _, target, book, asked = task.text(np.random.default_rng(0))
    assert all(len(v) == 2 and " " not in n for n, v in book.items()) and target == book[asked[0]]
    with pytest.raises(ValueError, match="num_entries"):
        get_task("phonebook", num_entries=11, max_queries=1, digits=1)
    with pytest.raises(ValueError, match="name_parts"):
        get_task("phonebook", name_parts=3)
    assert R.mqar_queries(8, 0.5) == 4 and R.mqar_queries(3, 0.1) == 1


def test_config_fields_and_steps_override(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abc " * 100)
    with pytest.raises(ValueError, match="phonebook_digits"):
        BirdieConfig(text=str(text), phonebook_entries=20, phonebook_digits=1)
    with pytest.raises(ValueError, match="evals"):
        BirdieConfig(text=str(text), evals=("phonebook", "nope"))
    cfg = BirdieConfig(text=str(text), evals=("phonebook",), phonebook_digits=4)
    assert "evals" not in cfg.identity() and "phonebook_digits" in cfg.eval_settings("phonebook")
    assert set(EVALS) == {"infilling", "phonebook", "mqar"}
    budget = select(B.full(), steps=7)
    s = budget.settings[0]
    c = B.config(s, seed=2)
    assert c.steps == 7 and c.seed == 2 and c.runs == (s.sections["task"]["run"],) and c.mixer == B.SSM
    names = {x.name for x in B.full().settings}
    assert names == {f"{r}-{B.SSM}" for r in ("ntp", "ul2", "fixed", "birdie-causal")} | {
        "transformer-ntp", "ntp-rglru", "birdie-rglru"}
    hawk = B.config(next(x for x in B.full().settings if x.name == "birdie-rglru"), seed=0)
    assert hawk.mixer == "rglru" and hawk.prefix_layers and hawk.mqar_layout == "aligned"
    with pytest.raises(ValueError, match="mqar_keys"):
        BirdieConfig(text=str(text), mqar_layout="aligned", mqar_pairs=(4, 32))
    with pytest.raises(ValueError, match="mqar_train_pairs"):
        BirdieConfig(text=str(text), mqar_pairs=(4, 8), mqar_train_pairs=9)
    with pytest.raises(ValueError, match="mqar_layout"):
        BirdieConfig(text=str(text), mqar_layout="sideways")
    with pytest.raises(ValueError, match="prefix_layers"):
        BirdieConfig(text=str(text), mixer="mamba2")


def test_quick_pipeline(tmp_path):
    repro = get_reproduction("birdie")
    summary = run_reproduction(repro, tmp_path / "out", quick=True, doc_dir=tmp_path / "docs", progress=False,
                               command="ssmkit reproduce birdie --quick")
    budget = repro.quick()
    assert summary["runs"] == len(budget.settings) and summary["skipped"] == 0
    md = (tmp_path / "docs" / "birdie.md").read_text()
    assert "ssmkit reproduce birdie --quick" in md and "](birdie.png)" in md and "~79%" in md
    assert (tmp_path / "docs" / "birdie.png").is_file()
    for s in budget.settings:
        rec = json.loads((tmp_path / "out" / s.name / "seed0" / "record.json").read_text())
        acc = rec["extra"]["accuracy"]
        assert set(acc) == {"4", "8", "16"} and rec["value"] == pytest.approx(sum(acc.values()) / 3)
        assert rec["chance"] == 1 / 26
        assert rec["final"]["val_ppl"] > 1 and rec["steps"] == 4
    again = run_reproduction(repro, tmp_path / "out", quick=True, progress=False)
    assert again["skipped"] == len(budget.settings) and again["settings"] == summary["settings"]


def test_interleaved_mqar_puts_each_value_after_its_key():
    p = R.mqar_pair(VOCAB, np.random.default_rng(1), 5, 3, num_keys=8, interleaved=True)
    inp, lab = p.input, p.label
    assert inp[0] == VOCAB.paradigm_id("prefix_lm") and inp[-1] == VOCAB.sep_id and len(inp) == 12
    keys, values = inp[1:11:2], inp[2:11:2]
    assert (keys < 8).all() and ((values >= 130) & (values < 138)).all() and len(set(keys.tolist())) == 5
    lookup = dict(zip(keys.tolist(), values.tolist(), strict=True))
    assert lab[-1] == VOCAB.done_id and [lookup[k] for k in lab[0:-1:2].tolist()] == lab[1:-1:2].tolist()
    masked = R.mqar_loss_mask(VOCAB, torch.tensor([[-100, 3, 131, 7, 200, VOCAB.done_id]]))
    assert masked.tolist() == [[-100, -100, 131, -100, 200, VOCAB.done_id]]
    with pytest.raises(ValueError, match="num_pairs"):
        R.mqar_pair(VOCAB, np.random.default_rng(0), 9, num_keys=8)
    with pytest.raises(ValueError, match="num_keys"):
        R.mqar_pair(VOCAB, np.random.default_rng(0), 2, num_keys=131)


def test_learned_recall_reads_the_fewest_pairs():
    assert B.learned_recall({"extra": {"accuracy": {"8": 0.2, "4": 0.95}}})
    assert not B.learned_recall({"extra": {"accuracy": {"8": 0.95, "4": 0.89}}})
