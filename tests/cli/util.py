"""Shared helpers of the CLI tests: a tiny training run's flags and one-line error checks."""

from __future__ import annotations

import os
import subprocess
import sys

SUBCOMMANDS = ("train", "eval", "generate", "tasks", "models", "bench", "birdie", "demo", "export", "import-gguf",
               "reproduce", "forecast")
TINY = ["--task", "mqar", "--model", "mamba", "--set", "task.vocab_size=32", "--set", "task.seq_len=16",
        "--set", "task.num_pairs=2", "--set", "task.num_train=64", "--set", "task.num_val=16",
        "--set", "model.d_model=16", "--set", "model.mixer_options.mamba.d_state=4", "--set", "train.steps=3",
        "--set", "train.batch_size=8", "--set", "train.eval_every=0", "--set", "train.threads=1",
        "--set", "train.plots=false"]


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("SSMKIT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "ssmkit.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]
