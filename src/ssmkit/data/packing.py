"""Packing documents into fixed-length rows with ``reset`` masks and labels that never cross a document boundary.

Documents are concatenated into one stream; row r holds stream positions ``[r*seq_len, (r+1)*seq_len)``:

    input_ids[r, t] = stream[p]                     p = r*seq_len + t (pad_id past the end)
    labels[r, t]    = stream[p + 1], or -100 when p+1 starts another document or lies past the end
    reset[r, t]     = True when p starts a document (and at the first padding position)

so a model honouring ``reset`` sees each document as if alone, and no position is trained to predict the first
token of the next document. Consecutive rows continue the stream: a trainer may carry state from row r to r+1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from .base import IGNORE_INDEX


class PackedStream:
    """tokens: (n,) int; doc_start: (n,) bool with doc_start[0] True; rows of ``seq_len`` via :meth:`rows`."""

    def __init__(self, tokens: np.ndarray, doc_start: np.ndarray, seq_len: int, pad_id: int) -> None:
        tokens, doc_start = np.asarray(tokens), np.asarray(doc_start)
        if tokens.ndim != 1 or len(tokens) == 0 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be a non-empty 1-D integer array, got shape {tokens.shape} {tokens.dtype}")
        if doc_start.shape != tokens.shape or doc_start.dtype != np.bool_:
            raise ValueError(f"doc_start must be a bool array of shape {tokens.shape}, got {doc_start.shape} "
                             f"{doc_start.dtype}")
        if not doc_start[0]:
            raise ValueError("doc_start[0] must be True: the stream starts a document")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.tokens, self.doc_start, self.seq_len, self.pad_id = tokens, doc_start, seq_len, pad_id

    def __len__(self) -> int:
        return math.ceil(len(self.tokens) / self.seq_len)

    @property
    def num_rows(self) -> int:
        return len(self)

    def rows(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Rows at ``indices``: input_ids, labels (batch, seq_len) int64 and reset (batch, seq_len) bool."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1 or (len(idx) and (idx.min() < 0 or idx.max() >= len(self))):
            raise ValueError(f"row indices must be 1-D within [0, {len(self)}), got {idx!r}")
        n = len(self.tokens)
        pos = idx[:, None] * self.seq_len + np.arange(self.seq_len)
        valid = pos < n
        clipped = np.minimum(pos, n - 1)
        input_ids = np.where(valid, self.tokens[clipped], self.pad_id).astype(np.int64)
        nxt = np.minimum(pos + 1, n - 1)
        has_label = (pos + 1 < n) & ~self.doc_start[nxt]
        labels = np.where(has_label, self.tokens[nxt], IGNORE_INDEX).astype(np.int64)
        reset = (valid & self.doc_start[clipped]) | (pos == n)
        return {"input_ids": input_ids, "labels": labels, "reset": reset}


def stream_from_documents(
    docs: Iterable[Sequence[int] | np.ndarray], *, eos_id: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents (each followed by ``eos_id`` if given; empty ones skipped) -> (tokens, doc_start).

    tokens: (n,) int32, doc_start: (n,) bool, True at the first token of every document.
    """
    parts, starts = [], []
    for doc in docs:
        arr = np.asarray(doc)
        if len(arr) == 0:
            continue
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"each document must be a 1-D sequence of token ids, got shape {arr.shape} {arr.dtype}")
        arr = arr.astype(np.int32, copy=False)
        if eos_id is not None:
            arr = np.append(arr, np.int32(eos_id))
        start = np.zeros(len(arr), dtype=bool)
        start[0] = True
        parts.append(arr)
        starts.append(start)
    if not parts:
        raise ValueError("no non-empty documents to pack")
    return np.concatenate(parts), np.concatenate(starts)


def pack_documents(
    docs: Iterable[Sequence[int] | np.ndarray], seq_len: int, *, pad_id: int, eos_id: int | None = None
) -> dict[str, np.ndarray]:
    """All rows of the packed documents: input_ids, labels (rows, seq_len) int64 and reset bool."""
    tokens, starts = stream_from_documents(docs, eos_id=eos_id)
    stream = PackedStream(tokens, starts, seq_len, pad_id)
    return stream.rows(np.arange(len(stream)))
