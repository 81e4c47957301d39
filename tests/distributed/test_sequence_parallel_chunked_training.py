"""The trainer with ``train.sequence_parallel=2`` on 2 gloo ranks (one torchrun launch, bounded by a deadline):

- with ``train.chunk_len``: each micro-batch's sequences run chunk by chunk, every chunk split over the 2 ranks, and
  after N AdamW steps the weights, and the logged losses and gradient norms, equal one unchunked process's in float64;
- unchunked, on a PrefixLM task whose prefix masks cross the shard boundary: the same, against one process;
- chunked with prefix masks: refused before training (one line)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ssmkit.train import TaskBatchSource, Trainer, resolve_run
from ssmkit.train.checkpoints import RngStates

from .ddp_common import final_weights, max_diff, run_job, sections, torchrun
from .ddp_worker import PREFIX_SEQ_LEN, prefix_run

WORKER = str(Path(__file__).with_name("ddp_worker.py"))
#: phone-book lookups of 1 or 2 names: rows (and so the micro-batches) score different numbers of tokens
PHONEBOOK = {"name": "phonebook", "num_entries": 2, "min_queries": 1, "max_queries": 2, "num_train": 16,
             "num_val": 4, "num_test": 4}
ONE = sections(task=PHONEBOOK, model={"d_model": 8}, steps=2, batch_size=4, grad_accum=2, lr=2e-2, warmup_steps=1,
               weight_decay=0.1, grad_clip=0.5, dtype="float64")
#: 278-position sequences: chunks of 100, 100 and 78 positions, each split 50/50 (39/39) over the ranks
CHUNK_LEN = 100
SP_CHUNKED = {**ONE, "train": {**ONE["train"], "sequence_parallel": 2, "chunk_len": CHUNK_LEN}}
TOL = 1e-10
PREFIX_ONE = {"steps": 2, "batch_size": 4, "grad_accum": 2, "lr": 2e-2, "warmup_steps": 1, "weight_decay": 0.1,
              "grad_clip": 0.5, "dtype": "float64"}
PREFIX_SP = {**PREFIX_ONE, "sequence_parallel": 2}
WORDS = ("alpha", "beta", "gamma", "delta", "sun", "moon", "river", "stone", "tree", "wind")


def _train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spchunk")
    text = root / "words.txt"
    text.write_text(" ".join(np.random.default_rng(0).choice(WORDS, 3000)), encoding="utf-8")
    plan = root / "plan.json"
    refused = {"text": str(text), "train": {**PREFIX_SP, "chunk_len": 48}}
    plan.write_text(json.dumps([
        {"sections": SP_CHUNKED, "run_dir": str(root / "sp")},
        {"prefix_run": {"text": str(text), "train": PREFIX_SP}, "run_dir": str(root / "prefix_sp")},
        {"prefix_run": refused, "run_dir": str(root / "refused"), "expect_error": "chunked sequence parallelism"},
    ]), encoding="utf-8")
    job = run_job(torchrun("--standalone", "--nproc_per_node=2", WORKER, str(plan)), timeout=150)
    assert job.returncode == 0, job.stderr[-3000:]
    Trainer(resolve_run(ONE), root / "one", quiet=True).train()
    setup, source = prefix_run(str(text), PREFIX_ONE)
    Trainer(setup, root / "prefix_one", source=source, quiet=True).train()
    return {"sp": root / "sp", "one": root / "one", "prefix_sp": root / "prefix_sp",
            "prefix_one": root / "prefix_one", "text": text}


def test_setup_is_sensitive_to_the_weighting():
    """Each step's two micro-batches score different numbers of tokens (a mean of their means would differ),
    and the sequences make a short last chunk."""
    setup = resolve_run(SP_CHUNKED)
    source = TaskBatchSource(setup.task, 4, setup.train.seed)
    for _ in range(setup.train.steps):
        batch = source.next_batch()
        scored = (batch["labels"] != -100).sum(1)
        assert int(scored[:2].sum()) != int(scored[2:].sum()), scored
        assert batch["input_ids"].shape[1] % CHUNK_LEN != 0, batch["input_ids"].shape


def test_sequence_parallel_chunked_equals_one_process(runs):
    got, want = final_weights(runs["sp"]), final_weights(runs["one"])
    assert max_diff(got, want) < TOL
    with RngStates.seeded(0).active():  # the Trainer's initial weights: the steps moved them
        start = resolve_run(ONE).build_model().state_dict()
    assert max_diff(start, want) > 1e-3


def test_logged_metrics_match(runs):
    got, want = _train_records(runs["sp"]), _train_records(runs["one"])
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "grad_norm"):
            assert abs(g[key] - w[key]) <= TOL * max(1.0, abs(w[key])), (key, g[key], w[key])


def test_prefix_masks_cross_the_shard_boundary(runs):
    """The PrefixLM run's batches have prefixes running across position 48 (where rank 1's half starts), and
    micro-batches scoring different numbers of tokens."""
    _, source = prefix_run(str(runs["text"]), PREFIX_ONE)
    crossing, uneven = 0, 0
    for _ in range(PREFIX_ONE["steps"]):
        b = source.next_batch()
        assert b["prefix_mask"].shape[1] == PREFIX_SEQ_LEN
        half = PREFIX_SEQ_LEN // 2
        crossing += int((b["prefix_mask"][:, half - 1] & b["prefix_mask"][:, half] & ~b["reset"][:, half]).sum())
        scored = (b["labels"] != -100).sum(1)
        uneven += int(scored[:2].sum()) != int(scored[2:].sum())
    assert crossing >= 2 and uneven >= 1, (crossing, uneven)


def test_sequence_parallel_prefix_lm_equals_one_process(runs):
    got, want = final_weights(runs["prefix_sp"]), final_weights(runs["prefix_one"])
    assert max_diff(got, want) < TOL
    g, w = _train_records(runs["prefix_sp"]), _train_records(runs["prefix_one"])
    assert [r["step"] for r in g] == [r["step"] for r in w] == [1, 2]
    for a, b in zip(g, w, strict=True):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= TOL * max(1.0, abs(b[key])), (key, a[key], b[key])
    setup, _ = prefix_run(str(runs["text"]), PREFIX_ONE)
    with RngStates.seeded(0).active():  # the Trainer's initial weights: the steps moved them
        start = setup.build_model().state_dict()
    assert max_diff(start, want) > 1e-3
