"""Clear failures of data-parallel runs: bad settings give one line before training (no process group is
joined), and a rank that dies makes the job exit nonzero within a bounded time with a clear message, leaving no
torn checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssmkit.cli import main
from ssmkit.distributed import check_global_batch, detect, resolve_backend, shard_rows
from ssmkit.distributed.data_parallel import data_parallel_layout
from ssmkit.train import read_training_state

from .ddp_common import DEADLINE, ENV, sections, set_args, torchrun

ARGS = ["train", *set_args(sections(steps=3, batch_size=8)), "--quiet"]
WORKER_ENV = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9"}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(("extra", "message"), [
    (["--set", "train.batch_size=6", "--set", "train.grad_accum=2"], "multiple of world size 2 x train.grad_accum 2"),
    (["--backend", "mpi"], "backend 'mpi' is unknown; expected one of auto, gloo, nccl"),
    (["--backend", "nccl"], "backend 'nccl' needs CUDA"),
    (["--set", "train.sequence_parallel=3"], "train.sequence_parallel=3 must divide the world size 2"),
])
def test_bad_settings_under_torchrun_fail_before_joining(monkeypatch, capsys, tmp_path, extra, message):
    """As rank 0 of 2 with an unreachable MASTER_PORT: a join would hang, so the error must come first."""
    for k, v in WORKER_ENV.items():
        monkeypatch.setenv(k, v)
    start = time.monotonic()  # (a bounded --dist-timeout: a missed check fails instead of hanging)
    assert main([*ARGS, *extra, "--dist-timeout", "5", "--run-dir", str(tmp_path / "r")]) == 2
    assert message in one_error_line(capsys)
    assert time.monotonic() - start < 30 and not (tmp_path / "r").exists()


def test_other_ranks_stay_silent_on_the_same_error(monkeypatch, capsys, tmp_path):
    for k, v in {**WORKER_ENV, "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    assert main([*ARGS, "--set", "train.batch_size=7", "--dist-timeout", "5", "--run-dir", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("extra", "message"), [
    (["--set", "train.batch_size=6"], "train.batch_size=6 is the global batch and must be a multiple of world size 4"),
    (["--backend", "bogus"], "backend 'bogus' is unknown"),
])
def test_nproc_checks_before_launching(capsys, tmp_path, extra, message):
    assert main([*ARGS, *extra, "--nproc", "4", "--run-dir", str(tmp_path / "r")]) == 2
    assert message in one_error_line(capsys)


def test_sequence_parallel_needs_a_distributed_job(capsys, tmp_path):
    assert main([*ARGS, "--set", "train.sequence_parallel=2", "--run-dir", str(tmp_path / "r")]) == 2
    assert "train.sequence_parallel=2 needs a torchrun job" in one_error_line(capsys)
    # with chunked training too (the combination is allowed; it still needs the job)
    assert main([*ARGS, "--set", "train.sequence_parallel=2", "--set", "train.chunk_len=4",
                 "--run-dir", str(tmp_path / "r")]) == 2
    assert "train.sequence_parallel=2 needs a torchrun job" in one_error_line(capsys)


def test_nproc_under_torchrun_is_refused(monkeypatch, capsys):
    for k, v in WORKER_ENV.items():
        monkeypatch.setenv(k, v)
    assert main([*ARGS, "--nproc", "2"]) == 2
    assert "--nproc starts torchrun itself" in one_error_line(capsys)


def test_environment_and_helpers_name_what_is_wrong():
    assert detect({}).world_size == 1 and not detect({}).distributed
    env = detect({"RANK": "1", "WORLD_SIZE": "3", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert (env.rank, env.world_size, env.is_main) == (1, 3, False)
    with pytest.raises(ValueError, match="WORLD_SIZE missing"):
        detect({"RANK": "0"})
    with pytest.raises(ValueError, match="0 <= RANK < WORLD_SIZE"):
        detect({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    with pytest.raises(ValueError, match="MASTER_ADDR is not set"):
        detect({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="RANK='x' must be an int"):
        detect({"RANK": "x", "WORLD_SIZE": "2"})
    assert resolve_backend("auto") == "gloo" and resolve_backend("auto", "cuda") == "nccl"
    with pytest.raises(ValueError, match="multiple of world size 2 x train.grad_accum 3"):
        check_global_batch(8, 2, 3)
    assert [data_parallel_layout(6, r, 3) for r in (0, 2, 3, 5)] == [(2, 0), (2, 0), (2, 1), (2, 1)]
    with pytest.raises(ValueError, match="train.sequence_parallel=4 must divide the world size 6"):
        data_parallel_layout(6, 0, 4)
    import torch

    batch = {"x": torch.arange(6).reshape(6, 1), "y": torch.arange(6)}
    shards = [shard_rows(batch, r, 3) for r in range(3)]
    assert torch.equal(torch.cat([s["y"] for s in shards]), batch["y"])  # disjoint, contiguous, complete
    with pytest.raises(ValueError, match="cannot be split into 4 equal shards"):
        shard_rows(batch, 0, 4)


def worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=``rank`` among ``launcher``'s children."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children")
    for pid in children.read_text().split() if children.exists() else []:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_dead_rank_stops_the_job_with_a_clear_message(tmp_path):
    run = tmp_path / "run"
    args = ["train", *set_args(sections(steps=1_000_000, batch_size=8, save_every=1)), "--quiet",
            "--dist-timeout", "30", "--run-dir", str(run)]
    proc = subprocess.Popen(torchrun("--standalone", "--nproc_per_node=2", "-m", "ssmkit.cli", *args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + DEADLINE
    try:
        metrics = run / "metrics.jsonl"
        while not metrics.is_file() or metrics.read_text().count('"train"') < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training did not start in time"
            time.sleep(0.2)
        pid = worker_pid(proc.pid, 1)
        assert pid is not None
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)  # no chance to clean up
        out, err = proc.communicate(timeout=90)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and took < 60, (proc.returncode, took)
    assert "rank 0: lost another rank of the job" in err, err[-3000:]
    # every checkpoint left is complete (a save in progress when rank 1 died is never published)
    steps = sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert steps and all(read_training_state(p)[0]["step"] >= 1 for p in steps)
