"""Runs training plans under torchrun for the data-parallel tests (not collected by pytest).

    torchrun --standalone --nproc_per_node 2 tests/distributed/ddp_worker.py PLAN.json

PLAN.json: a list of {"sections": {task, model, train}, "run_dir": str, "until": int | null, "resume": bool,
"expect_error": str | null}; each entry is one ``Trainer(resolve_run(sections), run_dir, resume=resume)
.train(until)`` on every rank, all in one process group (a torchrun launch costs seconds of imports on a busy
machine). With "expect_error", building the Trainer must raise a ValueError containing that text (on every rank),
else the worker fails.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ssmkit.distributed import detect, process_group
from ssmkit.train import Trainer, resolve_run


def main(plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text(encoding="utf-8"))
    with process_group(detect(), "gloo", timeout=60):
        for item in plan:
            setup = resolve_run(item["sections"])
            if item.get("expect_error"):
                try:
                    Trainer(setup, item["run_dir"], quiet=True)
                except ValueError as e:
                    assert item["expect_error"] in str(e), e
                    continue
                raise AssertionError(f"no error {item['expect_error']!r}")
            trainer = Trainer(setup, item["run_dir"], resume=item.get("resume", False), quiet=True)
            trainer.train(item.get("until"))


if __name__ == "__main__":
    main(sys.argv[1])
