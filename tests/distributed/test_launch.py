"""``ssmkit train --nproc 2`` (the CLI under torchrun) stopped by SIGTERM to the whole job: one agreed, complete
checkpoint, resumed exactly. (Two torchrun "machines" run the plans of test_ddp.py.)"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from ssmkit.cli import main
from ssmkit.train import latest_checkpoint, read_training_state

from .ddp_common import DEADLINE, ENV, final_weights, max_diff, sections, set_args


def train_records(run) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count('"train"') if path.is_file() else 0


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_to_the_job_saves_one_checkpoint_and_resume_is_exact(tmp_path, capsys):
    """SIGTERM to ``ssmkit train --nproc 2`` (which is torchrun by then): the ranks agree on a step, rank 0 writes
    one complete checkpoint; resuming it (in one process: no dropout, so the numbers are the same) equals an
    uninterrupted run. A constant learning rate makes the schedule independent of train.steps."""
    run = tmp_path / "run"
    sec = sections(steps=1_000_000, batch_size=8, lr=1e-2, warmup_steps=0, schedule="constant", dtype="float64")
    args = ["train", *set_args(sec), "--quiet", "--run-dir", str(run)]
    proc = subprocess.Popen([sys.executable, "-m", "ssmkit.cli", *args, "--nproc", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + DEADLINE
    try:
        while train_records(run) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training did not start in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "interrupted at step" in err and "--resume" in err, err[-3000:]
    ckpts = [p for p in (run / "checkpoints").iterdir() if p.name != "latest"]
    assert [p.name for p in ckpts] == [latest_checkpoint(run / "checkpoints").name]  # no temporaries, one step
    meta, _ = read_training_state(ckpts[0])
    step, src = meta["step"], meta["source"]
    assert step >= 2 and src["epoch"] * 8 + src["position"] == step and len(meta["rank_rng"]) == 2
    assert "Interrupted at step" in (run / "report.md").read_text()
    assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()][-1] == step

    resume = ["train", *set_args(sec), "--quiet", "--resume", "--run-dir", str(run)]
    assert main([*resume, "--set", f"train.steps={step + 2}"]) == 0
    straight = ["train", *set_args(sec), "--quiet", "--run-dir", str(tmp_path / "straight")]
    assert main([*straight, "--set", f"train.steps={step + 2}"]) == 0
    capsys.readouterr()
    assert max_diff(final_weights(run), final_weights(tmp_path / "straight")) < 1e-10
