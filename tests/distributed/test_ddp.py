"""Data parallel on 2 gloo processes (one torchrun launch runs every plan): the weights after several AdamW steps
equal one process's on the same global batch in float64 (grad_accum > 1, rows with different numbers of scored
tokens, global gradient clipping, chunked training), and resuming under DDP equals an uninterrupted DDP run,
dropout streams included."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ssmkit.train import Trainer, latest_checkpoint, read_training_state, resolve_run
from ssmkit.train.checkpoints import RngStates

from .ddp_common import final_weights, max_diff, run_job, sections, torchrun

WORKER = __file__.replace("test_ddp.py", "ddp_worker.py")

#: phone-book lookup asks 1 or 2 names per example: rows score different numbers of tokens
PHONEBOOK = {"name": "phonebook", "num_entries": 2, "min_queries": 1, "max_queries": 2, "num_train": 32,
             "num_val": 8, "num_test": 8}
EXACT = sections(task=PHONEBOOK, model={"d_model": 8}, steps=4, batch_size=8, grad_accum=2, lr=2e-2,
                 warmup_steps=1, weight_decay=0.1, grad_clip=0.5, dtype="float64")
CHUNKED = {**EXACT, "train": {**EXACT["train"], "chunk_len": 64}}
DROPOUT = sections(model={"dropout": 0.2}, steps=4, batch_size=8, grad_accum=2, lr=1e-2, warmup_steps=1,
                   dtype="float64")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Every plan of this module in one torchrun launch of 2 ranks; returns the run directories."""
    root = tmp_path_factory.mktemp("ddp")
    dirs = {k: root / k for k in ("exact", "chunked", "full", "resumed")}
    plan = [{"sections": EXACT, "run_dir": str(dirs["exact"])},
            {"sections": CHUNKED, "run_dir": str(dirs["chunked"])},
            {"sections": DROPOUT, "run_dir": str(dirs["full"])},
            {"sections": DROPOUT, "run_dir": str(dirs["resumed"]), "until": 2},
            {"sections": DROPOUT, "run_dir": str(dirs["resumed"]), "resume": True}]
    (root / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    proc = run_job(torchrun("--standalone", "--nproc_per_node=2", WORKER, str(root / "plan.json")))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dirs


def one_process(sec, run_dir) -> dict[str, torch.Tensor]:
    trainer = Trainer(resolve_run(sec), run_dir, quiet=True)
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_rows_score_different_numbers_of_tokens():
    task = resolve_run(EXACT).task
    batch = next(iter(task.batches("train", 8, 0)))
    counts = (batch["labels"] != -100).sum(1)
    assert len(set(counts[:4].tolist())) > 1 or counts[:4].sum() != counts[4:].sum()


def initial_weights(sec) -> dict[str, torch.Tensor]:
    with RngStates.seeded(sec["train"].get("seed", 0)).active():  # as the Trainer builds its model
        return resolve_run(sec).build_model().state_dict()


def test_ddp_equals_one_process_float64(ddp_runs, tmp_path):
    ref = one_process(EXACT, tmp_path / "one")
    assert max_diff(final_weights(ddp_runs["exact"]), ref) < 1e-10
    assert max_diff(initial_weights(EXACT), ref) > 1e-3  # the weights moved: the comparison is not vacuous


def test_chunked_ddp_equals_one_process(ddp_runs, tmp_path):
    ref = one_process(EXACT, tmp_path / "one")
    assert max_diff(final_weights(ddp_runs["chunked"]), ref) < 1e-10


def test_resume_under_ddp_equals_uninterrupted(ddp_runs):
    full, resumed = final_weights(ddp_runs["full"]), final_weights(ddp_runs["resumed"])
    assert max_diff(full, resumed) == 0.0
    meta, _ = read_training_state(latest_checkpoint(ddp_runs["resumed"] / "checkpoints"))
    assert meta["step"] == 4 and meta["world_size"] == 2
    streams = [s["tensors"]["rng.torch"] for s in meta["rank_rng"]]
    assert len(streams) == 2 and not torch.equal(streams[0], streams[1])  # each rank its own dropout stream


def test_ddp_with_dropout_differs_from_one_process(ddp_runs, tmp_path):
    """Rank 1 draws its own dropout masks: DDP with dropout is not the one-process run (the RNG streams are
    per rank), while the same seed and world size repeat exactly (previous test)."""
    ref = one_process(DROPOUT, tmp_path / "one")
    assert max_diff(final_weights(ddp_runs["full"]), ref) > 1e-8


def test_only_rank_0_wrote(ddp_runs):
    run = ddp_runs["exact"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]  # one record per step
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000004"]
    assert load_file(latest_checkpoint(run / "checkpoints") / "model.safetensors")
