"""benchmarks/bench_ops.py's memory plan: peers whose estimated peak exceeds --max-gib are skipped, and said so."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_ops  # noqa: E402


def test_estimate_scales_with_length_and_orders_the_peers():
    for impl in bench_ops.IMPLS:
        assert bench_ops.estimated_peak_gib(impl, 8192) == pytest.approx(2 * bench_ops.estimated_peak_gib(impl, 4096))
    est = {impl: bench_ops.estimated_peak_gib(impl, 16384) for impl in bench_ops.IMPLS}
    assert est["ssmkit"] < 1 < est["transformers"] < est["mambapy"]
    assert est["mambapy"] > 12  # the 12 GiB mambapy was measured to take at L=16384


def test_default_budget_skips_only_the_long_peers():
    skipped = bench_ops.plan_scan([4096, 16384], bench_ops.DEFAULT_MAX_GIB)
    assert set(skipped) == {("mambapy", 16384), ("transformers", 16384)}
    assert skipped[("mambapy", 16384)] == "skipped: needs about 14.2 GiB > --max-gib 4 (pass --max-gib 15 to run it)"


def test_a_large_budget_runs_everything_and_the_suggested_budget_suffices():
    assert bench_ops.plan_scan([4096, 16384], 16) == {}
    for (impl, length), why in bench_ops.plan_scan([4096, 16384, 65536], 1).items():
        suggested = float(why.rsplit("--max-gib ", 1)[1].split()[0])
        assert bench_ops.plan_scan([length], suggested).get((impl, length)) is None


@pytest.mark.parametrize("argv, message", [(["--max-gib", "0"], "--max-gib: expected a positive number"),
                                           (["--lengths", "0", "16"], "--lengths: expected positive integers")])
def test_bad_arguments_are_one_line_errors(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_ops.py", *argv])
    with pytest.raises(SystemExit):
        bench_ops.main()
    assert message in capsys.readouterr().err
