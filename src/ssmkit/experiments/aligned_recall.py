"""In-context key-value recall with the queries aligned to their answers, in the objectives' prefix layout.

One row (``num_pairs`` = N, ``num_queries`` = M)::

    tokens  <|PREFIX_LM|> k1 v1 ... kN vN [SEP] [START] q1  q2  ... qM
    labels     -100 ...                        -100   v(q1) v(q2) ... v(qM)
    codes      1    0 ...                      0      2   2   ... 2

The context (up to and including [START]) is the prefix, processed bidirectionally by prefix layers; the
queries are the causal suffix. Each query position is scored on the value of its key, and the value is **not**
fed back as the next token (Zoology's MQAR does the same with random filler tokens). Feeding it back, as
:func:`~ssmkit.experiments.retrieval.mqar_pair` with ``interleaved=True`` does, lets a model score 1/N, 1/(N-1),
... by predicting "a value of this context not given yet", a plateau the attention control did not leave in
1,500 steps (docs/reproductions/birdie.notes.md). Keys are K = ``num_keys`` (<= 26) distinct lower-case letters
from ``a``, values distinct upper-case letters from ``A`` (byte ids): bytes the pretraining text contains. Byte
ids that never occur in it (control characters, bytes >= 128) kept a text-pretrained attention model from
learning the recall at all (notes). The M queried keys are distinct, in random order.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ssmkit.data import IGNORE_INDEX
from ssmkit.models import CausalLM
from ssmkit.objectives import ObjectiveVocab
from ssmkit.objectives.packing import CODE_PREFIX, CODE_START, CODE_SUFFIX, masks_from_codes

from .retrieval import _run, finetune_on_batches, mqar_queries

#: the most keys (and values): the letters of the alphabet
LETTERS = 26


def aligned_row(vocab: ObjectiveVocab, rng: np.random.Generator, num_pairs: int, num_queries: int,
                num_keys: int) -> dict[str, np.ndarray]:
    """One recall row (see the module docstring): ``input_ids``, ``labels``, ``reset_codes``, each (2N + 3 + M,)
    int64."""
    if vocab.base_vocab_size < 256:
        raise ValueError(f"aligned_row needs a byte-level vocabulary (base_vocab_size >= 256), got "
                         f"{vocab.base_vocab_size}")
    if not 1 <= num_keys <= LETTERS:
        raise ValueError(f"aligned_row: num_keys must be in [1, {LETTERS}], got {num_keys}")
    if not 1 <= num_queries <= num_pairs <= num_keys:
        raise ValueError(f"aligned_row: need 1 <= num_queries ({num_queries}) <= num_pairs ({num_pairs}) <= "
                         f"num_keys ({num_keys})")
    keys = ord("a") + rng.choice(num_keys, size=num_pairs, replace=False)
    values = ord("A") + rng.choice(num_keys, size=num_pairs, replace=False)
    asked = rng.choice(num_pairs, size=num_queries, replace=False)
    prefix = np.concatenate([[vocab.paradigm_id("prefix_lm")], np.stack([keys, values], 1).reshape(-1),
                             [vocab.sep_id, vocab.start_id]])
    tokens = np.concatenate([prefix, keys[asked]]).astype(np.int64)
    labels = np.concatenate([np.full(len(prefix), IGNORE_INDEX), values[asked]]).astype(np.int64)
    codes = np.full(len(tokens), CODE_PREFIX, dtype=np.int64)
    codes[0] = CODE_START
    codes[len(prefix):] = CODE_SUFFIX
    return {"input_ids": tokens, "labels": labels, "reset_codes": codes}


def rows_batch(rows: list[dict[str, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of different lengths -> a batch padded at the end to the longest (padding: ``pad_id``, labels -100,
    its own segment: code 1 then 2), with ``reset`` and ``prefix_mask`` as in the packed format."""
    if not rows:
        raise ValueError("rows_batch: need at least one row")
    length = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": np.full((len(rows), length), pad_id, dtype=np.int64),
           "labels": np.full((len(rows), length), IGNORE_INDEX, dtype=np.int64),
           "reset_codes": np.full((len(rows), length), CODE_SUFFIX, dtype=np.int64)}
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        for k in out:
            out[k][i, :n] = r[k]
        if n < length:
            out["reset_codes"][i, n] = CODE_START
    batch = {k: torch.from_numpy(v) for k, v in out.items()}
    batch["reset"], batch["prefix_mask"] = masks_from_codes(batch["reset_codes"])
    return batch


def _maker(vocab: ObjectiveVocab, min_pairs: int, max_pairs: int, query_fraction: float, num_keys: int,
           batch_size: int, pad_id: int) -> Callable[[np.random.Generator], dict[str, torch.Tensor]]:
    def make(rng: np.random.Generator) -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(batch_size):
            n = int(rng.integers(min_pairs, max_pairs + 1))
            rows.append(aligned_row(vocab, rng, n, mqar_queries(n, query_fraction), num_keys))
        return rows_batch(rows, pad_id)

    return make


def finetune_aligned(model: CausalLM, vocab: ObjectiveVocab, *, steps: int, batch_size: int, lr: float,
                     max_pairs: int, pad_id: int, num_keys: int, seed: int = 0, quiet: bool = True,
                     min_pairs: int = 2, query_fraction: float = 1.0) -> list[float]:
    """Fine-tune ``model`` in place on aligned recall rows with a uniform ``min_pairs``..``max_pairs`` pairs
    (:func:`~ssmkit.experiments.retrieval.finetune_on_batches`'s recipe); returns the per-step losses."""
    if not 1 <= min_pairs <= max_pairs:
        raise ValueError(f"finetune_aligned: need 1 <= min_pairs ({min_pairs}) <= max_pairs ({max_pairs})")
    make = _maker(vocab, min_pairs, max_pairs, query_fraction, num_keys, batch_size, pad_id)
    return finetune_on_batches(model, make, steps=steps, lr=lr, seed=seed, desc="recall fine-tune", quiet=quiet)


@torch.no_grad()
def aligned_accuracy(model: CausalLM, vocab: ObjectiveVocab, *, num_pairs: int, num_examples: int, pad_id: int,
                     num_keys: int, seed: int = 2024, batch_size: int = 32, query_fraction: float = 1.0) -> float:
    """Share of the queried values predicted right (argmax at each query position) over ``num_examples`` rows of
    ``num_pairs`` pairs."""
    if num_examples < 1:
        raise ValueError(f"aligned_accuracy: num_examples must be >= 1, got {num_examples}")
    model.eval()
    rng = np.random.default_rng([seed, num_pairs])
    m = mqar_queries(num_pairs, query_fraction)
    rows = [aligned_row(vocab, rng, num_pairs, m, num_keys) for _ in range(num_examples)]
    right = total = 0
    for i in range(0, len(rows), batch_size):
        b = rows_batch(rows[i:i + batch_size], pad_id)
        pred = _run(model, b).logits.argmax(-1)
        scored = b["labels"] != IGNORE_INDEX
        right += int(((pred == b["labels"]) & scored).sum())
        total += int(scored.sum())
    return right / total
