"""The run directory's human-readable outputs: the progress bar, metrics.csv, plots and report.md."""

from __future__ import annotations

import logging
import sys
from typing import Any

from .run_dir import peak_rss_bytes, write_plots, write_report

log = logging.getLogger("ssmkit.train")


class ReportingMixin:
    """The :class:`~ssmkit.train.Trainer`'s progress bar and report files."""

    def _progress_bar(self):
        if self.quiet or not self.is_main or not sys.stderr.isatty():
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.total_steps, initial=self.step, unit="step",
                    desc=f"{self.task.name}/{self.setup.model.preset}")

    def report_info(self, interrupted: bool = False) -> dict[str, Any]:
        task, spec = self.task, self.setup.model
        return {
            "task": task.name, "task_params": task.params.to_dict(), "kind": task.kind, "metric": task.metric,
            "higher_is_better": task.higher_is_better, "chance": task.chance_level, "preset": spec.preset,
            "head": spec.head, "model_summary": self.model.summary(),
            "parameters": self.model.num_parameters(), "steps": self.cfg.total_steps, "steps_done": self.step,
            "batch_size": self.cfg.batch_size, "lr": self.cfg.lr,
            "final": self.last_eval, "wall_time": self.elapsed(),
            "tokens_per_s": self.tokens_seen / max(self.train_time, 1e-9), "peak_rss_bytes": peak_rss_bytes(),
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "interrupted": interrupted, "world_size": self.dist.world_size,
        }

    def write_outputs(self, interrupted: bool = False, plots: bool = True) -> None:
        """metrics.csv, report.md and (with ``plots``) loss.png / metric.png from the current state (rank 0)."""
        if self.metrics is None:
            return
        self.metrics.write_csv()
        if plots and self.cfg.plots:
            title = f"{self.task.name} / {self.setup.model.preset}"
            try:
                write_plots(self.run_dir, self.metrics, self.task.metric, self.task.chance_level, title)
            except Exception as e:  # noqa: BLE001 - a plotting failure must not lose a training run
                log.warning("could not write plots: %s: %s", type(e).__name__, e)
        write_report(self.run_dir, self.report_info(interrupted))
