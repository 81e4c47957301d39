"""Data parallel on 2 gloo processes on two torchrun "machines" (``--nnodes=2``, c10d rendezvous on this machine;
one launch runs every plan): the weights after several AdamW steps equal one process's on the same global batch
in float64 (grad_accum > 1, rows with different numbers of scored tokens, global gradient clipping, chunked
training), resuming under DDP equals an uninterrupted DDP run, dropout streams included, only the machine
holding rank 0 writes anything, and machines started with different settings refuse to train."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ssmkit.train import TaskBatchSource, Trainer, latest_checkpoint, read_training_state, resolve_run
from ssmkit.train.checkpoints import RngStates

from .ddp_common import final_weights, max_diff, run_two_nodes, sections

WORKER = __file__.replace("test_ddp.py", "ddp_worker.py")

#: phone-book lookup asks 1 or 2 names per example: rows score different numbers of tokens
PHONEBOOK = {"name": "phonebook", "num_entries": 2, "min_queries": 1, "max_queries": 2, "num_train": 32,
             "num_val": 8, "num_test": 8}
EXACT = sections(task=PHONEBOOK, model={"d_model": 8}, steps=4, batch_size=8, grad_accum=2, lr=2e-2,
                 warmup_steps=1, weight_decay=0.1, grad_clip=0.5, dtype="float64")
CHUNKED = {**EXACT, "train": {**EXACT["train"], "chunk_len": 64}}
#: both ranks train the same rows, each its half of every sequence (data-parallel size 1)
SEQUENCE = {**EXACT, "train": {**EXACT["train"], "sequence_parallel": 2}}
DROPOUT = sections(model={"dropout": 0.2}, steps=4, batch_size=8, grad_accum=2, lr=1e-2, warmup_steps=1,
                   dtype="float64")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Every plan of this module in one launch of 2 ranks on 2 "machines", each with its own output root;
    returns the run directories of the machine that got rank 0 (the other must have written nothing)."""
    root = tmp_path_factory.mktemp("ddp")
    names = ("exact", "chunked", "sequence", "full", "resumed")
    for node in (0, 1):
        d = {k: str(root / f"node{node}" / k) for k in names}
        plan = [{"sections": EXACT, "run_dir": d["exact"]}, {"sections": CHUNKED, "run_dir": d["chunked"]},
                {"sections": SEQUENCE, "run_dir": d["sequence"]},
                {"sections": DROPOUT, "run_dir": d["full"]},
                {"sections": DROPOUT, "run_dir": d["resumed"], "until": 2},
                {"sections": DROPOUT, "run_dir": d["resumed"], "resume": True},
                # the machines started with different settings: every rank refuses (the worker checks it)
                {"sections": {**DROPOUT, "train": {**DROPOUT["train"], "lr": 1e-2 * (1 + node)}},
                 "run_dir": str(root / f"node{node}" / "mismatch"), "expect_error": "another run config"}]
        (root / f"plan{node}.json").write_text(json.dumps(plan), encoding="utf-8")
    results = run_two_nodes([[WORKER, str(root / f"plan{n}.json")] for n in (0, 1)])
    assert [code for code, _ in results] == [0, 0], [err[-3000:] for _, err in results]
    written = [n for n in (0, 1) if (root / f"node{n}").exists()]
    assert len(written) == 1, written
    assert not (root / f"node{written[0]}" / "mismatch").exists()
    return {k: root / f"node{written[0]}" / k for k in names}


@pytest.fixture(scope="module")
def one_process_exact(tmp_path_factory):
    return one_process(EXACT, tmp_path_factory.mktemp("one"))


def one_process(sec, run_dir) -> dict[str, torch.Tensor]:
    trainer = Trainer(resolve_run(sec), run_dir, quiet=True)
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_ranks_score_different_numbers_of_tokens():
    """The test below is sensitive to the loss normalisation: in the batches it trains on, the two ranks' shards
    (rows 0-3 and 4-7) score different numbers of tokens, so a mean of the ranks' means would differ."""
    setup = resolve_run(EXACT)
    source = TaskBatchSource(setup.task, 8, setup.train.seed)
    totals = []
    for _ in range(setup.train.steps):
        scored = (source.next_batch()["labels"] != -100).sum(1)
        totals.append((int(scored[:4].sum()), int(scored[4:].sum())))
    assert sum(a != b for a, b in totals) >= 2, totals


def initial_weights(sec) -> dict[str, torch.Tensor]:
    with RngStates.seeded(sec["train"].get("seed", 0)).active():  # as the Trainer builds its model
        return resolve_run(sec).build_model().state_dict()


def test_ddp_equals_one_process_float64(ddp_runs, one_process_exact):
    ref = one_process_exact
    assert max_diff(final_weights(ddp_runs["exact"]), ref) < 1e-10
    assert max_diff(initial_weights(EXACT), ref) > 1e-3  # the weights moved: the comparison is not vacuous


def test_chunked_ddp_equals_one_process(ddp_runs, one_process_exact):
    assert max_diff(final_weights(ddp_runs["chunked"]), one_process_exact) < 1e-10


def test_sequence_parallel_training_equals_one_process(ddp_runs, one_process_exact):
    """train.sequence_parallel=2 on 2 ranks: every sequence split in halves (rows scoring different numbers of
    tokens in each half), the same AdamW steps as one process."""
    assert max_diff(final_weights(ddp_runs["sequence"]), one_process_exact) < 1e-10


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
