"""Exact chunked training of one long sequence in bounded memory: recurrent state checkpoints at chunk
boundaries, per-chunk recomputation, and backpropagation of the state gradient from chunk to chunk.

    stats = chunked_loss_backward(model, {"input_ids": ids, "labels": labels}, chunk_len=16384)
    # every parameter's .grad now holds (accumulates) d(mean loss over the whole sequence)/d(parameter)

Algorithm (chunks c = 0 .. n-1 of ``chunk_len`` positions along time; the last one may be shorter):

1. **Pass 1** (``torch.no_grad``): run the chunks in order with the recurrent state passed forward, keeping
   only the state *entering* each chunk (plus the RNG state, so dropout redraws the same masks). The number
   of scored positions per chunk is counted from the labels up front.
2. **Pass 2**, chunks in reverse: rebuild chunk c's incoming state as fresh leaves that require grad,
   recompute chunk c's forward with a graph, and call ``torch.autograd.backward`` on
   ``[w_c * loss_c, outgoing state tensors]`` with gradients ``[1, d(total)/d(outgoing state)]``, the latter
   collected from chunk c+1's leaves in the previous iteration. The leaves' ``.grad`` is then the gradient
   for chunk c-1's outgoing state. ``w_c = n_c / N`` (scored positions in the chunk over the whole sequence),
   so sum_c w_c * loss_c is exactly the whole-sequence mean loss, and by the chain rule every parameter's
   gradient is exactly the whole-sequence gradient (up to floating-point summation order).

Chunks after the last scored one cannot affect the loss and are skipped in both passes.

Memory: the autograd graph (activations) of one chunk — ``chunk_len`` positions, including its logits —
plus the saved incoming states, ``n_chunks × state size`` (for a Mamba layer the state is
(batch, d_inner, d_conv - 1 + d_state), independent of the length), plus the gradient of one state, plus the
whole sequence's inputs and labels (and, in training mode, one RNG snapshot, about 5 KiB, per chunk).
Activations never exist for more than one chunk at a time.

Attention layers: their state is the KV cache, which grows with the position. Every saved incoming state is
a separate copy of the cache so far, so the saved states total O(L² / chunk_len · d_model) per attention
layer, and recomputing chunk c attends over the whole cache (work and score memory grow with c). Sliding-window
attention (``mask="sliding"``) keeps the cache at ``window`` entries and restores bounded memory.

Supported models: any ssmkit head whose ``forward(inputs, initial_state, *, reset, labels, return_final_state)``
computes a per-position loss that is a mean over scored positions: :class:`~ssmkit.models.CausalLM` /
:class:`~ssmkit.models.PrefixLM` (integer labels (batch, length), -100 ignored) and
:class:`~ssmkit.models.Regressor` / :class:`~ssmkit.models.Forecaster` (float labels (batch, length, d_output),
padding through ``mask``). Every layer must pass state (no ``bi-*`` mixers). A SequenceClassifier's pooled loss does
not split over positions and is rejected.

Dropout: with the model in training mode, pass 2 replays each chunk's RNG state from pass 1, so the
gradient is exact for the dropout masks drawn in pass 1 (these differ from the masks one unchunked forward
would draw, as any change of call structure would).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed.heap import trim_heap
from .resident_heap import resident_heap as _resident_heap

IGNORE_INDEX = -100
#: the batch keys this function reads ("mask" and "padding_mask" are aliases)
BATCH_KEYS = ("input_ids", "inputs", "labels", "reset", "mask", "padding_mask", "prefix_mask")


def chunked_loss_backward(
    model: nn.Module, batch: Mapping[str, Tensor], chunk_len: int, *, loss_scale: float = 1.0,
    resident_heap: bool = False,
) -> dict[str, Any]:
    """Accumulate into every parameter's ``.grad`` the gradient of ``loss_scale`` × (the whole-sequence
    mean loss), computed chunk by chunk along time in bounded memory (see the module docstring).

    Args:
        model: an ssmkit head (CausalLM, PrefixLM, Regressor, Forecaster) whose layers pass state.
        batch: ``input_ids`` (batch, length) int or ``inputs`` (batch, length, d_input) float; ``labels``
            (batch, length) int (-100 ignored) or (batch, length, d_output) float, aligned with the outputs
            (labels[:, t] is position t's target); optional ``reset`` (batch, length) bool segment starts;
            optional ``mask`` (alias ``padding_mask``) (batch, length) bool, True on real positions;
            optional ``prefix_mask`` (batch, length) bool (PrefixLM; no prefix may cross a chunk boundary).
        chunk_len: positions per chunk (the last chunk may be shorter).
        loss_scale: multiplies the loss before backward (e.g. 1 / grad_accumulation_steps).
        resident_heap: keep glibc's heap resident during the call (:mod:`.resident_heap`): faster (freed
            activation blocks are reused instead of mapped afresh) for more peak memory (fragmentation).

    Returns:
        {"loss": the whole-sequence mean loss (unscaled, float), "tokens": scored positions (int),
        "chunks": chunks run in pass 2, "chunk_len": chunk_len, "state_bytes": bytes of saved states}.
    """
    if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
        raise ValueError(f"chunk_len must be a positive int, got {chunk_len!r}")
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) or not math.isfinite(loss_scale):
        raise ValueError(f"loss_scale must be a finite number, got {loss_scale!r}")
    if not isinstance(resident_heap, bool):
        raise TypeError(f"resident_heap must be a bool, got {type(resident_heap).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    run = _Run(model, batch)
    length = run.length
    n_chunks = -(-length // chunk_len)
    bounds = [(c * chunk_len, min((c + 1) * chunk_len, length)) for c in range(n_chunks)]
    run.check_prefix_boundaries([s for s, _ in bounds[1:]])
    counts = [run.count(s, e) for s, e in bounds]
    total = sum(counts)
    if total == 0:
        return {"loss": 0.0, "tokens": 0, "chunks": 0, "chunk_len": chunk_len, "state_bytes": 0}
    last = max(c for c, n in enumerate(counts) if n > 0)

    with _resident_heap() if resident_heap else contextlib.nullcontext():
        return _passes(model, run, bounds, counts, total, last, chunk_len, loss_scale)


def _passes(model: nn.Module, run: _Run, bounds: list[tuple[int, int]], counts: list[int], total: int, last: int,
            chunk_len: int, loss_scale: float) -> dict[str, Any]:
    """Passes 1 and 2 of :func:`chunked_loss_backward` (see the module docstring) on checked arguments."""
    # pass 1: the state entering each chunk 0..last (None for chunk 0) and the RNG state before each chunk
    states: list[Any] = [None]
    replay = model.training  # only training mode draws random numbers (dropout)
    rng: list[Any] = []
    with torch.no_grad():
        for c in range(last):
            rng.append(_rng_get(run.device) if replay else None)
            out = run.forward(states[c], *bounds[c], labels=False, return_final_state=True)
            states.append(out.state)
            del out
            trim_heap()  # glibc keeps freed chunk activations resident otherwise (RSS grows chunk by chunk)
    rng.append(_rng_get(run.device) if replay else None)
    state_bytes = sum(t.numel() * t.element_size() for s in states[1:] for t in s.tensors().values())

    # pass 2: recompute each chunk with a graph, in reverse, carrying d(total)/d(state) backwards
    loss_sum = 0.0
    grad_out: dict[str, Tensor] = {}
    with torch.random.fork_rng(devices=_rng_devices(run.device)):
        for c in range(last, -1, -1):
            trim_heap()
            state_in = None if states[c] is None else states[c].map(_leaf)
            leaves = {} if state_in is None else {k: t for k, t in state_in.tensors().items() if t.requires_grad}
            if replay:
                _rng_set(run.device, rng[c])
            out = run.forward(state_in, *bounds[c], labels=counts[c] > 0, return_final_state=c < last)
            roots: list[Tensor] = []
            grads: list[Tensor | None] = []
            if counts[c] > 0:
                part = out.loss * (counts[c] / total)
                loss_sum += float(part.detach())
                roots.append(part * loss_scale if loss_scale != 1 else part)
                grads.append(None)
            if c < last:
                for k, t in out.state.tensors().items():
                    g = grad_out.get(k)
                    if g is not None and t.requires_grad:
                        roots.append(t)
                        grads.append(g)
            if roots:
                torch.autograd.backward(roots, grads)
            grad_out = {k: t.grad for k, t in leaves.items() if t.grad is not None}
            states[c] = None  # free the saved state as soon as it is used
            del out, roots, state_in, leaves
    return {"loss": loss_sum, "tokens": int(total), "chunks": last + 1, "chunk_len": chunk_len,
            "state_bytes": int(state_bytes)}


def _leaf(t: Tensor) -> Tensor:
    """A fresh graph leaf holding ``t``'s values; floating/complex ones require grad."""
    t = t.detach()
    return t.requires_grad_() if (t.is_floating_point() or t.is_complex()) else t


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index if device.index is not None else torch.cuda.current_device()] if (
        device.type == "cuda") else []


def _rng_get(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _rng_set(device: torch.device, snap: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(snap[0])
    if snap[1] is not None:
        torch.cuda.set_rng_state(snap[1], device)


class _Run:
    """The validated batch of one call and the per-chunk model call."""

    def __init__(self, model: nn.Module, batch: Mapping[str, Tensor]) -> None:
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch must be a dict of tensors, got {type(batch).__name__}")
        unknown = sorted(set(batch) - set(BATCH_KEYS))
        if unknown:
            raise ValueError(f"batch has unknown keys {unknown}; chunked training reads {', '.join(BATCH_KEYS)}")
        has = [k for k in ("input_ids", "inputs") if batch.get(k) is not None]
        if len(has) != 1:
            raise ValueError(f"batch must hold exactly one of 'input_ids' or 'inputs', got {has or 'neither'}")
        self.model = model
        self.x = batch[has[0]]
        if not isinstance(self.x, Tensor) or self.x.ndim < 2 or self.x.shape[1] < 1:
            got = tuple(self.x.shape) if isinstance(self.x, Tensor) else type(self.x).__name__
            raise ValueError(f"batch[{has[0]!r}] must be a tensor (batch, length>=1, ...), got {got}")
        self.device = self.x.device
        self.batch_size, self.length = int(self.x.shape[0]), int(self.x.shape[1])
        shape = (self.batch_size, self.length)
        self.labels = self._labels(batch.get("labels"), shape)
        self.reset = self._mask(batch, "reset", shape)
        if batch.get("mask") is not None and batch.get("padding_mask") is not None:
            raise ValueError("batch has both 'mask' and 'padding_mask' (aliases); give one")
        pad_key = "mask" if batch.get("mask") is not None else "padding_mask"
        self.padding = self._mask(batch, pad_key, shape)
        self.prefix = self._mask(batch, "prefix_mask", shape)
        params = inspect.signature(model.forward).parameters
        self.pass_padding = self.padding is not None and "padding_mask" in params
        if self.prefix is not None and "prefix_mask" not in params:
            raise ValueError(f"batch has a 'prefix_mask' but {type(model).__name__}.forward takes none")
        if self.padding is not None and not self.pass_padding:
            if self.labels.is_floating_point():
                raise ValueError(f"batch has a {pad_key!r} but {type(model).__name__}.forward takes no "
                                 f"padding_mask")
            # an LM without padding_mask: padded positions must simply be unscored (labels -100)
            if bool(((self.labels != IGNORE_INDEX) & ~self.padding).any()):
                raise ValueError(f"batch[{pad_key!r}] is False at positions whose labels are not "
                                 f"{IGNORE_INDEX}; {type(model).__name__} cannot mask padding, so padded "
                                 f"positions must be unscored")
        # the segment starts the model sees: reset, plus every padding boundary when the model takes padding
        # (a chunk alone cannot see a boundary that falls exactly at its first position)
        self.run_reset = self.reset
        if self.pass_padding:
            edges = torch.zeros_like(self.padding)
            edges[:, 1:] = self.padding[:, 1:] != self.padding[:, :-1]
            self.run_reset = edges if self.reset is None else self.reset | edges
        self._check_can_pass_state()

    def _labels(self, labels: object, shape: tuple[int, int]) -> Tensor:
        if labels is None:
            raise ValueError("batch must hold 'labels' (aligned with the outputs: labels[:, t] is position "
                             "t's target)")
        if not isinstance(labels, Tensor) or labels.dtype == torch.bool or labels.is_complex():
            got = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
            raise TypeError(f"batch['labels'] must be an integer or floating tensor, got {got}")
        if labels.ndim < 2 or tuple(labels.shape[:2]) != shape or (
            not labels.is_floating_point() and labels.ndim != 2
        ):
            want = f"{shape}" if not labels.is_floating_point() else f"({shape[0]}, {shape[1]}, d_output)"
            raise ValueError(f"batch['labels'] must be per position with shape {want} (a pooled loss cannot "
                             f"be chunked along time), got {tuple(labels.shape)}")
        if labels.device != self.device:
            raise ValueError(f"batch['labels'] is on {labels.device} but the inputs are on {self.device}")
        return labels

    def _mask(self, batch: Mapping[str, Tensor], key: str, shape: tuple[int, int]) -> Tensor | None:
        m = batch.get(key)
        if m is None:
            return None
        if not isinstance(m, Tensor) or m.dtype != torch.bool or tuple(m.shape) != shape:
            got = f"{tuple(m.shape)} {m.dtype}" if isinstance(m, Tensor) else type(m).__name__
            raise ValueError(f"batch[{key!r}] must be a bool tensor of shape (batch, length) = {shape}, got {got}")
        if m.device != self.device:
            raise ValueError(f"batch[{key!r}] is on {m.device} but the inputs are on {self.device}")
        return m

    def _check_can_pass_state(self) -> None:
        blocks = getattr(getattr(self.model, "backbone", None), "blocks", None)
        if blocks is None:
            if not hasattr(self.model, "init_state"):
                raise TypeError(f"{type(self.model).__name__} has no init_state: chunked training needs a "
                                f"model that passes recurrent state")
            return
        stuck = [f"{i} ({b.mixer_name})" for i, b in enumerate(blocks) if not b.can_step]
        if stuck:
            raise ValueError(f"chunked training passes the recurrent state between chunks, but layers "
                             f"{', '.join(stuck)} are bidirectional and carry no state")

    def check_prefix_boundaries(self, starts: list[int]) -> None:
        """Each prefix must lie inside one chunk: prefix-bidirectional layers see the whole prefix."""
        if self.prefix is None or not starts:
            return
        s = torch.tensor(starts, device=self.device)
        crosses = self.prefix[:, s - 1] & self.prefix[:, s]
        if self.reset is not None:
            crosses &= ~self.reset[:, s]
        if bool(crosses.any()):
            b, i = (int(v) for v in crosses.nonzero()[0])
            raise ValueError(f"prefix_mask: row {b} has a prefix crossing the chunk boundary at position "
                             f"{starts[i]}; every prefix must lie inside one chunk (choose another chunk_len)")

    def count(self, start: int, end: int) -> int:
        """Scored positions in [start, end): labels != -100 (integer labels), else real (mask) positions."""
        if not self.labels.is_floating_point():
            return int((self.labels[:, start:end] != IGNORE_INDEX).sum())
        if self.padding is None:
            return self.batch_size * (end - start)
        return int(self.padding[:, start:end].sum())

    def forward(self, state: Any, start: int, end: int, *, labels: bool, return_final_state: bool) -> Any:
        """The model on positions [start, end) continuing ``state``."""
        sl = slice(start, end)
        kw: dict[str, Any] = {"return_final_state": return_final_state}
        if self.run_reset is not None:
            kw["reset"] = self.run_reset[:, sl]
        if self.pass_padding:
            kw["padding_mask"] = self.padding[:, sl]
        if self.prefix is not None:
            kw["prefix_mask"] = self.prefix[:, sl]
        if labels:
            kw["labels"] = self.labels[:, sl]
        return self.model(self.x[:, sl], state, **kw)
