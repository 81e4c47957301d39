"""ssmkit reproduce: the quick pipeline of every reproduction, resume, seed aggregation, --list and errors."""

from __future__ import annotations

import json

import pytest
import torch

from ssmkit.cli import main
from ssmkit.experiments.reproduce import get_reproduction, reproductions, run_reproduction
from ssmkit.experiments.reproduce.runner import aggregate, run_sections, select
from ssmkit.train import Trainer, resolve_run

OURS = ("induction", "selective-copy", "mqar")


def test_registry_finds_the_reproductions_and_rejects_unknown_names():
    assert set(OURS) <= set(reproductions())
    with pytest.raises(ValueError, match="unknown reproduction 'nope'; expected one of .*selective-copy"):
        get_reproduction("nope")


@pytest.mark.parametrize("name", OURS)
def test_quick_pipeline_writes_report_plots_and_records(name, tmp_path):
    repro = get_reproduction(name)
    summary = run_reproduction(repro, tmp_path / "out", quick=True, doc_dir=tmp_path / "docs", progress=False,
                               command=f"ssmkit reproduce {name} --quick")
    budget = repro.quick()
    assert summary["runs"] == len(budget.settings) * budget.seeds and summary["skipped"] == 0
    for target in (tmp_path / "out", tmp_path / "docs"):
        md = (target / f"{name}.md").read_text()
        assert f"ssmkit reproduce {name} --quick" in md and "QUICK" in md and "Machine:" in md
        pngs = sorted(p.name for p in target.glob("*.png"))
        assert pngs and all(f"]({p})" in md for p in pngs)
    for s in budget.settings:
        for k in range(budget.seeds):
            rec = json.loads((tmp_path / "out" / s.name / f"seed{k}" / "record.json").read_text())
            assert rec["setting"] == s.name and rec["seed"] == k and 0.0 <= rec["value"] <= 1.0
    assert json.loads((tmp_path / "docs" / f"{name}.json").read_text())["settings"] == summary["settings"]


def test_finished_runs_are_skipped_and_seeds_aggregated(tmp_path):
    repro = get_reproduction("selective-copy")
    first = run_reproduction(repro, tmp_path, quick=True, only="mamba", seeds=2, progress=False)
    rec = tmp_path / "mamba" / "seed1" / "record.json"
    stamp = rec.stat().st_mtime_ns
    (tmp_path / "selective-copy.notes.md").write_text("Mamba copies; hand-written.")
    again = run_reproduction(repro, tmp_path, quick=True, only="mamba", seeds=2, progress=False)
    assert "## Observations" in (tmp_path / "selective-copy.md").read_text() and "hand-written." in \
        (tmp_path / "selective-copy.md").read_text()
    assert again["skipped"] == 2 and rec.stat().st_mtime_ns == stamp
    (s,) = again["settings"]
    assert s == first["settings"][0] and s["n"] == 2 and len(s["values"]) == 2
    assert s["mean"] == pytest.approx(sum(s["values"]) / 2)
    assert first["label"] == "quick (--only mamba, --seeds 2)"


def test_an_interrupted_run_resumes_exactly(tmp_path):
    """A run stopped after its first step (checkpoint saved) is continued by the runner and ends where an
    uninterrupted run ends."""
    repro = get_reproduction("selective-copy")
    whole = run_reproduction(repro, tmp_path / "a", quick=True, only="h3-s6", seeds=1, progress=False)
    setting = next(s for s in repro.quick().settings if s.name == "h3-s6")
    run_dir = tmp_path / "b" / "h3-s6" / "seed0"
    Trainer(resolve_run(run_sections(setting, 0)), run_dir, quiet=True).train(until=1)
    assert not (run_dir / "record.json").exists()
    resumed = run_reproduction(repro, tmp_path / "b", quick=True, only="h3-s6", seeds=1, progress=False)
    a = json.loads((tmp_path / "a" / "h3-s6" / "seed0" / "record.json").read_text())
    b = json.loads((run_dir / "record.json").read_text())
    assert a["final"] == b["final"] and resumed["settings"][0]["values"] == whole["settings"][0]["values"]


def test_a_run_dir_with_other_settings_is_an_error(tmp_path):
    repro = get_reproduction("selective-copy")
    run_reproduction(repro, tmp_path, quick=True, only="s4d", seeds=1, progress=False)
    with pytest.raises(ValueError, match="holds a run started with other settings"):
        run_reproduction(repro, tmp_path, quick=True, only="s4d", seeds=1, steps=3, progress=False)


def test_select_and_aggregate():
    budget = get_reproduction("mqar").quick()
    sel = select(budget, only="mamba-*,attn-w32*", steps=7, seeds=3)
    assert [s.name for s in sel.settings] == ["mamba-w16-L16-kv2", "mamba-m2blk-w16-L16-kv2", "mamba-w32-L16-kv2",
                                              "attn-w32-L16-kv2", "mamba-w16-L16-kv2-N4"]
    assert sel.seeds == 3 and all(s.sections["train"]["steps"] == 7 for s in sel.settings)
    with pytest.raises(ValueError, match="--only 'x\\*' matches no setting"):
        select(budget, only="x*")
    agg = aggregate([0.5, 1.0, float("nan")])
    assert agg["n"] == 2 and agg["mean"] == 0.75 and agg["sd"] == pytest.approx(0.5 / 2 ** 0.5)


def test_chunked_long_evaluation_equals_one_pass():
    from ssmkit.experiments.reproduce.induction import last_logits

    torch.manual_seed(0)
    for preset in ("mamba", "h3", "longconv"):
        sections = {"task": {"name": "induction_heads", "vocab_size": 16, "seq_len": 40},
                    "model": {"preset": preset, "d_model": 8},
                    "train": {"dtype": "float64"}}
        model = resolve_run(sections).build_model().eval()
        ids = torch.randint(0, 16, (2, 40))
        whole = last_logits(model, ids, 40)
        assert torch.allclose(last_logits(model, ids, 7), whole, rtol=0, atol=1e-9), preset


def test_mqar_state_size_is_counted_from_the_model():
    from ssmkit.experiments.reproduce.mqar import state_size

    def build(preset):
        return resolve_run({"task": {"name": "mqar", "vocab_size": 64, "seq_len": 32, "num_pairs": 4},
                            "model": {"preset": preset, "d_model": 16}}).build_model()

    # Mamba: 2 layers x d_inner 32 x (d_state 16 + d_conv - 1 = 3); attention: 2 layers x (k, v) x 32 tokens x 16
    assert state_size(build("mamba"), 32) == 2 * 32 * (16 + 3)
    assert state_size(build("mamba-m2blk"), 32) == 2 * 32 * (16 + 3)  # same state; other block choices
    assert state_size(build("attn"), 32) == 2 * 2 * 32 * 16


def test_mqar_d_state_override_keeps_the_presets_block_options():
    from ssmkit.experiments.reproduce.mqar import TRAIN, full, setting

    spec = resolve_run(dict(setting("mamba-m2blk", 64, "L64-kv8", TRAIN, d_state=4).sections)).model
    assert spec.config.mixer_options["mamba"] == {"out_norm": True, "dt_source": "in_proj", "d_state": 4}
    settings = full().settings
    assert len({s.name for s in settings}) == len(settings)
    m2 = [s for s in settings if s.meta["model"] == "mamba-m2blk"]
    assert {s.meta["d_state"] for s in m2} == {4, 16, 64} and {s.meta["task"] for s in m2} == {"L64-kv8", "L32-kv4"}


def test_cli_list_and_errors(tmp_path, capsys):
    assert main(["reproduce", "--list", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in OURS:
        assert f"{name}  [" in out
    assert "last result:" in out
    assert main(["reproduce", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown reproduction 'nope'" in err
    assert main(["reproduce"]) == 2
    assert "give a reproduction NAME or --list" in capsys.readouterr().err


def test_cli_quick_run_then_list_shows_it(tmp_path, capsys):
    out = tmp_path / "sc"
    assert main(["reproduce", "selective-copy", "--quick", "--out", str(out), "--only", "s6", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'selective-copy.md'}" in printed
    assert not (tmp_path / "docs").exists()  # --quick writes no docs unless --doc-dir is given
    assert main(["reproduce", "--list", "--out", str(out)]) == 0
    listed = capsys.readouterr().out
    assert "quick (--only s6) run" in listed and ": s6 " in listed
