"""Runs training plans under torchrun for the data-parallel tests (not collected by pytest).

    torchrun --standalone --nproc_per_node 2 tests/distributed/ddp_worker.py PLAN.json

PLAN.json: a list of {"sections": {task, model, train}, "run_dir": str, "until": int | null, "resume": bool,
"expect_error": str | null}; each entry is one ``Trainer(resolve_run(sections), run_dir, resume=resume)
.train(until)`` on every rank, all in one process group (a torchrun launch costs seconds of imports on a busy
machine). With "expect_error", building the Trainer must raise a ValueError containing that text (on every rank),
else the worker fails. An entry with "prefix_run": {"text": path, "train": {...}} instead of "sections" trains the
PrefixLM run of :func:`prefix_run` (batches with prefix masks).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ssmkit.distributed import detect, process_group
from ssmkit.objectives import MixtureBatchSource, make_mixture, make_objective
from ssmkit.objectives.text_task import ObjectiveText
from ssmkit.train import Trainer, resolve_run
from ssmkit.train.build import RunSetup
from ssmkit.train.config import TrainConfig
from ssmkit.train.presets import resolve_model

#: PrefixLM rows of 96 positions: prefix-LM pairs (prefixes of 30-67 tokens, often across the middle) and infilling
PREFIX_SEQ_LEN = 96


def prefix_run(text: str, train: dict[str, Any]) -> tuple[RunSetup, MixtureBatchSource]:
    """A tiny PrefixLM (2 Mamba layers, the first prefix-bidirectional) trained on objective rows over the text
    file ``text``, and its batch source: input_ids, labels, reset and prefix_mask (batch, 96)."""
    task = ObjectiveText(path=text, seq_len=PREFIX_SEQ_LEN, val_fraction=0.2)
    model = resolve_model({"head": "PrefixLM", "pattern": "mamba*2", "d_model": 8,
                           "mixer_options": {"mamba": {"d_state": 4}}}, task)
    cfg = TrainConfig.from_dict({"eval_every": 0, "save_every": 0, "log_every": 1, "eval_batches": 1,
                                 "eval_batch_size": 4, "plots": False, "threads": 1, **train})
    arms = [make_objective({"family": "prefix_lm", "lengths": [40, 90]}, task.vocab),
            make_objective({"family": "infilling", "lengths": [30, 60], "mask_rate": 0.3, "mean_span": 4},
                           task.vocab)]
    source = MixtureBatchSource(task.split_tokens("train"), make_mixture("fixed", arms), batch_size=cfg.batch_size,
                                seq_len=PREFIX_SEQ_LEN, pad_id=task.pad_id, seed=cfg.seed,
                                val_tokens=task.split_tokens("val"))
    return RunSetup(task=task, model=model, train=cfg), source


def main(plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text(encoding="utf-8"))
    with process_group(detect(), "gloo", timeout=60):
        for item in plan:
            setup, source = prefix_run(**item["prefix_run"]) if "prefix_run" in item else \
                (resolve_run(item["sections"]), None)
            if item.get("expect_error"):
                try:
                    Trainer(setup, item["run_dir"], source=source, quiet=True)
                except ValueError as e:
                    assert item["expect_error"] in str(e), e
                    continue
                raise AssertionError(f"no error {item['expect_error']!r}")
            trainer = Trainer(setup, item["run_dir"], source=source, resume=item.get("resume", False), quiet=True)
            trainer.train(item.get("until"))


if __name__ == "__main__":
    main(sys.argv[1])
