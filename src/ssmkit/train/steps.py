"""One optimizer step: forward/backward in micro-batches (data and sequence parallel aware), clipping, the
scheduled lr and AdamW."""

from __future__ import annotations

import contextlib
import math

import torch

from ..distributed import data_parallel as dp
from .optim import clip_gradients
from .taskio import autocast_context, batch_weight, model_outputs, split_batch, task_loss


class StepsMixin:
    """The :class:`~ssmkit.train.Trainer`'s optimizer step."""

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
        pt = self.pretrainer
        weigh = (lambda b: pt.weight(b)) if pt is not None else (lambda b: batch_weight(self.task, b))
        total = weigh(batch)
        shard = dp.shard_rows(batch, self.dp_rank, self.dp_size) if self.ddp is not None else batch
        micro = split_batch(shard, cfg.grad_accum)
        loss_value = 0.0
        for i, mb in enumerate(micro):
            if self.sp_group is not None:  # this rank's contiguous piece of every sequence
                from ..distributed.sequence import shard_sequence

                mb = {k: shard_sequence(v, self.sp_group) for k, v in mb.items()}
            weight = weigh(mb)
            share = weight / total if total > 0 else 1.0 / (len(micro) * world)
            scale = share * world
            sync = self.ddp is None or i == len(micro) - 1 or cfg.chunk_len is not None
            with autocast_context(cfg.autocast), self._rank_stream(), \
                    (contextlib.nullcontext() if sync else self.ddp.no_sync()):
                if cfg.chunk_len is not None:
                    loss_value += share * self._chunked(mb, scale)
                    continue
                if pt is not None:
                    loss = pt.loss(mb)
                    (loss * scale).backward()
                    loss_value += share * float(loss.detach())
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
        grad_norm = clip_gradients(self.model if self.pretrainer is None else self.pretrainer.net, self.cfg.grad_clip)
        self.schedule.apply(self.optimizer, self.step - self.phase_start)
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
