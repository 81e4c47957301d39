"""Checkpoints of a training run and exact resume: model, optimizer, schedule position, RNG streams and data
position (the files: :mod:`ssmkit.train.checkpoints`)."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ..distributed import data_parallel as dp
from ..models import ModelConfig, SequenceModel, load_pretrained
from .checkpoints import (
    ResumeError,
    RngStates,
    latest_checkpoint,
    optimizer_from_flat,
    read_training_state,
    save_training_checkpoint,
)

log = logging.getLogger("ssmkit.train")


class ResumeMixin:
    """The :class:`~ssmkit.train.Trainer`'s checkpoint writing and restoring."""

    def _read_resume(self) -> tuple[Path, tuple[dict[str, Any], dict[str, torch.Tensor]]]:
        ckpt = latest_checkpoint(self.ckpt_root)
        if ckpt is None:
            raise ResumeError(f"--resume: no checkpoint in {self.ckpt_root}")
        saved = read_training_state(ckpt)
        step, cfg = int(saved[0]["step"]), self.cfg
        if step > cfg.total_steps:
            what = f"train.steps={cfg.steps}" if not cfg.pretrain_steps else (
                f"train.pretrain_steps + train.steps = {cfg.total_steps}")
            raise ResumeError(f"{what} is below the checkpoint's step {step} ({ckpt}); resume with "
                              f"{'train.steps' if not cfg.pretrain_steps else 'a total'} >= {step}")
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
        # so do ModelConfig fields added since (e.g. the muP multipliers): the checkpoint's model loads with them
        model_defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)
                          if f.default is not dataclasses.MISSING}
        if isinstance(saved.get("model"), dict):
            saved["model"] = {**{k: v for k, v in model_defaults.items() if k in now["model"]
                                 and k not in saved["model"]}, **saved["model"]}
        for section in ("task", "model"):
            if saved.get(section) != now[section]:
                raise ResumeError(f"{ckpt}: the checkpoint was trained with another {section} config "
                                  f"({saved.get(section)}); cannot resume with {now[section]}")
        changed = [k for k in now["train"] if saved.get("train", {}).get(k) != now["train"][k]]
        if changed and self.is_main:
            log.warning("resuming with changed train settings: %s", ", ".join(
                f"{k}: {saved.get('train', {}).get(k)!r} -> {now['train'][k]!r}" for k in changed))
        self._enter_phase(int(meta["step"]))
        if self.pretrainer is not None:
            head = meta.get("pretrain_head")
            if head is None:
                raise ResumeError(f"{ckpt}: step {meta['step']} is in the self-pretraining phase but the checkpoint "
                                  f"holds no pretraining head (was it written with train.pretrain='none'?)")
            self.pretrainer.load_head_state(head)
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
        state = {"steps": self.cfg.total_steps, "source": self.source.state_dict(), "tokens_seen": self.tokens_seen,
                 "train_time": self.train_time, "elapsed": self.elapsed(), "last_eval": self.last_eval,
                 "schedule": {"kind": self.schedule.kind, "total_steps": self.schedule.total_steps,
                              "warmup_steps": self.schedule.warmup_steps,
                              "min_ratio": self.schedule.min_ratio, "next_step": self.step},
                 "config": self.setup.to_dict(), "world_size": self.dist.world_size}
        if self.pretrainer is not None:
            state["pretrain_head"] = self.pretrainer.head_state()
        if rank_streams is not None:
            state["rank_rng"] = [{"tensors": t, "meta": m} for t, m in rank_streams]
        return save_training_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, state,
                                        rng=self.rng.current(), keep=self.cfg.keep_checkpoints)
