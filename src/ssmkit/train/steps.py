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
        the weights are the same, counted on the piece. With ``train.chunk_len`` as well, the group's ranks
        share each micro-batch's chunks instead (:meth:`_sequence_chunked`)."""
        cfg = self.cfg
        world = self.dist.world_size
        pt = self.pretrainer
        weigh = (lambda b: pt.weight(b)) if pt is not None else (lambda b: batch_weight(self.task, b))
        total = weigh(batch)
        shard = dp.shard_rows(batch, self.dp_rank, self.dp_size) if self.ddp is not None else batch
        micro = split_batch(shard, cfg.grad_accum)
        loss_value = 0.0
        for i, mb in enumerate(micro):
            if self.sp_group is not None and cfg.chunk_len is not None:  # chunks sharded over the group
                loss_value += self._sequence_chunked(mb, weigh(mb), total, len(micro) * world, world)
                continue
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
            if self.sp_group is not None:  # every rank must hold the same parameters' gradients (as DDP gives)
                for p in self.model.parameters():
                    if p.requires_grad and p.grad is None:
                        p.grad = torch.zeros_like(p)
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

    def _sequence_chunked(self, mb: dict[str, torch.Tensor], weight: float, total: float, parts: int,
                          world: int) -> float:
        """Sequence parallel + chunked: the group's ranks run ``mb`` (this row shard's whole sequences) chunk by
        chunk, each chunk split over the group (:func:`~ssmkit.distributed.sequence_chunked.
        sequence_parallel_chunked_backward`). Each rank keeps its part of the gradient of ``world x share x`` the
        micro-batch's mean loss (the group's parts sum to it; the world average follows in
        :meth:`accumulate_gradients`); returns this rank's part of the global loss (``share x loss / P``: the
        group's P ranks all see the micro-batch loss).

        Args: mb: micro-batch (rows, length) tensors, unsharded along time; weight: its scored items; total:
        the global batch's; parts: ``grad_accum x world`` (the equal share when nothing is scored)."""
        from ..distributed.sequence_chunked import sequence_parallel_chunked_backward

        if "mask" in mb:  # an lm's padding only marks unscored positions; the model does not take it
            if bool(((mb["labels"] != -100) & ~mb["mask"]).any()):
                raise ValueError(f"train.sequence_parallel={self.sp} with train.chunk_len: batch['mask'] is False "
                                 f"at scored positions (labels not -100) of task {self.task.name!r}")
            mb = {k: v for k, v in mb.items() if k != "mask"}
        unknown = sorted(set(mb) - {"input_ids", "labels", "reset"})
        if unknown:
            raise ValueError(f"train.sequence_parallel={self.sp} with train.chunk_len needs batches of input_ids, "
                             f"labels and optionally reset; task {self.task.name!r} also gives {unknown}")
        share = weight / total if total > 0 else 1.0 / parts
        with autocast_context(self.cfg.autocast), self._rank_stream():
            stats = sequence_parallel_chunked_backward(self.model, mb, self.cfg.chunk_len, group=self.sp_group,
                                                       loss_scale=share * world, sum_gradients=False)
        return share * float(stats["loss"]) / self.sp
