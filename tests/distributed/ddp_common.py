"""Shared pieces of the data-parallel tests: tiny runs, launching torchrun with a deadline, comparing weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ssmkit.models import load_pretrained
from ssmkit.train import latest_checkpoint

#: environment of launched jobs: one thread per rank, no warnings noise
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
#: seconds any launched job may take before the test fails (a hang fails instead of blocking the suite)
DEADLINE = 240

TINY_TASK = {"name": "mqar", "vocab_size": 32, "seq_len": 16, "num_pairs": 2, "num_train": 64, "num_val": 16,
             "num_test": 16}
TINY_MODEL = {"preset": "mamba", "d_model": 16, "mixer_options": {"mamba": {"d_state": 4}}}
QUIET_TRAIN = {"eval_every": 0, "save_every": 0, "log_every": 1, "eval_batch_size": 16, "plots": False,
               "threads": 1}


def sections(task: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
             **train: Any) -> dict[str, dict[str, Any]]:
    task = task if task and "name" in task else {**TINY_TASK, **(task or {})}
    return {"task": dict(task), "model": {**TINY_MODEL, **(model or {})},
            "train": {**QUIET_TRAIN, **train}}


def set_args(sec: dict[str, dict[str, Any]]) -> list[str]:
    """``--task ... --set key=value`` arguments of ``ssmkit train`` for ``sections``."""
    args = ["--task", sec["task"]["name"], "--model", sec["model"]["preset"]]
    for name in ("task", "model", "train"):
        for k, v in sec[name].items():
            if (name, k) in (("task", "name"), ("model", "preset")):
                continue
            if k == "mixer_options":
                args += ["--set", f"model.mixer_options.mamba.d_state={v['mamba']['d_state']}"]
                continue
            text = "true" if v is True else "false" if v is False else str(v)
            args += ["--set", f"{name}.{k}={text}"]
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def run_job(cmd: list[str], timeout: float = DEADLINE) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def run_two_nodes(node_args: list[list[str]], timeout: float = DEADLINE) -> list[tuple[int, str]]:
    """Two torchrun "machines" on this one (``--nnodes=2``, one process each, c10d rendezvous on a free port);
    ``node_args[n]`` is what node n runs. Returns (exit status, stderr) per node."""
    port = free_port()
    jobs = [subprocess.Popen(torchrun("--nnodes=2", f"--node_rank={n}", "--nproc_per_node=1", "--rdzv_backend=c10d",
                                      f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=ssmkit-test", *args),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
            for n, args in enumerate(node_args)]
    try:
        errs = [job.communicate(timeout=timeout)[1] for job in jobs]
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
    return [(job.returncode, err) for job, err in zip(jobs, errs, strict=True)]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The state dict of the newest checkpoint's model in ``run_dir``."""
    ckpt = latest_checkpoint(Path(run_dir) / "checkpoints")
    assert ckpt is not None, f"no checkpoint in {run_dir}"
    return load_pretrained(ckpt).state_dict()


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
