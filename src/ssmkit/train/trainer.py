"""The training loop.

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

Data parallel: when a ``torch.distributed`` process group is initialised (``torchrun``, see
:mod:`ssmkit.distributed`), every rank draws the same global batch, trains its contiguous shard
(``batch_size / world_size`` rows, in ``grad_accum`` micro-batches) through ``DistributedDataParallel``, and
each micro-batch's mean loss is weighted by ``world_size x`` its share of the global batch's scored items, so the
averaged gradient is the global batch's. Rank 0 alone evaluates and writes the run directory; ranks agree every
step whether a signal asks them to stop, and rank 0 writes the checkpoint (with every rank's RNG stream).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ..data import Task
from ..distributed import data_parallel as dp
from ..distributed.env import current as current_dist
from ..models import SequenceModel, load_pretrained
from .activation import enable_activation_checkpointing
from .build import RunSetup
from .checkpoints import (
    ResumeError,
    RngStates,
    latest_checkpoint,
    optimizer_from_flat,
    read_training_state,
    save_training_checkpoint,
    step_dir_name,
)
from .optim import LRSchedule, build_optimizer, clip_gradients
from .run_dir import CHECKPOINTS, MetricsLog, peak_rss_bytes, write_config, write_plots, write_report
from .sources import BatchSource, TaskBatchSource
from .taskio import (
    autocast_context,
    batch_tokens,
    batch_weight,
    model_outputs,
    split_batch,
    task_loss,
)

log = logging.getLogger("ssmkit.train")


class TrainingInterrupted(Exception):
    """Raised by :meth:`Trainer.train` after a SIGINT/SIGTERM, once the checkpoint is saved."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped at step {step}; checkpoint saved to {checkpoint}")


@torch.no_grad()
def evaluate_model(model: SequenceModel, task: Task, split: str = "val", batch_size: int = 64,
                   max_batches: int = 0, autocast: str = "none") -> dict[str, float]:
    """The task's metrics of ``model`` on ``split`` (at most ``max_batches`` batches; 0 = all), in eval mode.
    Uses no global RNG; the model's training mode is restored."""
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 0:
        raise ValueError(f"max_batches must be an int >= 0 (0 = all), got {max_batches!r}")
    was_training = model.training
    model.eval()
    ev = task.evaluator()
    try:
        for i, batch in enumerate(task.batches(split, batch_size, 0)):
            if max_batches and i >= max_batches:
                break
            with autocast_context(autocast):
                ev.update(model_outputs(model, task, batch), batch)
    finally:
        model.train(was_training)
    return ev.compute()


class Trainer:
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
        self.optimizer = build_optimizer(self.model, cfg)
        self.schedule = LRSchedule.from_config(cfg)
        self.source: BatchSource = source if source is not None else TaskBatchSource(
            self.task, cfg.batch_size, cfg.seed, fresh_data=cfg.fresh_data)
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
        """One-line errors before training: sequence parallelism needs an lm task without prefix masks whose
        sequences have at least ``sequence_parallel`` tokens."""
        from ..distributed.sequence import shard_bounds

        if self.task.kind != "lm":
            raise ValueError(f"train.sequence_parallel={self.sp} needs a task of kind 'lm' (per-position loss), but "
                             f"task {self.task.name!r} is {self.task.kind!r}")
        sample = next(iter(self.task.batches("train", 1, self.cfg.seed)))
        if "prefix_mask" in sample:
            raise ValueError(f"train.sequence_parallel={self.sp}: task {self.task.name!r} has prefix masks, which "
                             f"sequence parallelism does not support yet")
        x = sample["input_ids"] if "input_ids" in sample else sample["inputs"]
        try:
            shard_bounds(int(x.shape[1]), self.sp)
        except ValueError as e:
            raise ValueError(f"train.sequence_parallel={self.sp}: {e}") from None

    # ------------------------------------------------------------------------------------------ resume
    def _read_resume(self) -> tuple[Path, tuple[dict[str, Any], dict[str, torch.Tensor]]]:
        ckpt = latest_checkpoint(self.ckpt_root)
        if ckpt is None:
            raise ResumeError(f"--resume: no checkpoint in {self.ckpt_root}")
        saved = read_training_state(ckpt)
        if int(saved[0]["step"]) > self.cfg.steps:
            raise ResumeError(f"train.steps={self.cfg.steps} is below the checkpoint's step {saved[0]['step']} "
                              f"({ckpt}); resume with train.steps >= {saved[0]['step']}")
        return ckpt, saved

    def _load_model(self, ckpt: Path) -> SequenceModel:
        model = load_pretrained(ckpt)
        spec = self.setup.model
        if model.config.to_dict() != spec.config.to_dict() or type(model).__name__ != spec.head:
            raise ResumeError(f"{ckpt}: the checkpoint's model ({type(model).__name__}) differs from the "
                              f"run's model config; resume with the run's own config")
        return model

    def _restore(self, ckpt: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        saved = meta.get("config", {})
        now = self.setup.to_dict()
        # task parameters added since the checkpoint was written count as their defaults
        defaults = {f.name: f.default for f in dataclasses.fields(self.task.Params)
                    if f.default is not dataclasses.MISSING}
        saved = {**saved, "task": {**{k: v for k, v in defaults.items() if k in now["task"]},
                                   **(saved.get("task") or {})}}
        for section in ("task", "model"):
            if saved.get(section) != now[section]:
                raise ResumeError(f"{ckpt}: the checkpoint was trained with another {section} config "
                                  f"({saved.get(section)}); cannot resume with {now[section]}")
        changed = [k for k in now["train"] if saved.get("train", {}).get(k) != now["train"][k]]
        if changed and self.is_main:
            log.warning("resuming with changed train settings: %s", ", ".join(
                f"{k}: {saved.get('train', {}).get(k)!r} -> {now['train'][k]!r}" for k in changed))
        optimizer_from_flat(self.optimizer, tensors, meta["optimizer"])
        self.source.load_state_dict(meta["source"])
        self.step = int(meta["step"])
        self.tokens_seen = int(meta["tokens_seen"])
        self.train_time = float(meta["train_time"])
        self.elapsed_before = float(meta["elapsed"])
        self.last_eval = dict(meta.get("last_eval") or {})
        if self.metrics is not None:
            self.metrics.truncate_after(self.step)
        self.rng = RngStates.from_checkpoint(tensors, meta["rng"])
        if self.rank_rng is not None:
            self._restore_rank_rng(meta)
        self.last_checkpoint = ckpt
        if self.is_main:
            log.info("resumed from %s at step %d", ckpt, self.step)

    def _restore_rank_rng(self, meta: dict[str, Any]) -> None:
        """This rank's own RNG stream from a data-parallel checkpoint of the same world size; otherwise (another
        world size, or a one-process checkpoint) a fresh stream derived from the seed, rank and step."""
        saved = meta.get("rank_rng") or []
        rank, world = self.dist.rank, self.dist.world_size
        if len(saved) == world:
            self.rank_rng = RngStates.from_checkpoint(saved[rank]["tensors"], saved[rank]["meta"])
            return
        self.rank_rng = RngStates.seeded(dp.rank_seed(self.cfg.seed + self.step, rank))
        if self.is_main:
            log.warning("the checkpoint was written by %s; each of the %d ranks starts a new RNG stream (dropout "
                        "draws differ from an uninterrupted run)",
                        f"world size {len(saved)}" if saved else "one process", world)

    # ------------------------------------------------------------------------------------------ checkpoints
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self._session_start

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current step (atomic) and return its directory. Under data parallelism
        every rank calls it: rank 0 gathers the ranks' RNG streams and writes; all ranks get the path."""
        if self.rank_rng is None:
            self.last_checkpoint = self._write_checkpoint(None)
        else:
            streams = dp.gather_to_main(self.rank_rng.current().to_checkpoint())
            self.last_checkpoint = dp.run_on_main(lambda: self._write_checkpoint(streams))
        if self.is_main:
            log.info("checkpoint: %s", self.last_checkpoint)
        return self.last_checkpoint

    def _write_checkpoint(self, rank_streams: list[Any] | None) -> Path:
        state = {"steps": self.cfg.steps, "source": self.source.state_dict(), "tokens_seen": self.tokens_seen,
                 "train_time": self.train_time, "elapsed": self.elapsed(), "last_eval": self.last_eval,
                 "schedule": {"kind": self.schedule.kind, "total_steps": self.schedule.total_steps,
                              "warmup_steps": self.schedule.warmup_steps,
                              "min_ratio": self.schedule.min_ratio, "next_step": self.step},
                 "config": self.setup.to_dict(), "world_size": self.dist.world_size}
        if rank_streams is not None:
            state["rank_rng"] = [{"tensors": t, "meta": m} for t, m in rank_streams]
        return save_training_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, state,
                                        rng=self.rng.current(), keep=self.cfg.keep_checkpoints)

    # ------------------------------------------------------------------------------------------ steps
    def accumulate_gradients(self, batch: dict[str, torch.Tensor]) -> float:
        """Forward and backward of ``batch`` in ``grad_accum`` micro-batches, each weighted by its share of
        the scored items, so the accumulated ``.grad`` equals the whole batch's; returns the batch loss.

        Data parallel: ``batch`` is the global batch; this rank trains its shard (:func:`shard_rows`), its
        micro-batches weighted by ``world_size x`` their share of the global batch's scored items (DDP averages
        over the ranks), and the return value is this rank's part of the global loss (the ranks' parts sum to
        it). With ``train.sequence_parallel=P`` each group of P consecutive ranks shares a row shard and each
        rank trains its contiguous piece of every sequence (:class:`~ssmkit.distributed.sequence.SequenceParallel`);
        the weights are the same, counted on the piece."""
        cfg = self.cfg
        world = self.dist.world_size
        total = batch_weight(self.task, batch)
        shard = dp.shard_rows(batch, self.dp_rank, self.dp_size) if self.ddp is not None else batch
        micro = split_batch(shard, cfg.grad_accum)
        loss_value = 0.0
        for i, mb in enumerate(micro):
            if self.sp_group is not None:  # this rank's contiguous piece of every sequence
                from ..distributed.sequence import shard_sequence

                mb = {k: shard_sequence(v, self.sp_group) for k, v in mb.items()}
            weight = batch_weight(self.task, mb)
            share = weight / total if total > 0 else 1.0 / (len(micro) * world)
            scale = share * world
            sync = self.ddp is None or i == len(micro) - 1 or cfg.chunk_len is not None
            with autocast_context(cfg.autocast), self._rank_stream(), \
                    (contextlib.nullcontext() if sync else self.ddp.no_sync()):
                if cfg.chunk_len is not None:
                    loss_value += share * self._chunked(mb, scale)
                    continue
                outputs = model_outputs(self.model, self.task, mb, forward=self.ddp)
                if self.sp_group is not None and weight == 0:  # a piece with nothing scored still joins backward
                    loss = outputs.sum() * 0.0
                else:
                    loss = task_loss(self.task, outputs, mb)
                (loss * scale).backward()
            loss_value += share * float(loss.detach())
        if self.ddp is not None and cfg.chunk_len is not None:  # chunked passes bypass the DDP wrapper
            dp.average_gradients(self.model.parameters())
        return loss_value

    def _rank_stream(self):
        """This rank's own RNG stream (data parallel), else a no-op (the run's stream is already active)."""
        return self.rank_rng.active() if self.rank_rng is not None else contextlib.nullcontext()

    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
        """One optimizer step on ``batch``: returns (batch loss, gradient norm before clipping). Data parallel:
        the ranks also agree here whether any of them received a stop signal (:attr:`_stop_agreed`)."""
        with self.rng.active():  # dropout draws from the run's RNG (a no-op inside train())
            loss_value = self.accumulate_gradients(batch)
        if self.ddp is not None:
            loss_value, stops = dp.sum_over_ranks([loss_value, float(self._signal is not None)])
            self._stop_agreed = stops > 0
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"non-finite training loss ({loss_value}) at step {self.step + 1}; "
                                     f"try a lower train.lr (now {self.cfg.lr}) or train.grad_clip")
        grad_norm = clip_gradients(self.model, self.cfg.grad_clip)
        self.schedule.apply(self.optimizer, self.step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm

    def _chunked(self, batch: dict[str, torch.Tensor], scale: float) -> float:
        try:
            from .chunked import chunked_loss_backward
        except ImportError as e:
            raise RuntimeError(f"train.chunk_len is set but chunked training is unavailable "
                               f"(ssmkit.train.chunked: {e})") from e
        stats = chunked_loss_backward(self.model, batch, self.cfg.chunk_len, loss_scale=scale)
        return float(stats["loss"])

    def evaluate(self, split: str = "val") -> dict[str, float]:
        bs = self.cfg.eval_batch_size or self.cfg.batch_size
        return evaluate_model(self.model, self.task, split, bs, self.cfg.eval_batches, self.cfg.autocast)

    def _eval_and_log(self) -> dict[str, float]:
        """Evaluate on the validation split (rank 0 only; every rank gets the metrics and calls ``on_eval``)."""
        t = time.perf_counter()
        metrics = self._agreed(lambda: self.evaluate("val"))
        self.last_eval = metrics
        hook = getattr(self.source, "on_eval", None)
        if callable(hook):
            hook(self.step, metrics)
        if self.metrics is None:
            return metrics
        self.metrics.append({"step": self.step, "split": "val", **metrics,
                             "eval_time": time.perf_counter() - t})
        m = self.task.metric
        log.info("step %d/%d  val %s %.4f%s", self.step, self.cfg.steps, m, metrics.get(m, math.nan),
                 f"  loss {metrics['loss']:.4f}" if "loss" in metrics and m != "loss" else "")
        return metrics

    # ------------------------------------------------------------------------------------------ signals
    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)
        return old

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal is not None and self.ddp is not None and time.monotonic() - self._signal_time < 5.0:
            return  # Ctrl-C in a terminal reaches a worker twice: directly and forwarded by torchrun
        if self._signal is not None:  # a second signal: stop now
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self._signal, self._signal_time = signum, time.monotonic()
        if not self.is_main:
            return
        log.warning("%s received: saving a checkpoint after this step (send again to stop immediately)",
                    signal.Signals(signum).name)

    # ------------------------------------------------------------------------------------------ loop
    def train(self, until: int | None = None) -> dict[str, float]:
        """Train to ``cfg.steps`` (or stop after step ``until``, saving a checkpoint); returns the last
        validation metrics. Raises :class:`TrainingInterrupted` after SIGINT/SIGTERM (checkpoint saved).
        The run's RNG states are in place for the whole loop (see :class:`RngStates`)."""
        with self.rng.active():
            return self._train(until)

    def _train(self, until: int | None) -> dict[str, float]:
        cfg = self.cfg
        target = cfg.steps if until is None else min(until, cfg.steps)
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
                loss, grad_norm = self.train_step(batch)
                dt = time.perf_counter() - t0
                tokens = batch_tokens(batch)
                self.step += 1
                self.tokens_seen += tokens
                self.train_time += dt
                window_loss, window_n = window_loss + loss, window_n + 1
                window_tokens, window_time = window_tokens + tokens, window_time + dt
                if self.metrics is not None and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    rec = {"step": self.step, "split": "train", "loss": window_loss / window_n,
                           "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                           "tokens_per_s": window_tokens / max(window_time, 1e-9), "tokens": self.tokens_seen,
                           "elapsed": self.elapsed()}
                    self.metrics.append(rec)
                    if bar is None:
                        log.info("step %d/%d  loss %.4f  lr %.2e  %.0f tok/s", self.step, cfg.steps,
                                 rec["loss"], rec["lr"], rec["tokens_per_s"])
                    window_loss, window_n, window_tokens, window_time = 0.0, 0, 0, 0.0
                if bar is not None:
                    bar.update(1)
                    post = {"loss": f"{loss:.4f}"}
                    if self.task.metric in self.last_eval:
                        post[f"val_{self.task.metric}"] = f"{self.last_eval[self.task.metric]:.4f}"
                    bar.set_postfix(post, refresh=False)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self._eval_and_log()
                    self.write_outputs(plots=False)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
                    self.write_outputs()
                if self._stop_agreed if self.ddp is not None else self._signal is not None:
                    path = self.save_checkpoint()
                    self.write_outputs(interrupted=True)
                    raise TrainingInterrupted(self._signal or signal.SIGTERM, self.step, path)
            if self.step < cfg.steps:  # stopped early on purpose (until)
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

    def _evaluated_at(self, step: int) -> bool:
        return self.metrics is not None and any(r.get("split") == "val" and r.get("step") == step
                                                for r in self.metrics.records)

    def _agreed(self, decide):
        """``decide()`` as rank 0 sees it (rank 0 holds the metrics), on every rank."""
        return dp.run_on_main(decide) if self.ddp is not None else decide()

    def _progress_bar(self):
        if self.quiet or not self.is_main or not sys.stderr.isatty():
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.steps, initial=self.step, unit="step",
                    desc=f"{self.task.name}/{self.setup.model.preset}")

    # ------------------------------------------------------------------------------------------ outputs
    def report_info(self, interrupted: bool = False) -> dict[str, Any]:
        task, spec = self.task, self.setup.model
        return {
            "task": task.name, "task_params": task.params.to_dict(), "kind": task.kind, "metric": task.metric,
            "higher_is_better": task.higher_is_better, "chance": task.chance_level, "preset": spec.preset,
            "head": spec.head, "model_summary": self.model.summary(),
            "parameters": self.model.num_parameters(), "steps": self.cfg.steps, "steps_done": self.step,
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
