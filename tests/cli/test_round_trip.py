"""The ``ssmkit`` command: help, listings, one-line errors and a tiny train -> eval -> generate round trip."""

from __future__ import annotations

import json
import os

import pytest

from ssmkit.cli import build_parser, main
from tests.cli.util import SUBCOMMANDS, TINY, assert_one_line_error, run_cli


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help_of_each_subcommand(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ssmkit {cmd}")
    # every option of the subcommand is documented
    sub = build_parser()._subparsers._group_actions[0].choices[cmd]
    for action in sub._actions:
        if action.help is not None and action.option_strings:
            assert action.help, action.option_strings
            assert action.option_strings[-1] in out


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in SUBCOMMANDS:
        assert cmd in out
    assert main([]) == 2


def test_tasks_and_models_listings(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "mqar" in out and "selective_copy" in out and "num_pairs" in out
    assert main(["models", "--vocab-size", "64"]) == 0
    out = capsys.readouterr().out
    for name in ("mamba", "mamba2", "s4d", "gated", "rglru", "attn", "hybrid"):
        assert f"\n  {name} " in out, name
    assert "params" in out and "mixers" in out.lower() and "prefix-mamba" in out


def test_errors_in_process(capsys, tmp_path):
    """Unknown names list the valid ones; bad values give one line and status 2 (no training starts)."""
    cases = [
        (["train", "--task", "nosuch"], ["unknown task 'nosuch'", "mqar", "selective_copy"]),
        (["train", "--task", "mqar", "--model", "mambaa"],
         ["unknown model 'mambaa'", "valid presets: mamba"]),
        (["train", "--task", "mqar", "--set", "train.stepz=3"], ["unknown train key 'stepz'", "batch_size"]),
        (["train", "--task", "mqar", "--set", "model.d_modl=3"], ["unknown model key 'd_modl'", "d_model"]),
        (["train", "--task", "mqar", "--set", "task.seq_len=-5"], ["seq_len=-5", ">= 4"]),
        (["train", "--task", "mqar", "--set", "task.seq_len=16", "--set", "task.num_pairs=6"], ["num_pairs"]),
        (["train", "--task", "mqar", "--set", "model.d_model=0"], ["d_model"]),
        (["train", "--task", "mqar", "--set", "train.lr=-1"], ["train.lr"]),
        (["train"], ["no task given"]),
        (["train", "--resume"], ["--resume needs --run-dir"]),
        (["eval", str(tmp_path / "nope")], ["no such run directory"]),
    ]
    for argv, needles in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1, (argv, err)
        for n in needles:
            assert n in lines[0], (argv, n, lines[0])


def test_errors_as_subprocess_are_one_line():
    assert_one_line_error(run_cli("train", "--task", "mqar", "--set", "task.seq_len=8", "--set",
                                  "task.num_pairs=3"), "num_pairs")


def test_train_eval_generate_round_trip(tmp_path, capsys):
    """Train through the installed entry point in a subprocess, then evaluate and generate from the saved
    checkpoint through the CLI (in this process, loading everything from disk)."""
    run = str(tmp_path / "run")
    p = run_cli("train", *TINY, "--run-dir", run, "--quiet")
    assert p.returncode == 0, p.stderr
    assert "done: step 3/3" in p.stdout and "report:" in p.stdout and "checkpoint:" in p.stdout
    for name in ("report.md", "metrics.jsonl", "metrics.csv", "config.json", "checkpoints/latest"):
        assert os.path.exists(os.path.join(run, name)), name
    # an existing run directory is not silently reused
    assert main(["train", *TINY, "--run-dir", run, "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err

    assert main(["eval", run, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["split"] == "val" and res["chance_level"] == 1 / 16
    assert 0.0 <= res["metrics"]["accuracy"] <= 1.0
    assert json.load(open(os.path.join(run, "eval_val.json")))["metrics"] == res["metrics"]
    assert main(["eval", run, "--split", "test", "--batch-size", "4"]) == 0
    assert "accuracy" in capsys.readouterr().out

    assert main(["generate", run, "--prompt", "3 20 5 17 3", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    gen = next(x for x in out.splitlines() if x.startswith("generated"))
    ids = [int(t) for t in gen.split(":", 1)[1].split()]
    assert len(ids) == 2 and all(0 <= i < 32 for i in ids)
    assert main(["generate", run, "--example", "0", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("expected:") == 2 and "tokens match" in out
    assert main(["generate", run, "--example", "0", "--int8"]) == 0
    assert "expected:" in capsys.readouterr().out
    import ssmkit.infer as infer

    seen = []
    real = infer.quantize_weights
    with pytest.MonkeyPatch.context() as mp:  # the flag reaches quantize_weights
        mp.setattr(infer, "quantize_weights", lambda m, **kw: seen.append(kw) or real(m, **kw))
        assert main(["generate", run, "--example", "0", "--int8", "--int8-activations"]) == 0
    assert seen == [{"bits": 8, "activations": "int8"}]
    assert "expected:" in capsys.readouterr().out
    assert main(["generate", run, "--example", "0", "--int8-activations"]) == 2
    assert "--int8-activations needs --int8 or --int4" in capsys.readouterr().err
    assert main(["generate", run, "--example", "0", "--int4"]) == 2  # d_model 16: no whole group of 32 inputs
    assert "with bits=4 every layer's in_features must be a multiple of group_size 32" in capsys.readouterr().err
    assert main(["generate", run, "--prompt", "3 99"]) == 2
    assert "outside [0, vocab_size=32)" in capsys.readouterr().err

    # --resume with more steps continues the run from its checkpoint
    assert main(["train", "--resume", "--run-dir", run, "--set", "train.steps=4", "--quiet"]) == 0
    assert "done: step 4/4" in capsys.readouterr().out
    assert main(["train", "--resume", "--run-dir", run, "--model", "s4d"]) == 2
    assert "keeps its model" in capsys.readouterr().err
