"""The Birdie comparison end to end at toy size: runs, exact resume with the controller's tensors, results,
report, skipping finished runs, and the ``ssmkit birdie`` command."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from ssmkit.cli import main
from ssmkit.experiments.birdie import build_run, collect_results, controller_config, row_loss_fn, run_birdie
from ssmkit.experiments.birdie_config import QUICK, RUNS, BirdieConfig
from ssmkit.objectives.mixtures import BirdieMixture
from ssmkit.train import Trainer

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 120)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("birdie") / "text.txt"
    path.write_text(TEXT)
    return str(path)


def quick(text: str, **kw) -> BirdieConfig:
    fields = {**QUICK, "tokens": 12 * 4 * 128, "eval_every": 6, "phonebook_steps": 2, "phonebook_examples": 2,
              "phonebook_queries": (1, 2), "infill_rows": 4, **kw}
    return BirdieConfig(text=text, **fields)


def test_runs_use_the_right_models_and_batches(text_file):
    cfg = quick(text_file)
    for name, (mixture, kind) in RUNS.items():
        setup, source = build_run(cfg, name)
        batch = source.next_batch()
        prefix = name in ("ul2", "fixed", "birdie")
        assert setup.model.head == ("PrefixLM" if prefix else "CausalLM")
        assert ("prefix_mask" in batch) == prefix and ("prefix_mask" in next(setup.task.batches("val", 2))) == prefix
        assert setup.model.config.pattern == ["attn" if kind == "transformer" else cfg.mixer] * cfg.n_layers
        assert source.mixture.name == mixture and setup.train.steps == cfg.steps
        assert setup.model.config.vocab_size == source.vocab_size == setup.task.vocab_size
    c = controller_config(cfg)
    assert c.explore_decay_steps == cfg.steps and c.hidden == cfg.reward_hidden


def test_birdie_resume_is_exact_with_controller_state(tmp_path, text_file):
    cfg = quick(text_file, eval_every=100)
    steps = cfg.steps

    def trainer(run_dir, resume=False):
        setup, source = build_run(cfg, "birdie")
        tr = Trainer(setup, run_dir, source=source, resume=resume, quiet=True)
        source.loss_fn = row_loss_fn(tr.model)
        return tr, source

    straight, s_src = trainer(tmp_path / "a")
    straight.train()
    first, _ = trainer(tmp_path / "b")
    first.train(until=steps // 2)
    resumed, r_src = trainer(tmp_path / "b", resume=True)
    assert resumed.step == steps // 2
    resumed.train()
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert isinstance(r_src.mixture, BirdieMixture)
    a_ctl, b_ctl = s_src.mixture.controller, r_src.mixture.controller
    assert len(a_ctl.log) >= 3, "the controller made decisions during the run"
    np.testing.assert_array_equal(a_ctl.action, b_ctl.action)
    for a, b in zip(a_ctl.model.state_dict().values(), b_ctl.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    ckpt = next((tmp_path / "b" / "checkpoints").glob("step-*"))
    assert not list(ckpt.glob("*.pt")) and "__tensor__" in (ckpt / "trainer_state.json").read_text()


def test_run_birdie_end_to_end_and_skips_finished_runs(tmp_path, text_file):
    cfg = quick(text_file, runs=("ntp", "birdie"))
    results = run_birdie(cfg, tmp_path, quiet=True)
    assert list(results) == ["ntp", "birdie"]
    for r in results.values():
        assert r["steps"] == cfg.steps and r["tokens"] == cfg.steps * cfg.batch_size * cfg.seq_len
        assert np.isfinite(r["val"]["loss"]) and 0 <= r["infilling"]["token_accuracy"] <= 1
        assert set(r["phonebook"]["finetuned"]) == {"1", "2"} and set(r["phonebook"]["zero_shot"]) == {"1", "2"}
        assert set(r["mqar"]["accuracy"]) == {"4", "8"} and all(0 <= v <= 1 for v in r["mqar"]["accuracy"].values())
        assert sum(r["arm_counts"].values()) > 0
    ntp_counts = results["ntp"]["arm_counts"]
    assert all(v == 0 for k, v in ntp_counts.items() if not k.startswith("next_token")), "ntp trains on ntp only"
    assert results["birdie"]["controller_log"] and len(results["birdie"]["arm_names"]) == 45
    for f in ("results.json", "birdie_report.md", "phonebook.png", "val_loss.png", "mixture_birdie.png", "mqar.png"):
        assert (tmp_path / f).is_file(), f
    # a second call finds the finished runs and trains nothing
    stamp = (tmp_path / "ntp" / "result.json").stat().st_mtime_ns
    again = run_birdie(dataclasses.replace(cfg, runs=("ntp",)), tmp_path, quiet=True)
    assert (tmp_path / "ntp" / "result.json").stat().st_mtime_ns == stamp
    assert list(again) == ["ntp", "birdie"], "results.json gathers every finished run of these settings"
    # changed evaluation settings re-evaluate from the final checkpoint without training again
    old = json.loads((tmp_path / "ntp" / "result.json").read_text())
    changed = run_birdie(dataclasses.replace(cfg, runs=("ntp",), mqar_pairs=(2, 4)), tmp_path, quiet=True)["ntp"]
    assert set(changed["mqar"]["accuracy"]) == {"2", "4"} and changed["phonebook"] == old["phonebook"]
    assert changed["val"] == old["val"] and changed["train_time"] == old["train_time"]
    assert collect_results(dataclasses.replace(cfg, lr=1e-4), tmp_path) == {}
    assert set(collect_results(dataclasses.replace(cfg, phonebook_steps=9), tmp_path)) == {"ntp", "birdie"}
    with pytest.raises(ValueError, match="another BirdieConfig"):
        run_birdie(dataclasses.replace(cfg, runs=("ntp",), lr=1e-4), tmp_path, quiet=True)


def test_config_validation(text_file):
    with pytest.raises(ValueError, match="runs"):
        BirdieConfig(text=text_file, runs=("nope",))
    with pytest.raises(ValueError, match="phonebook_queries"):
        BirdieConfig(text=text_file, phonebook_entries=4, phonebook_queries=(8,))
    with pytest.raises(ValueError, match="tokens"):
        BirdieConfig(text=text_file, tokens=0)
    with pytest.raises(ValueError, match="unknown keys"):
        BirdieConfig.from_dict({"text": text_file, "colour": 1})
    cfg = BirdieConfig(text=text_file)
    assert BirdieConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_cli_birdie(tmp_path, text_file, capsys):
    out = tmp_path / "out"
    args = ["birdie", "--quick", "--quiet", "--text", text_file, "--out", str(out), "--runs", "ntp",
            "--set", "tokens=3072", "--set", "phonebook_queries=[1]", "--set", "phonebook_steps=1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| ntp | CausalLM |" in printed and (out / "ntp" / "result.json").is_file()
    assert main(["birdie", "--text", text_file, "--runs", "ntp,bogus", "--out", str(out)]) == 2
    assert "unknown run" in capsys.readouterr().err
    assert main(["birdie", "--text", text_file, "--set", "colour=1", "--out", str(out)]) == 2
