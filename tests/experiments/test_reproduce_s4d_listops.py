"""ssmkit reproduce s4d-listops: the quick pipeline, its test-split evaluation and the papers' rows."""

from __future__ import annotations

import json

from ssmkit.experiments.reproduce import get_reproduction, run_reproduction
from ssmkit.experiments.reproduce.s4d_listops import PAPER


def test_quick_pipeline_reports_test_accuracy_beside_the_papers(tmp_path):
    repro = get_reproduction("s4d-listops")
    summary = run_reproduction(repro, tmp_path / "out", quick=True, doc_dir=tmp_path / "docs", progress=False,
                               command="ssmkit reproduce s4d-listops --quick")
    (setting,) = repro.quick().settings
    assert summary["runs"] == 1 and summary["settings"][0]["chance"] == 0.1
    rec = json.loads((tmp_path / "out" / setting.name / "seed0" / "record.json").read_text())
    extra = rec["extra"]
    # 16 test examples: accuracies and the majority share are multiples of 1/16
    assert all(0.0 <= extra[k] <= 1.0 and (16 * extra[k]).is_integer() for k in ("test_accuracy", "majority"))
    assert extra["majority"] >= 1 / 10  # the most frequent of 10 classes holds at least a tenth
    md = (tmp_path / "docs" / "s4d-listops.md").read_text()
    for name, acc in PAPER:
        assert f"| {name} | {acc:.1f} |" in md
    assert f"| ours: S4D {setting.name}, test | {100 * extra['test_accuracy']:.1f} |" in md
    assert "](s4d-listops.png)" in md and "x a uniform guess" in md
