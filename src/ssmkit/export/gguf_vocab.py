"""Tokenizer metadata for GGUF: llama.cpp's ``gpt2`` (byte-level BPE) vocabulary, or ``no_vocab``.

- ``"gpt2"``: GPT-2's 50257 tokens and merges (from the same encoder.json / vocab.bpe ssmkit tokenizes with),
  ``<|endoftext|>`` as BOS/EOS.
- ``"byte"``: ssmkit's byte tokenizer is byte-level BPE without merges: token b (0..255) is byte b written with
  GPT-2's byte-to-unicode alphabet, then the specials <pad> <bos> <eos> <sep> (256..259) as control tokens.
  The gguf writer cannot write an empty array, so one inert merge (``"<pad> <pad>"``, which no byte sequence
  can form) stands in for "no merges".
- ``"none"`` (ids only, e.g. synthetic tasks): llama.cpp's ``no_vocab`` with ``{arch}.vocab_size``.

Token lists shorter than the model's vocabulary are padded with unused ``[PAD{i}]`` tokens (as llama.cpp's
converter does); a tokenizer larger than the model's vocabulary is an error.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

TOKENIZERS = ("byte", "gpt2", "none")


@lru_cache(maxsize=1)
def byte_alphabet() -> tuple[str, ...]:
    """GPT-2's printable stand-in for each byte 0..255 (printable Latin-1 bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return tuple(out[b] for b in range(256))


def _vocab(name: str, bpe_dir: str | None) -> tuple[list[str], list[int], list[str], dict[str, int]]:
    """(tokens, token types, merges, special ids) of ``name``."""
    import gguf

    normal, control = int(gguf.TokenType.NORMAL), int(gguf.TokenType.CONTROL)
    if name == "byte":
        from ..data.tokenizers import ByteTokenizer

        bt = ByteTokenizer()
        tokens = [*byte_alphabet(), *bt.SPECIALS]
        types = [normal] * 256 + [control] * len(bt.SPECIALS)
        return tokens, types, ["<pad> <pad>"], {"bos": bt.bos_id, "eos": bt.eos_id, "pad": bt.pad_id}
    from ..data.tokenizers import find_gpt2_files

    d = find_gpt2_files(bpe_dir)
    encoder = json.loads((d / "encoder.json").read_text(encoding="utf-8"))
    tokens = [""] * len(encoder)
    for tok, i in encoder.items():
        tokens[i] = tok
    lines = (d / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [m for m in lines if m and not m.startswith("#version")]
    eot = encoder["<|endoftext|>"]
    types = [control if i == eot else normal for i in range(len(tokens))]
    return tokens, types, merges, {"bos": eot, "eos": eot}


def add_tokenizer(writer: Any, arch: str, name: str, vocab_size: int, bpe_dir: str | None = None) -> None:
    """Write the tokenizer keys for ``name`` ('byte', 'gpt2' or 'none') padded to ``vocab_size`` tokens."""
    import gguf

    if name not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {', '.join(map(repr, TOKENIZERS))}, got {name!r}")
    if name == "none":
        writer.add_tokenizer_model("no_vocab")
        writer.add_uint32(f"{arch}.vocab_size", vocab_size)
        return
    tokens, types, merges, special = _vocab(name, bpe_dir)
    if len(tokens) > vocab_size:
        raise ValueError(f"tokenizer {name!r} has {len(tokens)} tokens but the model's vocab_size is {vocab_size}")
    pad = range(len(tokens), vocab_size)
    tokens = tokens + [f"[PAD{i}]" for i in pad]
    types = types + [int(gguf.TokenType.UNUSED)] * len(pad)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(special["bos"])
    writer.add_eos_token_id(special["eos"])
    if "pad" in special:
        writer.add_pad_token_id(special["pad"])
    writer.add_add_bos_token(False)  # ssmkit never prepends BOS
    writer.add_add_eos_token(False)
