"""A pluggable training batch source that samples objective arms from a mixture and packs them into rows.

    source = MixtureBatchSource(tokens, make_mixture("birdie", arms), batch_size=8, seq_len=512, pad_id=256)
    source.loss_fn = lambda batch: per_row_loss(model, batch)     # optional: lets birdie evaluate itself
    batch = source.next_batch()        # input_ids, labels, reset_codes (long); reset, prefix_mask (bool)

Each row is filled left to right: draw an arm from the mixture, draw a text length from the arm's range, take
that many tokens from the stream (a sequential pointer that wraps around; with ``doc_start`` a segment never
crosses a document start), and build the pair with the row's remaining space as budget (the objective uses a
shorter text if needed, and the pointer advances by the tokens it used). When the remaining space is below
``max(min_fill, arm.min_budget)`` the row is padded and the drawn arm starts the next row, so the arms' shares
follow the mixture exactly and no sample is split across rows. Everything is a deterministic function of
``seed`` and the mixture's decisions; ``state_dict`` captures the RNG, the stream position and the mixture.

Birdie needs per-arm validation losses at its own schedule. Either give the source a ``loss_fn`` (callable
batch -> per-row losses (rows,) or a scalar mean, run under ``torch.no_grad``; putting the model in eval mode
is the callable's business): ``next_batch`` then measures :meth:`validation_losses` whenever
``mixture.needs_eval(step)`` (step = batches served so far) and updates the mixture. Or evaluate outside and call
``on_eval(step, {"objective_losses": {arm name: loss}})``; other metrics passed to ``on_eval`` are ignored. Use
one or the other: the controller rejects a second evaluation at the same step.

``state_dict()`` holds plain Python values plus, for birdie, the reward model's tensors and optimizer state; the
trainer's checkpoints store the tensors in safetensors and the rest as JSON (``ssmkit.train.checkpoints``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ssmkit.data.base import IGNORE_INDEX

from .mixtures import Mixture
from .objectives import Objective, Pair
from .packing import RowBuilder, rows_to_batch

LossFn = Callable[[dict[str, Tensor]], Tensor | float]


def _int(owner: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _token_array(owner: str, name: str, tokens: object, base_vocab: int) -> np.ndarray:
    arr = tokens.numpy() if isinstance(tokens, Tensor) else np.asarray(tokens)
    if arr.ndim != 1 or len(arr) == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{owner}: {name} must be a non-empty 1-D integer array of token ids, got shape "
                         f"{arr.shape} {arr.dtype}")
    if arr.min() < 0 or arr.max() >= base_vocab:
        raise ValueError(f"{owner}: {name} ids must lie in [0, base_vocab_size={base_vocab}), got range "
                         f"[{arr.min()}, {arr.max()}]")
    return arr.astype(np.int64, copy=False)


class TokenStream:
    """Contiguous text segments from a token array, read by a wrapping pointer.

    tokens: (n,) int; doc_start: optional (n,) bool, True at each document's first token.
    """

    def __init__(self, tokens: np.ndarray, doc_start: np.ndarray | None = None) -> None:
        self.tokens = tokens
        if doc_start is not None:
            ds = doc_start.numpy() if isinstance(doc_start, Tensor) else np.asarray(doc_start)
            if ds.shape != tokens.shape or ds.dtype != np.bool_:
                raise ValueError(f"doc_start must be a bool array of shape {tokens.shape}, got {ds.shape} {ds.dtype}")
            self.starts = np.flatnonzero(ds)
        else:
            self.starts = np.zeros(0, dtype=np.int64)
        self.pos, self.epoch = 0, 0

    def _limit(self, pos: int) -> int:
        """End of the document holding ``pos`` (the next document start after it, or the stream end)."""
        i = np.searchsorted(self.starts, pos, side="right")
        return int(self.starts[i]) if i < len(self.starts) else len(self.tokens)

    def segment(self, length: int, min_len: int) -> np.ndarray:
        """Up to ``length`` tokens from the pointer (at least ``min_len``; skips too-short tails)."""
        n = len(self.tokens)
        if min_len > n:
            raise ValueError(f"the token stream has {n} tokens, fewer than an arm needs ({min_len})")
        for _ in range(len(self.starts) + 3):
            end = min(self.pos + length, self._limit(self.pos))
            if end - self.pos >= min_len:
                return self.tokens[self.pos:end]
            self.advance(end - self.pos)
        raise ValueError(f"no document in the token stream holds {min_len} tokens, which an arm needs")

    def sample_at(self, rng: np.random.Generator, length: int, min_len: int) -> np.ndarray:
        """A segment at a random position (for validation sets); does not move the pointer."""
        saved = (self.pos, self.epoch)
        self.pos = int(rng.integers(len(self.tokens)))
        seg = self.segment(length, min_len)
        self.pos, self.epoch = saved
        return seg

    def advance(self, k: int) -> None:
        self.pos += k
        if self.pos >= len(self.tokens):
            self.pos, self.epoch = 0, self.epoch + 1


class MixtureBatchSource:
    """Packed training batches whose samples' objectives follow a :class:`Mixture` (see the module docstring).

    Args:
        tokens: (n,) int token ids of the training text (ids below ``vocab.base_vocab_size``).
        mixture: the arm mixture (``make_mixture``); its arms define the objectives and the vocab.
        batch_size, seq_len: rows per batch and row length.
        pad_id: the padding token (e.g. the byte tokenizer's 256); never scored.
        seed: RNG seed (arm choice, lengths, objective randomness).
        doc_start: optional (n,) bool document starts; segments never cross them.
        min_fill: pad a row rather than fit a sample into fewer positions than this (default max(8, seq_len/16)).
        val_tokens: token ids for the fixed validation set (default: random segments of ``tokens``, which is
            then not held out).
        val_rows: rows per arm in the validation set.
        loss_fn: optional, see the module docstring.
        prefix_mask: put ``prefix_mask`` in the batches (and the validation set). False for causal-only models,
            which reject it; ``reset`` still keeps every packed sample separate.

    Batches: input_ids, labels, reset_codes (batch_size, seq_len) int64; reset, prefix_mask bool (see
    :mod:`ssmkit.objectives.packing`). ``vocab_size`` is the embedding size a model needs.
    """

    def __init__(
        self,
        tokens: object,
        mixture: Mixture,
        *,
        batch_size: int,
        seq_len: int,
        pad_id: int,
        seed: int = 0,
        doc_start: object | None = None,
        min_fill: int | None = None,
        val_tokens: object | None = None,
        val_rows: int = 1,
        loss_fn: LossFn | None = None,
        prefix_mask: bool = True,
    ) -> None:
        owner = type(self).__name__
        if not isinstance(mixture, Mixture):
            raise TypeError(f"{owner}: mixture must be a Mixture (make_mixture), got {type(mixture).__name__}")
        self.mixture, self.arms = mixture, mixture.arms
        self.vocab = self.arms[0].vocab
        self.vocab_size = self.vocab.vocab_size
        self.batch_size = _int(owner, "batch_size", batch_size, 1)
        self.seq_len = _int(owner, "seq_len", seq_len, 2)
        self.pad_id = _int(owner, "pad_id", pad_id, 0)
        if self.pad_id >= self.vocab_size:
            raise ValueError(f"{owner}: pad_id must be < vocab_size={self.vocab_size}, got {pad_id}")
        self.seed = _int(owner, "seed", seed, 0)
        self.min_fill = max(8, self.seq_len // 16) if min_fill is None else _int(owner, "min_fill", min_fill, 1)
        self.val_rows = _int(owner, "val_rows", val_rows, 1)
        too_big = [a.name for a in self.arms if a.min_budget > self.seq_len]
        if too_big:
            raise ValueError(f"{owner}: seq_len={self.seq_len} is too short for arms {too_big}")
        base = self.vocab.base_vocab_size
        self.stream = TokenStream(_token_array(owner, "tokens", tokens, base), doc_start)
        self._val_tokens = None if val_tokens is None else _token_array(owner, "val_tokens", val_tokens, base)
        self._val_set: dict[str, dict[str, Tensor]] | None = None
        self.loss_fn = loss_fn
        if not isinstance(prefix_mask, bool):
            raise TypeError(f"{owner}: prefix_mask must be a bool, got {type(prefix_mask).__name__}")
        self.with_prefix_mask = prefix_mask
        self.rng = np.random.default_rng(self.seed)
        self.step = 0
        self.pending: int | None = None
        self.counts = np.zeros(len(self.arms), dtype=np.int64)

    # ------------------------------------------------------------------------------------------ batches
    def _build(self, arm: Objective, stream: TokenStream, rng: np.random.Generator, budget: int,
               *, sequential: bool) -> Pair | None:
        length = int(rng.integers(arm.lengths[0], arm.lengths[1] + 1))
        seg = stream.segment(length, arm.min_text) if sequential else stream.sample_at(rng, length, arm.min_text)
        pair = arm(seg, rng, budget)
        if pair is not None and sequential:
            stream.advance(pair.consumed)
        return pair

    def _row(self) -> dict[str, np.ndarray]:
        row = RowBuilder(self.seq_len, self.pad_id, self.vocab.start_id)
        while True:
            if self.pending is None:
                self.pending = int(self.rng.choice(len(self.arms), p=self.mixture.probs))
            arm = self.arms[self.pending]
            if row.remaining < max(self.min_fill, arm.min_budget) and row.num_pairs:
                return row.finish()
            pair = self._build(arm, self.stream, self.rng, row.remaining, sequential=True)
            if pair is None:  # cannot happen for budget >= min_budget; keep the arm for the next row
                return row.finish()
            row.add(pair)
            self.counts[self.pending] += 1
            self.pending = None

    def next_batch(self) -> dict[str, Tensor]:
        """The next batch (see the class docstring); first runs a due birdie evaluation if ``loss_fn`` is set."""
        if self.loss_fn is not None and self.mixture.needs_eval(self.step):
            self.mixture.on_eval(self.step, self.validation_losses(self.loss_fn))
        batch = self._batch([self._row() for _ in range(self.batch_size)])
        self.step += 1
        return batch

    def _batch(self, rows: list[dict[str, np.ndarray]]) -> dict[str, Tensor]:
        batch = rows_to_batch(rows)
        if not self.with_prefix_mask:
            del batch["prefix_mask"]
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    # --------------------------------------------------------------------------------------- evaluation
    def eval_due(self, step: int) -> bool:
        """Whether the mixture wants per-arm validation losses after ``step`` training steps."""
        return self.mixture.needs_eval(step)

    def on_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Trainer callback: ``metrics["objective_losses"]`` (arm name -> loss) updates the mixture."""
        losses = metrics.get("objective_losses") if isinstance(metrics, Mapping) else None
        if losses is not None:
            self.mixture.on_eval(step, losses)

    @property
    def validation_set(self) -> dict[str, dict[str, Tensor]]:
        """Arm name -> a fixed batch of ``val_rows`` rows holding only that arm's samples (built once)."""
        if self._val_set is None:
            if self._val_tokens is not None:
                stream = TokenStream(self._val_tokens)
            else:  # the training text, keeping its document boundaries
                stream = TokenStream(self.stream.tokens)
                stream.starts = self.stream.starts
            out = {}
            for i, arm in enumerate(self.arms):
                rng = np.random.default_rng([self.seed, 1, i])
                rows = []
                for _ in range(self.val_rows):
                    row = RowBuilder(self.seq_len, self.pad_id, self.vocab.start_id)
                    while row.remaining >= max(self.min_fill, arm.min_budget) or not row.num_pairs:
                        pair = self._build(arm, stream, rng, row.remaining, sequential=False)
                        if pair is None:
                            break
                        row.add(pair)
                    rows.append(row.finish())
                out[arm.name] = self._batch(rows)
            self._val_set = out
        return self._val_set

    def validation_losses(self, loss_fn: LossFn) -> dict[str, float]:
        """Per-arm validation loss on :attr:`validation_set` (see :func:`per_objective_losses`)."""
        return per_objective_losses(loss_fn, self.validation_set)

    # -------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "step": self.step, "pending": self.pending, "rng": self.rng.bit_generator.state,
                "pos": self.stream.pos, "epoch": self.stream.epoch, "counts": self.counts.tolist(),
                "mixture": self.mixture.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"{type(self).__name__}.load_state_dict: the state has seed {state['seed']}, "
                             f"this source {self.seed}")
        self.mixture.load_state_dict(state["mixture"])
        self.step, self.pending = int(state["step"]), state["pending"]
        self.rng.bit_generator.state = state["rng"]
        self.stream.pos, self.stream.epoch = int(state["pos"]), int(state["epoch"])
        self.counts = np.array(state["counts"], dtype=np.int64)


def per_objective_losses(loss_fn: LossFn, val_set: Mapping[str, Mapping[str, Tensor]]) -> dict[str, float]:
    """Arm name -> mean of ``loss_fn(batch)`` (a scalar, or per-row losses (rows,)) under ``torch.no_grad``."""
    out = {}
    with torch.no_grad():
        for name, batch in val_set.items():
            v = loss_fn(dict(batch))
            t = torch.as_tensor(v, dtype=torch.float64)
            if t.ndim > 1:
                raise ValueError(f"per_objective_losses: loss_fn must return a scalar or per-row losses (rows,), "
                                 f"got shape {tuple(t.shape)}")
            out[name] = float(t.mean())
    return out


def per_row_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Token-mean cross entropy per row: logits (rows, length, vocab), labels (rows, length) -> (rows,).

    Rows without a scored token give NaN (the reward then treats that arm as unchanged).
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"per_row_lm_loss: logits (rows, length, vocab) and labels (rows, length) must agree, "
                         f"got {tuple(logits.shape)} and {tuple(labels.shape)}")
    tok = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    n = (labels != IGNORE_INDEX).sum(dim=1)
    return tok.sum(dim=1) / n
