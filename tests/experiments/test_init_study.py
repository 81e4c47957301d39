"""The init study's --quick pipeline: every cell trains, the records and the table are written, a second run
resumes from runs.jsonl without training again, and bad grids fail naming the field."""

from __future__ import annotations

import json

import pytest

import ssmkit.experiments.init_study as S


def test_quick_pipeline_writes_and_resumes(tmp_path, monkeypatch, capsys):
    assert S.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "init_study.json").read_text())
    runs = data["runs"]
    assert {(r["family"], r["init"]) for r in runs} == {(f, i) for f in S.QUICK.families for i in S.QUICK.inits}
    assert all(r["metric"] == "accuracy" and 0.0 <= r["value"] <= 1.0 and r["wall_s"] > 0 for r in runs)
    table = (tmp_path / "init_study.md").read_text()
    assert table.splitlines()[0] == "| task | family | legacy lr=0.001 | scaled lr=0.001 |"
    for r in runs:  # every value appears in its row
        row = next(line for line in table.splitlines() if f"| {r['task']} | {r['family']} |" in line)
        assert f"{100 * r['value']:.1f}" in row
    # the init rule reached the models: legacy runs recorded init_std 0.02, scaled ones None
    for r in runs:
        cfg = json.loads((tmp_path / "runs" / r["key"].replace("|", "_") / "config.json").read_text())
        assert cfg["model"]["init_std"] == S.INITS[r["init"]]["init_std"]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(S, "run_cell", no_training)
    again = S.run_study(S.QUICK, tmp_path, log=False)
    assert [r["key"] for r in again] == [r["key"] for r in runs]


@pytest.mark.parametrize(("changes", "field"), [({"tasks": ("nope",)}, "tasks"), ({"inits": ()}, "inits"),
                                               ({"seeds": 0}, "seeds"), ({"lrs": (-1.0,)}, "lrs"),
                                               ({"families": ()}, "families")])
def test_bad_grid_names_the_field(changes, field):
    with pytest.raises(ValueError, match=f"StudyConfig.{field}"):
        S.StudyConfig(**changes)


def test_a_run_with_a_checkpoint_continues_instead_of_restarting(tmp_path):
    cell = S.QUICK.cells()[0]
    first = S.run_cell(S.QUICK, cell, tmp_path)
    ckpts = sorted((tmp_path / "checkpoints").iterdir())
    again = S.run_cell(S.QUICK, cell, tmp_path)  # resumes at the final step: nothing left to train
    assert again["value"] == first["value"] and again["final"] == first["final"]
    assert sorted((tmp_path / "checkpoints").iterdir()) == ckpts
