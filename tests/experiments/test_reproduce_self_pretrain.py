"""ssmkit reproduce self-pretrain: the quick pipeline (scratch and self-pretrained pairs on ListOps and digits),
that the pairs differ only in self-pretraining, and the gap arithmetic of the report."""

from __future__ import annotations

import json

from ssmkit.experiments.reproduce import get_reproduction, run_reproduction
from ssmkit.experiments.reproduce.self_pretrain import _gap_rows


def test_quick_pipeline_pretrains_only_the_spt_runs(tmp_path):
    repro = get_reproduction("self-pretrain")
    summary = run_reproduction(repro, tmp_path / "out", quick=True, doc_dir=tmp_path / "docs", progress=False,
                               command="ssmkit reproduce self-pretrain --quick")
    budget = repro.quick()
    assert summary["runs"] == len(budget.settings) == 8
    md = (tmp_path / "docs" / "self-pretrain.md").read_text()
    assert "## The S4D - Transformer gap" in md and "](self-pretrain.png)" in md and "\n- listops: " in md
    assert (tmp_path / "docs" / "self-pretrain.png").is_file()
    for s in budget.settings:
        run = tmp_path / "out" / s.name / "seed0"
        splits = {json.loads(line)["split"] for line in (run / "metrics.jsonl").read_text().splitlines()}
        assert ("pretrain" in splits) == s.name.endswith("-spt") and "val" in splits
        rec = json.loads((run / "record.json").read_text())
        assert 0.0 <= rec["value"] <= 1.0
    for a in budget.settings:  # a pair differs only in train.pretrain / pretrain_steps
        if a.name.endswith("-scratch"):
            b = next(s for s in budget.settings if s.name == a.name.replace("-scratch", "-spt"))
            diff = {k for k in b.sections["train"] if a.sections["train"].get(k) != b.sections["train"][k]}
            assert diff == {"pretrain", "pretrain_steps"} and a.sections["model"] == b.sections["model"]


def test_gap_rows():
    def s(task, model, init, mean):
        return {"meta": {"task": task, "model": model, "init": init}, "mean": mean}

    by = {str(i): x for i, x in enumerate([s("t", "S4D", "scratch", 0.6), s("t", "Transformer", "scratch", 0.4),
                                            s("t", "S4D", "spt", 0.65), s("t", "Transformer", "spt", 0.6),
                                            s("u", "S4D", "scratch", 0.5)])}
    (row,) = _gap_rows(by, ["t", "u"])  # "u" lacks its other three settings
    assert row == ["t", "+20.0", "+5.0", "75%"]
    by["3"]["mean"] = 0.7  # the Transformer overtakes: more than the whole gap closed
    assert _gap_rows(by, ["t"])[0][3] == "125%"
    by["1"]["mean"] = 0.6  # no gap from scratch: nothing to close
    assert _gap_rows(by, ["t"])[0][1:] == ["+0.0", "-5.0", "-"]
