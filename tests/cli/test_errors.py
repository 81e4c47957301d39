"""One-line errors for the mistakes a new user made, and a run directory left as it was when a command fails."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ssmkit.cli import main
from ssmkit.cli.common import removed_on_failure
from tests.cli.util import TINY


def one_line(capsys) -> str:
    out, err = capsys.readouterr()
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--run-dir", str(run), "--quiet"]) == 0
    return run


def test_resume_below_the_done_steps_changes_nothing(trained_run, capsys):
    capsys.readouterr()
    files = {p: p.read_bytes() for p in trained_run.rglob("*") if p.is_file()}
    assert main(["train", "--resume", "--run-dir", str(trained_run), "--set", "train.steps=2", "--quiet"]) == 2
    line = one_line(capsys)
    assert "train.steps=2 is below the checkpoint's step 3" in line and "done:" not in line
    assert {p: p.read_bytes() for p in trained_run.rglob("*") if p.is_file()} == files


def test_models_with_zero_vocab_prints_no_table(capsys):
    with pytest.raises(SystemExit) as e:
        main(["models", "--vocab-size", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("argv,needles", [
    (["train", "--task", "text"], ["task 'text' needs task.path", "--set task.path="]),
    (["train", *TINY, "--set", "train.warmup_steps=4"], ["train.warmup_steps=4 is invalid", "steps=3"]),
])
def test_config_mistakes(argv, needles, capsys, tmp_path):
    assert main([*argv, "--run-dir", str(tmp_path / "r")]) == 2
    line = one_line(capsys)
    assert all(n in line for n in needles), line
    assert not (tmp_path / "r").exists()


def test_text_file_too_short_for_seq_len(tmp_path, capsys):
    """The message names seq_len, the file's tokens and batch_size x seq_len (not num_train), and no run
    directory is left behind."""
    text = tmp_path / "short.txt"
    text.write_text("to be or not to be " * 5)
    run = tmp_path / "runs" / "short"
    argv = ["train", "--task", "text", "--set", f"task.path={text}", "--set", "task.seq_len=512",
            "--set", "train.batch_size=1", "--set", "model.d_model=16", "--run-dir", str(run), "--quiet"]
    assert main(argv) == 2
    line = one_line(capsys)
    assert "batch_size x seq_len = 1 x 512 = 512 training tokens" in line
    assert "gives 86 training tokens (95 in all" in line and "num_train" not in line
    assert not run.exists() and not run.parent.exists()


def test_binary_file_is_not_text(tmp_path, capsys):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 8)
    assert main(["train", "--task", "text", "--set", f"task.path={blob}", "--run-dir", str(tmp_path / "r")]) == 2
    line = one_line(capsys)
    assert "not valid UTF-8: byte 0x80 at offset 128" in line and "task.encoding=bytes" in line


@pytest.mark.skipif(importlib.util.find_spec("aeon") is not None, reason="aeon is installed")
def test_ucr_without_aeon_or_sktime_names_the_right_packages(tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sktime" else find_spec(name, *a))
    assert main(["train", "--task", "ucr", "--set", "task.dataset=GunPoint", "--run-dir", str(tmp_path / "r")]) == 2
    line = one_line(capsys)
    assert "`pip install aeon or sktime`" in line and "ssmkit[data]" not in line and "path=" in line


def test_removed_on_failure_only_removes_what_it_created(tmp_path):
    new = tmp_path / "a" / "b" / "run"
    with pytest.raises(RuntimeError), removed_on_failure(new, keep=lambda: False):
        new.mkdir(parents=True)
        (new / "config.json").write_text("{}")
        raise RuntimeError("after set-up")
    assert not (tmp_path / "a").exists()  # the run directory and the parents it created

    with pytest.raises(RuntimeError), removed_on_failure(new, keep=lambda: True):
        new.mkdir(parents=True)
        raise RuntimeError("after a checkpoint")
    assert new.is_dir()  # something worth keeping was written

    existing = tmp_path / "mine"
    existing.mkdir()
    with pytest.raises(RuntimeError), removed_on_failure(existing / "run", keep=lambda: False):
        (existing / "run").mkdir()
        raise RuntimeError
    assert existing.is_dir() and not (existing / "run").exists()
    with pytest.raises(RuntimeError), removed_on_failure(existing, keep=lambda: False):
        raise RuntimeError
    assert existing.is_dir()  # never removes a directory that existed


def test_birdie_default_text_is_the_bundled_corpus():
    from ssmkit.cli import birdie, build_parser
    from ssmkit.data.corpora import tiny_shakespeare_path

    args = build_parser().parse_args(["birdie", "--quick"])
    assert birdie._config(args).text == str(tiny_shakespeare_path())
