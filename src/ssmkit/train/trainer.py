"""The training loop (:class:`Trainer`); its parts live in :mod:`~ssmkit.train.steps` (one optimizer step),
:mod:`~ssmkit.train.evaluation` (validation), :mod:`~ssmkit.train.resume` (checkpoints, exact resume),
:mod:`~ssmkit.train.interrupts` (signals) and :mod:`~ssmkit.train.reporting` (progress bar, report files).

    from ssmkit.train import Trainer, resolve_run
    setup = resolve_run({"task": {"name": "mqar", "seq_len": 64}, "model": {"preset": "mamba"},
                         "train": {"steps": 500}})
    final_metrics = Trainer(setup, "runs/mqar").train()

One optimizer step = one batch from the batch source, split into ``grad_accum`` micro-batches whose losses are
weighted by their share of the scored items, so the gradient equals that of the whole batch. Then gradient
clipping, the scheduled lr, AdamW. Every ``log_every`` steps a training record goes to metrics.jsonl; every
``eval_every`` steps the validation split is evaluated with the task's metrics (and the source's ``on_eval``
is called); every ``save_every`` steps, at the end and on SIGINT/SIGTERM a checkpoint is written atomically.
``Trainer(..., resume=True)`` continues from the newest checkpoint exactly: model, optimizer, schedule, RNG
states and data position.

Self-pretraining (``train.pretrain``, see :mod:`ssmkit.train.pretrain`): the first ``pretrain_steps`` steps train
the backbone on the task's own training inputs with a fresh head, their own AdamW and schedule, and no
validation; then the ``steps`` task steps start with a fresh AdamW and schedule and the batch source rewound to
its start (the data of a from-scratch run). Resume is exact in either phase.

Data parallel: when a ``torch.distributed`` process group is initialised (``torchrun``, see
:mod:`ssmkit.distributed`), every rank draws the same global batch, trains its contiguous shard
(``batch_size / world_size`` rows, in ``grad_accum`` micro-batches) through ``DistributedDataParallel``, and
each micro-batch's mean loss is weighted by ``world_size x`` its share of the global batch's scored items, so the
averaged gradient is the global batch's. Rank 0 alone evaluates and writes the run directory; ranks agree every
step whether a signal asks them to stop, and rank 0 writes the checkpoint (with every rank's RNG stream).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import torch

from ..distributed import data_parallel as dp
from ..distributed.env import current as current_dist
from .activation import enable_activation_checkpointing
from .build import RunSetup
from .checkpoints import RngStates, step_dir_name
from .evaluation import EvaluationMixin, evaluate_model
from .interrupts import SignalsMixin, TrainingInterrupted
from .optim import LRSchedule, build_optimizer
from .pretrain import SelfPretrainer
from .reporting import ReportingMixin
from .resume import ResumeMixin
from .run_dir import CHECKPOINTS, MetricsLog, write_config
from .sources import BatchSource, TaskBatchSource
from .steps import StepsMixin
from .taskio import batch_tokens

__all__ = ["Trainer", "TrainingInterrupted", "evaluate_model"]

log = logging.getLogger("ssmkit.train")


class Trainer(StepsMixin, EvaluationMixin, ResumeMixin, SignalsMixin, ReportingMixin):
    """Train ``setup``'s model on its task, writing everything into ``run_dir``.

    Args:
        setup: the resolved run (see :func:`ssmkit.train.resolve_run`).
        run_dir: output directory (created).
        source: what to train on (default: the task's train split, see :mod:`ssmkit.train.sources`).
        resume: continue from the newest checkpoint in ``run_dir/checkpoints``.
        quiet: no progress bar (it is also off when stderr is not a terminal).

    The run owns its torch/numpy/Python RNG states (:class:`~ssmkit.train.checkpoints.RngStates`, seeded by
    ``train.seed`` and saved in checkpoints): model initialisation, dropout and anything a batch source draws
    from the global generators use them, and the caller's global RNG states are left untouched. Under data
    parallelism that stream (initialisation, batches) is the same on every rank, and forward/backward passes
    (dropout) draw from the rank's own stream, seeded by ``rank_seed(train.seed, rank)``.
    """

    def __init__(self, setup: RunSetup, run_dir: str | Path, *, source: BatchSource | None = None,
                 resume: bool = False, quiet: bool = False) -> None:
        self.setup, self.task, self.cfg = setup, setup.task, setup.train
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / CHECKPOINTS
        self.quiet = quiet
        cfg = self.cfg
        self.dist = current_dist()
        self.is_main = self.dist.is_main
        self.sp = cfg.sequence_parallel
        if self.sp > 1 and not self.dist.distributed:
            raise ValueError(f"train.sequence_parallel={self.sp} needs a torchrun job of a multiple of {self.sp} "
                             f"processes (ssmkit train --nproc {self.sp} ...)")
        self.dp_size, self.dp_rank = dp.data_parallel_layout(self.dist.world_size, self.dist.rank, self.sp)
        if self.dist.distributed:
            dp.check_global_batch(cfg.batch_size, self.dp_size, cfg.grad_accum,
                                  what="world size" if self.sp == 1 else "data-parallel size")
            self._check_same_config()
        if self.sp > 1:
            self._check_sequence_parallel_task()
        if cfg.pretrain != "none" and self.dist.distributed:
            raise ValueError(f"train.pretrain={cfg.pretrain!r} does not support data-parallel (torchrun) training yet; "
                             f"train on one process")
        ckpt, saved, loaded = None, None, {}
        if resume:
            def read() -> tuple[Path, tuple[dict[str, Any], dict[str, torch.Tensor]]]:
                found = self._read_resume()
                with RngStates.seeded(cfg.seed).active():  # loading initialises first: keep the caller's RNG
                    loaded["model"] = self._load_model(found[0])
                return found

            ckpt, saved = dp.run_on_main(read) if self.dist.distributed else read()
        # the run's own RNG states (seeded by cfg.seed); the caller's global RNGs are never changed
        self.rng = RngStates.seeded(cfg.seed)
        with self.rng.active():  # other ranks get rank 0's weights from DistributedDataParallel
            self.model = loaded["model"] if "model" in loaded else setup.build_model()
        self.model.train()
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        # rank r's stream for forward/backward draws (dropout); one process uses self.rng for everything
        self.rank_rng = RngStates.seeded(dp.rank_seed(cfg.seed, self.dist.rank)) if self.dist.distributed else None
        self.sp_group = dp.sequence_parallel_group(self.sp) if self.sp > 1 else None
        self.ddp = None
        if self.dist.distributed:
            from ..distributed.sequence import SequenceParallel

            local = self.model if self.sp_group is None else SequenceParallel(self.model, self.sp_group)
            self.ddp = dp.wrap_model(local)
        self.pretrainer: SelfPretrainer | None = None
        self._enter_phase(0)
        self.source: BatchSource = source if source is not None else TaskBatchSource(
            self.task, cfg.batch_size, cfg.seed, fresh_data=cfg.fresh_data)
        self._initial_source_state = self.source.state_dict()
        self.step = 0
        self.tokens_seen = 0
        self.train_time = 0.0  # seconds spent in training steps (all sessions)
        self.elapsed_before = 0.0  # wall time of earlier sessions
        self.last_eval: dict[str, float] = {}
        self.last_checkpoint: Path | None = None
        self._signal: int | None = None
        self._signal_time = 0.0
        self._stop_agreed = False
        self._session_start = time.perf_counter()
        # everything above only reads; the run directory is created (or changed) from here on, by rank 0 only
        self.metrics: MetricsLog | None = None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.metrics = MetricsLog(self.run_dir)
        if ckpt is not None:
            self._restore(ckpt, *saved)
        elif self.metrics is not None:
            self.metrics.reset()
        if self.is_main:
            write_config(self.run_dir, setup.to_dict())

    def _enter_phase(self, step: int) -> None:
        """The optimizer, schedule and (during self-pretraining) pretrainer of the phase that optimizer step
        ``step + 1`` belongs to: steps < ``pretrain_steps`` self-pretrain the backbone with a fresh head, the
        rest train the task. Each phase starts a fresh AdamW and its own warm-up and decay."""
        cfg = self.cfg
        if step < cfg.pretrain_steps:
            if self.pretrainer is None:
                with self.rng.active():  # the head's initialisation draws from the run's stream
                    self.pretrainer = SelfPretrainer(self.model, cfg.pretrain, cfg.pretrain_mask_rate, cfg.seed)
            self.optimizer = build_optimizer(self.pretrainer.net, cfg)
            self.schedule = LRSchedule(cfg.pretrain_steps, min(cfg.warmup, cfg.pretrain_steps), cfg.schedule,
                                       cfg.min_lr_ratio)
            self.phase_start = 0
            return
        if self.pretrainer is not None and self.is_main:
            log.info("step %d: self-pretraining (%s) done; training the task", step, cfg.pretrain)
        self.pretrainer = None
        self.optimizer = build_optimizer(self.model, cfg)
        self.schedule = LRSchedule.from_config(cfg)
        self.phase_start = cfg.pretrain_steps

    def _check_same_config(self) -> None:
        """Every rank must train the same run (a node started with other settings would silently diverge)."""
        mine = json.dumps(self.setup.to_dict(), sort_keys=True)
        configs = dp.gather_to_main(mine)

        def check() -> None:
            other = [r for r, c in enumerate(configs or []) if c != mine]
            if other:
                raise ValueError(f"rank {other[0]} was started with another run config than rank 0; start every "
                                 f"rank (every node) with the same command")

        dp.run_on_main(check)

    def _check_sequence_parallel_task(self) -> None:
        """One-line errors before training: sequence parallelism needs an lm task whose sequences have at least
        ``sequence_parallel`` tokens; prefix masks are sharded like ``reset`` (unchunked only)."""
        from ..distributed.sequence import shard_bounds

        if self.task.kind != "lm":
            raise ValueError(f"train.sequence_parallel={self.sp} needs a task of kind 'lm' (per-position loss), but "
                             f"task {self.task.name!r} is {self.task.kind!r}")
        sample = next(iter(self.task.batches("train", 1, self.cfg.seed)))
        x = sample["input_ids"] if "input_ids" in sample else sample["inputs"]
        length, chunk = int(x.shape[1]), self.cfg.chunk_len
        if "prefix_mask" in sample and chunk is not None:
            raise ValueError(f"train.sequence_parallel={self.sp} with train.chunk_len: task {self.task.name!r} has "
                             f"prefix masks, which chunked sequence parallelism does not carry; drop train.chunk_len")
        try:
            shard_bounds(length, self.sp)
        except ValueError as e:
            raise ValueError(f"train.sequence_parallel={self.sp}: {e}") from None
        if chunk is not None and 0 < length % chunk < self.sp:  # every chunk is itself split over the ranks
            raise ValueError(f"train.chunk_len={chunk} leaves a last chunk of {length % chunk} of the task's "
                             f"{length} positions, fewer than train.sequence_parallel={self.sp}; choose a chunk_len "
                             f"that divides {length} or leaves at least {self.sp}")

    # ------------------------------------------------------------------------------------------ loop
    def train(self, until: int | None = None) -> dict[str, float]:
        """Train to ``cfg.total_steps`` (or stop after step ``until``, saving a checkpoint); returns the last
        validation metrics. Raises :class:`TrainingInterrupted` after SIGINT/SIGTERM (checkpoint saved).
        The run's RNG states are in place for the whole loop (see :class:`RngStates`)."""
        with self.rng.active():
            return self._train(until)

    def _train(self, until: int | None) -> dict[str, float]:
        cfg = self.cfg
        total = cfg.total_steps
        target = total if until is None else min(until, total)
        old_handlers = self._install_signals()
        old_threads = torch.get_num_threads()
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        bar = self._progress_bar()
        self.model.train()
        window_loss, window_n, window_tokens, window_time = 0.0, 0, 0, 0.0
        stack = contextlib.ExitStack()
        try:
            if bar is not None:  # log lines go through tqdm.write so they do not break the bar
                from tqdm.contrib.logging import logging_redirect_tqdm

                stack.enter_context(logging_redirect_tqdm(loggers=[logging.getLogger("ssmkit")]))
            while self.step < target:
                t0 = time.perf_counter()
                batch = self.source.next_batch()
                if self.pretrainer is not None:
                    batch = self.pretrainer.prepare(batch, self.step)
                loss, grad_norm = self.train_step(batch)
                dt = time.perf_counter() - t0
                tokens = batch_tokens(batch)
                self.step += 1
                self.tokens_seen += tokens
                self.train_time += dt
                window_loss, window_n = window_loss + loss, window_n + 1
                window_tokens, window_time = window_tokens + tokens, window_time + dt
                if self.metrics is not None and (self.step % cfg.log_every == 0 or self.step == total
                                                 or self.step == cfg.pretrain_steps):
                    split = "pretrain" if self.pretrainer is not None else "train"
                    rec = {"step": self.step, "split": split, "loss": window_loss / window_n,
                           "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                           "tokens_per_s": window_tokens / max(window_time, 1e-9), "tokens": self.tokens_seen,
                           "elapsed": self.elapsed()}
                    self.metrics.append(rec)
                    if bar is None:
                        log.info("step %d/%d  %s loss %.4f  lr %.2e  %.0f tok/s", self.step, total, split,
                                 rec["loss"], rec["lr"], rec["tokens_per_s"])
                    window_loss, window_n, window_tokens, window_time = 0.0, 0, 0, 0.0
                if bar is not None:
                    bar.update(1)
                    post = {"loss": f"{loss:.4f}"}
                    if self.task.metric in self.last_eval:
                        post[f"val_{self.task.metric}"] = f"{self.last_eval[self.task.metric]:.4f}"
                    bar.set_postfix(post, refresh=False)
                if self.pretrainer is not None and self.step == cfg.pretrain_steps:
                    self._enter_phase(self.step)
                    self.source.load_state_dict(self._initial_source_state)  # the task sees a from-scratch run's data
                if (cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < total
                        and self.step > cfg.pretrain_steps):
                    self._eval_and_log()
                    self.write_outputs(plots=False)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < total:
                    self.save_checkpoint()
                    self.write_outputs()
                if self._stop_agreed if self.ddp is not None else self._signal is not None:
                    path = self.save_checkpoint()
                    self.write_outputs(interrupted=True)
                    raise TrainingInterrupted(self._signal or signal.SIGTERM, self.step, path)
            if self.step < total:  # stopped early on purpose (until)
                self.save_checkpoint()
                self.write_outputs(interrupted=True)
                return self.last_eval
            if self._agreed(lambda: not self._evaluated_at(self.step)):
                self._eval_and_log()
            if self.last_checkpoint is None or self.last_checkpoint.name != step_dir_name(self.step):
                self.save_checkpoint()
            self.write_outputs()
            return self.last_eval
        finally:
            stack.close()
            if bar is not None:
                bar.close()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            torch.set_num_threads(old_threads)
            self._signal, self._stop_agreed = None, False
