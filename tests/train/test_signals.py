"""SIGTERM during training saves a checkpoint and exits with 128 + 15; the run resumes from it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ssmkit.cli import main
from ssmkit.train import latest_checkpoint, read_training_state

ARGS = ["train", "--task", "mqar", "--model", "mamba", "--set", "task.vocab_size=32",
        "--set", "task.seq_len=16", "--set", "task.num_pairs=2", "--set", "task.num_train=64",
        "--set", "task.num_val=16", "--set", "model.d_model=16",
        "--set", "model.mixer_options.mamba.d_state=4", "--set", "train.batch_size=8",
        "--set", "train.eval_every=0", "--set", "train.save_every=0", "--set", "train.log_every=1",
        "--set", "train.threads=1", "--set", "train.plots=false", "--quiet"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path, capsys):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "ssmkit.cli", *ARGS, "--set", "train.steps=1000000",
                             "--run-dir", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    try:
        while metrics.read_text().count('"train"') < 2 if metrics.is_file() else True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training did not start in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "checkpoint saved to" in err and "--resume" in err and "Traceback" not in err
    ckpt = latest_checkpoint(run / "checkpoints")
    meta, tensors = read_training_state(ckpt)
    step = meta["step"]
    src = meta["source"]
    assert step >= 2 and src["epoch"] * 8 + src["position"] == step  # 8 batches per epoch, one per step
    assert "Interrupted at step" in (run / "report.md").read_text()
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporaries left
    # resume (in this process) for one more step
    assert main([*ARGS, "--resume", "--run-dir", str(run), "--set", f"train.steps={step + 1}"]) == 0
    assert f"done: step {step + 1}/{step + 1}" in capsys.readouterr().out
    assert read_training_state(latest_checkpoint(run / "checkpoints"))[0]["step"] == step + 1
