"""Batches of prompts of different lengths: where each row's prompt is, validated, and grouped by length.

A row's prompt is a contiguous run of ``input_ids[b]``: given by ``prompt_lengths`` (left-aligned prompts,
padding on the right) or by an ``attention_mask`` whose True/1 entries form one contiguous run per row (so both
right- and left-padded batches work). Padding values are never read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Prompts:
    """Validated prompts. ids: (batch, length) int; starts, lengths: (batch,) int64 (each row's prompt is
    ``ids[b, starts[b]:starts[b] + lengths[b]]``); prefix: (batch, length) bool or None (PrefixLM)."""

    ids: Tensor
    starts: Tensor
    lengths: Tensor
    prefix: Tensor | None

    @property
    def batch(self) -> int:
        return self.ids.shape[0]

    @property
    def max_length(self) -> int:
        return int(self.lengths.max())

    def groups(self) -> list[tuple[Tensor, int]]:
        """(rows (n,) int64, length) for every distinct prompt length, shortest first."""
        return [((self.lengths == n).nonzero().squeeze(1), int(n)) for n in torch.unique(self.lengths)]

    def gather(self, rows: Tensor, length: int) -> tuple[Tensor, Tensor | None]:
        """The prompts of ``rows`` (all of ``length``) left-aligned: ids (n, length), prefix (n, length) or None."""
        idx = self.starts[rows].unsqueeze(1) + torch.arange(length, device=self.ids.device)
        ids = self.ids[rows].gather(1, idx)
        prefix = None if self.prefix is None else self.prefix[rows].gather(1, idx)
        return ids, prefix


def _int_tensor(x: object) -> bool:
    return isinstance(x, Tensor) and not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)


def parse_prompts(
    input_ids: object,
    *,
    vocab_size: int,
    device: torch.device,
    attention_mask: object = None,
    prompt_lengths: object = None,
    prefix_mask: object = None,
) -> Prompts:
    """Validate ``input_ids`` (batch, length) and the optional ragged-batch and prefix masks (see module doc)."""
    if not _int_tensor(input_ids):
        got = input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids must be an integer tensor of token ids (batch, length), got {got}")
    if input_ids.ndim != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape (batch>=1, length>=1), got {tuple(input_ids.shape)}")
    if input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
    batch, length = input_ids.shape
    pos = torch.arange(length, device=device)

    if attention_mask is not None and prompt_lengths is not None:
        raise ValueError("give either attention_mask or prompt_lengths for a ragged batch, not both")
    if attention_mask is not None:
        starts, lengths = _from_attention_mask(attention_mask, batch, length, device, pos)
    elif prompt_lengths is not None:
        lengths = _from_prompt_lengths(prompt_lengths, batch, length, device)
        starts = torch.zeros(batch, dtype=torch.long, device=device)
    else:
        starts = torch.zeros(batch, dtype=torch.long, device=device)
        lengths = torch.full((batch,), length, dtype=torch.long, device=device)
    real = (pos >= starts[:, None]) & (pos < (starts + lengths)[:, None])

    vals = input_ids[real]
    bad = (vals < 0) | (vals >= vocab_size)
    if bool(bad.any()):
        b, t = (int(v) for v in (real & ((input_ids < 0) | (input_ids >= vocab_size))).nonzero()[0])
        raise ValueError(f"input_ids must hold token ids in [0, vocab_size={vocab_size}) at prompt positions, "
                         f"got {int(input_ids[b, t])} at [{b}, {t}]")

    prefix = None
    if prefix_mask is not None:
        if not isinstance(prefix_mask, Tensor) or prefix_mask.dtype != torch.bool or (
            tuple(prefix_mask.shape) != (batch, length)
        ):
            got = (f"{tuple(prefix_mask.shape)} {prefix_mask.dtype}" if isinstance(prefix_mask, Tensor)
                   else type(prefix_mask).__name__)
            raise ValueError(f"prefix_mask must be a bool tensor shaped like input_ids {(batch, length)}, "
                             f"got {got}")
        if prefix_mask.device != device:
            raise ValueError(f"prefix_mask is on {prefix_mask.device} but the model is on {device}")
        outside = prefix_mask & ~real
        if bool(outside.any()):
            b, t = (int(v) for v in outside.nonzero()[0])
            raise ValueError(f"prefix_mask is True at [{b}, {t}], which is padding, not part of row {b}'s "
                             f"prompt")
        prefix = prefix_mask
    return Prompts(ids=input_ids, starts=starts, lengths=lengths, prefix=prefix)


def _from_attention_mask(mask: object, batch: int, length: int, device: torch.device,
                         pos: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(mask, Tensor) or mask.is_floating_point() or mask.is_complex() or (
        tuple(mask.shape) != (batch, length)
    ):
        got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"attention_mask must be a bool or 0/1 integer tensor shaped like input_ids "
                         f"{(batch, length)}, got {got}")
    if mask.device != device:
        raise ValueError(f"attention_mask is on {mask.device} but the model is on {device}")
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0 and 1 (or be bool)")
        mask = mask.bool()
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError(f"attention_mask row {int((lengths == 0).nonzero()[0])} has no prompt token (every "
                         f"row needs at least one)")
    starts = mask.to(torch.int8).argmax(1)
    run = (pos >= starts[:, None]) & (pos < (starts + lengths)[:, None])
    if not bool(torch.equal(run, mask)):
        b = int((run != mask).any(1).nonzero()[0])
        raise ValueError(f"attention_mask row {b} is not one contiguous run of ones (prompts must be padded on "
                         f"the left or the right only)")
    return starts.long(), lengths.long()


def _from_prompt_lengths(lengths: object, batch: int, length: int, device: torch.device) -> Tensor:
    if isinstance(lengths, Tensor):
        if not _int_tensor(lengths) or tuple(lengths.shape) != (batch,):
            raise ValueError(f"prompt_lengths must be an integer tensor of shape ({batch},), got "
                             f"{tuple(lengths.shape)} {lengths.dtype}")
        out = lengths.to(device=device, dtype=torch.long)
    elif isinstance(lengths, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in lengths):
        if len(lengths) != batch:
            raise ValueError(f"prompt_lengths must have one entry per row ({batch}), got {len(lengths)}")
        out = torch.tensor(list(lengths), dtype=torch.long, device=device)
    else:
        raise TypeError(f"prompt_lengths must be a sequence of ints or an integer tensor, "
                        f"got {type(lengths).__name__}")
    if bool(((out < 1) | (out > length)).any()):
        raise ValueError(f"prompt_lengths must lie in [1, input_ids.shape[1]={length}], got {out.tolist()}")
    return out
