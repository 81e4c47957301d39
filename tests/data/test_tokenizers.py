"""Any tokenizer.json through get_tokenizer and the text task, and the install hints for optional packages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ssmkit.data import HFTokenizer, MissingDataError, get_task, get_tokenizer
from ssmkit.data.base import DATA_EXTRA, require_module

tokenizers = pytest.importorskip("tokenizers")

CORPUS = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog", "numbers 12 345 6789",
          "über naïve — 日本"] * 20


def build_tokenizer_json(path: Path, *, specials: tuple[str, ...] = ("<|endoftext|>", "<|padding|>")) -> Path:
    """A small byte-level BPE trained on CORPUS, saved as tokenizer.json (like GPT-NeoX's, in miniature)."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials),
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(path))
    return path


def test_tokenizer_json_round_trip_and_special_ids(tmp_path):
    path = build_tokenizer_json(tmp_path / "tokenizer.json")
    ref = tokenizers.Tokenizer.from_file(str(path))
    tok = get_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer) and get_tokenizer(str(path)) is tok  # cached
    assert tok.vocab_size == ref.get_vocab_size() and tok.eos_id == 0 and tok.pad_id == 1
    for text in ["the cat sat", "über 6789 dog!", "unseen words: zebra ∑", ""]:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    assert tok.encode_batch(["a cat", "a dog"]) == [tok.encode("a cat"), tok.encode("a dog")]
    assert tok.decode([*tok.encode("a cat"), tok.eos_id], skip_special=True) == "a cat"
    digits = tok.digit_mask()
    assert digits.shape == (tok.vocab_size,)
    assert all(ref.decode([i]).isdigit() for i in digits.nonzero()[0].tolist())
    assert digits[tok.encode("7")[0]] and not digits[tok.encode("cat")[0]]


def test_tokenizer_json_without_eos(tmp_path):
    tok = get_tokenizer(str(build_tokenizer_json(tmp_path / "plain.json", specials=())))
    assert tok.eos_id is None and tok.pad_id == 0
    text = tmp_path / "c.txt"
    text.write_text(" ".join(CORPUS))
    with pytest.raises(ValueError, match="add_eos=True but tokenizer=.* has no end-of-text token"):
        get_task("text", path=str(text), tokenizer=str(tmp_path / "plain.json"), add_eos=True)


def test_text_task_with_a_tokenizer_json(tmp_path):
    tj = build_tokenizer_json(tmp_path / "tokenizer.json")
    path = tmp_path / "corpus.txt"
    text = "\n\n".join(CORPUS)
    path.write_text(text)
    task = get_task("text", path=str(path), tokenizer=str(tj), seq_len=16, doc_separator="\\n\\n", add_eos=True)
    tok = task.tokenizer
    assert task.vocab_size == tok.vocab_size and task.pad_id == 1
    stream = [t for d in CORPUS for t in (*tok.encode(d), tok.eos_id)]
    assert task.num_tokens("train") + task.num_tokens("val") == len(stream)


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        get_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        get_tokenizer(str(bad))
    with pytest.raises(ValueError, match="must be one of 'byte', 'gpt2' or the path of a tokenizer.json"):
        get_tokenizer("gpt3")
    with pytest.raises(ValueError, match="tokenizer='gpt3' is invalid"):
        get_task("text", path=str(bad), tokenizer="gpt3")


def test_install_hints_name_what_the_data_extra_holds():
    """The data extra in pyproject.toml is what DATA_EXTRA says; aeon is not in it, so its hint is plain pip."""
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    block = re.search(r"^data = \[(.*?)\]", pyproject.read_text(encoding="utf-8"), re.S | re.M).group(1)
    names = {re.split(r"[<>=!~ ;\[]", s.strip().strip('",'))[0] for s in block.splitlines() if s.strip()}
    assert names == set(DATA_EXTRA)
    with pytest.raises(MissingDataError, match=r"install it with `pip install aeon`; or pass path="):
        require_module("ssmkit_no_such_module", task="ucr", pip="aeon", alternative="pass path= to .ts files")
    with pytest.raises(MissingDataError, match=r"`pip install ssmkit\[data\]` or `pip install pmdarima`"):
        require_module("ssmkit_no_such_module", task="forecast", pip="pmdarima")
