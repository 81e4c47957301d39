"""Bad input to GGUF export and import: one-line errors, nothing half-written."""

import gguf
import pytest
import torch

import ssmkit.export.gguf as gguf_export
from ssmkit.export import to_gguf
from ssmkit.interop import from_gguf

from .conftest import small_lm


@pytest.mark.parametrize("pattern,kw,match", [
    ("s4d", {}, r"layers are \['s4d'\]"),
    ("mamba,attn", {}, r"layers are \['mamba', 'attn'\]"),
    ("mamba,mamba2", {}, r"layers are"),
    ("mamba", {"mlp": "swiglu"}, r"mlp='swiglu'"),
    ("mamba", {"norm": "layernorm"}, r"norm='layernorm'"),
    ("mamba", {"mixer_options": {"mamba": {"expand": 1}}}, r"only expand=2"),
    ("mamba", {"mixer_options": {"mamba": {"bias": True}}}, r"bias=True"),
    ("mamba2", {"mixer_options": {"mamba2": {"dt_limit": (0.0, 10.0), "d_state": 16}}}, r"dt_limit"),
    ("mamba", {"residual_multiplier": 0.5}, r"residual_multiplier=0.5"),
    ("mamba2", {"logits_scaling": 2.0}, r"logits_scaling=2.0"),
])
def test_models_gguf_cannot_hold_name_what_is_supported(tmp_path, pattern, kw, match):
    model = small_lm(pattern, **kw)
    with pytest.raises(ValueError, match=match) as e:
        to_gguf(model, tmp_path / "m.gguf")
    msg = str(e.value)
    assert "\n" not in msg and "GGUF export supports" in msg and "'mamba'" in msg and "'mamba2'" in msg
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path):
    model = small_lm("mamba")
    with pytest.raises(ValueError, match=r"quant must be one of 'f32', 'f16', 'q8_0', 'q4_0', got 'q5'"):
        to_gguf(model, tmp_path / "m.gguf", quant="q5")
    with pytest.raises(ValueError, match=r"tokenizer must be one of"):
        to_gguf(model, tmp_path / "m.gguf", tokenizer="bpe")
    with pytest.raises(ValueError, match=r"tokenizer 'byte' has 260 tokens but the model's vocab_size is 100"):
        to_gguf(small_lm("mamba", vocab=100), tmp_path / "m.gguf", tokenizer="byte")
    with pytest.raises(ValueError, match=r"float64.*cast with .float\(\)"):
        to_gguf(model.double(), tmp_path / "m.gguf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        to_gguf(small_lm("mamba"), tmp_path / "nope" / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_export, "add_tokenizer", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        to_gguf(small_lm("mamba"), path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"] and path.read_bytes() == b"old"


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    return to_gguf(small_lm("mamba2*2"), tmp_path_factory.mktemp("g") / "m.gguf")


@pytest.mark.parametrize("keep", [10, 100, 0.5, -8])
def test_truncated_file_is_a_one_line_error(tmp_path, good_file, keep):
    data = good_file.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (keep if keep > 0 else len(data) + keep)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:n])
    with pytest.raises(ValueError, match=r"^from_gguf: .*bad.gguf: ") as e:
        from_gguf(bad)
    assert "\n" not in str(e.value)


def test_not_gguf_and_missing(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match=r"not a GGUF file \(starts with b'PK\\x03\\x04'"):
        from_gguf(p)
    with pytest.raises(FileNotFoundError, match="no such file"):
        from_gguf(tmp_path / "missing.gguf")


def test_unknown_architecture(tmp_path):
    p = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"architecture 'llama' is not supported; ssmkit reads 'mamba', 'mamba2'"):
        from_gguf(p)


def test_missing_and_unexpected_tensors(tmp_path, good_file):
    reader = gguf.GGUFReader(good_file)
    for drop, extra, match in (("blk.1.ssm_d", None, r"missing tensor 'blk.1.ssm_d'"),
                               (None, "blk.2.ssm_d", r"unexpected tensors .*blk.2.ssm_d")):
        p = tmp_path / "edited.gguf"
        w = gguf.GGUFWriter(str(p), "mamba2")
        for name, field in reader.fields.items():
            if name.startswith(("GGUF.", "general.architecture")):
                continue
            w.add_key_value(name, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1
                            else None)
        for t in reader.tensors:
            if t.name != drop:
                w.add_tensor(t.name, t.data.copy())
        if extra:
            w.add_tensor(extra, reader.tensors[-1].data.copy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(ValueError, match=match):
            from_gguf(p)
