"""Language modelling on a text file in the objectives' next-token format, for evaluating objective-trained models.

A model trained on objective mixtures (:class:`~ssmkit.objectives.MixtureBatchSource`) only ever sees text after
a paradigm token and [START]. :class:`ObjectiveText` serves the validation and test splits of a text file the same
way: every row is one next-token pair, ``[<|NEXT_TOKEN|>] [START] t_0 .. t_{n-2}`` with labels
``[-100] t_0 .. t_{n-1}`` (n = seq_len - 1), packed exactly as in training, so its loss is the model's next-token
loss (and perplexity) on held-out text in the format it was trained in. The train split is the raw token stream
(:meth:`split_tokens`) that the batch source reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ssmkit.data.params import param
from ssmkit.data.text import Text, TextParams

from .objectives import NextToken
from .packing import RowBuilder, masks_from_codes
from .vocab import ObjectiveVocab


@dataclass(frozen=True, kw_only=True)
class ObjectiveTextParams(TextParams):
    num_placeholders: int = param(64, "numbered placeholder tokens reserved above the text vocabulary", ge=1)
    prefix_mask: bool = param(True, "give batches a prefix_mask (False for causal-only models)")


class ObjectiveText(Text):
    """A :class:`~ssmkit.data.text.Text` task whose rows are next-token pairs in the objectives' format.

    ``vocab`` is the :class:`ObjectiveVocab` over the tokenizer's ids, ``vocab_size`` its full size (the
    embedding size the model needs), ``pad_id`` the tokenizer's pad id. Batches: input_ids, labels (batch,
    seq_len) int64; reset (and prefix_mask unless disabled) bool. Metrics as for Text (loss, perplexity, ...).
    """

    name: ClassVar[str] = "objective_text"
    description: ClassVar[str] = "next-token pairs (paradigm + [START] + text) over a text file, for objective runs"
    Params = ObjectiveTextParams

    def _setup(self) -> None:
        super()._setup()
        p = self.params
        if p.seq_len < 3:
            self.fail("seq_len", "must be >= 3 (paradigm, [START] and at least one text token)")
        self.vocab = ObjectiveVocab(self.tokenizer.vocab_size, p.num_placeholders)
        self.vocab_size = self.vocab.vocab_size
        self.chunk = p.seq_len - 1  # text tokens per row
        self._ntp = NextToken(self.vocab, (1, self.chunk))

    def fail(self, name: str, message: str) -> None:
        raise ValueError(f"{self.name}: {name}={getattr(self.params, name)!r}: {message}")

    def split_tokens(self, split: str) -> np.ndarray:
        """(n,) int64: the token stream of ``split`` (all ids below ``vocab.base_vocab_size``)."""
        return self._streams[self.check_split(split)].tokens.astype(np.int64)

    def num_examples(self, split: str) -> int:
        return -(-len(self._streams[self.check_split(split)].tokens) // self.chunk)

    def _fetch(self, split: str, indices: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        tokens = self.split_tokens(split)
        rows = []
        rng = np.random.default_rng(0)  # next-token pairs use no randomness
        for i in np.asarray(indices, dtype=np.int64):
            seg = tokens[i * self.chunk:(i + 1) * self.chunk]
            row = RowBuilder(self.params.seq_len, self.pad_id, self.vocab.start_id)
            if not row.add(self._ntp(seg, rng, self.params.seq_len)):
                raise RuntimeError(f"{self.name}: a {len(seg)}-token segment did not fit a row (a bug)")
            rows.append(row.finish())
        out = {k: np.stack([r[k] for r in rows]) for k in ("input_ids", "labels")}
        reset, prefix = masks_from_codes(torch.from_numpy(np.stack([r["reset_codes"] for r in rows])))
        out["reset"] = reset.numpy()
        if self.params.prefix_mask:
            out["prefix_mask"] = prefix.numpy()
        return out
