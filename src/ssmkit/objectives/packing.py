"""Packing (input, label) pairs into fixed-length training rows with reset codes and prefix masks.

One pair packs as::

    tokens = input + [START] + label[:-1]
    labels = [-100] * len(input) + label

so with the model convention "labels[:, t] is the target of the output at position t", the [START] position
(index len(input)) predicts label[0] and position len(input) + j (holding label[j - 1]) predicts label[j]. No
position predicts a token of another sample; the last input token is not scored.

Reset codes (int, one per position):

    1  the first position of a sample: all state is reset (a segment start; it is also a prefix token)
    0  the rest of the input and the [START] token: the prefix, processed bidirectionally by prefix layers
    2  the label region (suffix) after [START]: causal; forces the reverse half's decay to 0

Derived bool masks, as the layers take them: ``reset = codes == 1`` (segment starts) and
``prefix_mask = codes != 2`` (True on the input *including* [START]). [START] belongs to the prefix because it is
known before any label token: at inference the prompt ``input + [START]`` is run through ``forward`` with an
all-True prefix mask and generation then steps causally, exactly as in training. A prefix-bidirectional layer
passes ``reset | ~prefix_mask`` (= codes != 0) to its reverse half, so no label token reaches any position.

Rows: pairs are laid out back to back; a pair that does not fit the rest of a row starts the next row (the
gap is padding: ``pad_id`` tokens, labels -100, code 1 on the first padding position and 2 after it, so padding
is its own segment). A pair is never split across rows. A pair longer than a whole row is, by ``too_long``,
truncated at the label end (``"truncate"``: input + [START] + the first labels that fit; skipped if not even one
label fits), skipped (``"skip"``), or an error (``"error"``). The batch source never produces such pairs: its
objectives are given the row's remaining space as their budget.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ssmkit.data.base import IGNORE_INDEX

from .objectives import Pair

CODE_PREFIX, CODE_START, CODE_SUFFIX = 0, 1, 2
_TOO_LONG = ("truncate", "skip", "error")


def pack_pair(pair: Pair, start_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pair -> (tokens, labels, codes), each (len(input) + len(label),) int64."""
    n_in, n_lab = len(pair.input), len(pair.label)
    if n_in < 1 or n_lab < 1:
        raise ValueError(f"pack_pair: input and label must be non-empty, got lengths {n_in} and {n_lab}")
    tokens = np.concatenate([pair.input, [start_id], pair.label[:-1]]).astype(np.int64)
    labels = np.concatenate([np.full(n_in, IGNORE_INDEX), pair.label]).astype(np.int64)
    codes = np.full(n_in + n_lab, CODE_PREFIX, dtype=np.int64)
    codes[0] = CODE_START
    codes[n_in + 1:] = CODE_SUFFIX
    return tokens, labels, codes


def masks_from_codes(codes: Tensor) -> tuple[Tensor, Tensor]:
    """codes: (batch, length) int -> (reset, prefix_mask), both bool (batch, length)."""
    if not isinstance(codes, Tensor) or codes.ndim != 2 or codes.is_floating_point() or codes.dtype == torch.bool:
        got = f"{tuple(codes.shape)} {codes.dtype}" if isinstance(codes, Tensor) else type(codes).__name__
        raise ValueError(f"masks_from_codes: codes must be an integer tensor (batch, length), got {got}")
    return codes == CODE_START, codes != CODE_SUFFIX


@dataclass
class RowBuilder:
    """Fills one row of ``seq_len`` positions with packed pairs; :meth:`finish` pads it."""

    seq_len: int
    pad_id: int
    start_id: int
    tokens: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    codes: list[np.ndarray] = field(default_factory=list)
    used: int = 0
    num_pairs: int = 0

    @property
    def remaining(self) -> int:
        return self.seq_len - self.used

    def add(self, pair: Pair) -> bool:
        """Append ``pair`` if it fits the remaining space; return whether it was added."""
        if pair.packed_len > self.remaining:
            return False
        t, lab, c = pack_pair(pair, self.start_id)
        self.tokens.append(t)
        self.labels.append(lab)
        self.codes.append(c)
        self.used += len(t)
        self.num_pairs += 1
        return True

    def finish(self) -> dict[str, np.ndarray]:
        """The padded row: input_ids, labels, reset_codes, each (seq_len,) int64."""
        pad = self.remaining
        tokens, labels, codes = list(self.tokens), list(self.labels), list(self.codes)
        if pad:
            tokens.append(np.full(pad, self.pad_id, dtype=np.int64))
            labels.append(np.full(pad, IGNORE_INDEX, dtype=np.int64))
            c = np.full(pad, CODE_SUFFIX, dtype=np.int64)
            c[0] = CODE_START
            codes.append(c)
        return {"input_ids": np.concatenate(tokens), "labels": np.concatenate(labels),
                "reset_codes": np.concatenate(codes)}


def rows_to_batch(rows: list[dict[str, np.ndarray]]) -> dict[str, Tensor]:
    """Stack finished rows into the batch dict: input_ids, labels, reset_codes (long), reset, prefix_mask (bool)."""
    batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in ("input_ids", "labels", "reset_codes")}
    batch["reset"], batch["prefix_mask"] = masks_from_codes(batch["reset_codes"])
    return batch


def pack_rows(
    pairs: Iterable[Pair], seq_len: int, *, pad_id: int, start_id: int, too_long: str = "truncate"
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Pack ``pairs`` in order into rows of ``seq_len`` -> (batch, stats).

    batch: input_ids, labels, reset_codes (num_rows, seq_len) int64; reset, prefix_mask bool. stats: counts of
    ``pairs``, ``rows``, ``truncated`` and ``skipped`` (see the module docstring for ``too_long``).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"pack_rows: seq_len must be an int >= 2, got {seq_len!r}")
    if too_long not in _TOO_LONG:
        raise ValueError(f"pack_rows: unknown too_long {too_long!r}; expected one of {_TOO_LONG}")
    stats = {"pairs": 0, "rows": 0, "truncated": 0, "skipped": 0}
    rows: list[dict[str, np.ndarray]] = []
    row = RowBuilder(seq_len, pad_id, start_id)
    for pair in pairs:
        stats["pairs"] += 1
        if pair.packed_len > seq_len:
            room = seq_len - len(pair.input)
            if too_long == "error":
                raise ValueError(f"pack_rows: a pair of packed length {pair.packed_len} exceeds seq_len={seq_len}")
            if too_long == "skip" or room < 1:
                stats["skipped"] += 1
                continue
            pair = Pair(pair.input, pair.label[:room], pair.consumed)
            stats["truncated"] += 1
        if not row.add(pair):
            rows.append(row.finish())
            row = RowBuilder(seq_len, pad_id, start_id)
            row.add(pair)
    if row.num_pairs or not rows:
        rows.append(row.finish())
    stats["rows"] = len(rows)
    return rows_to_batch(rows), stats
