"""Checkpoints: round trips, atomic writes, tied weights, and every way a checkpoint can be bad."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ssmkit.models import (
    CausalLM,
    CheckpointError,
    Forecaster,
    PrefixLM,
    Regressor,
    SequenceClassifier,
    load_pretrained,
    read_config,
)
from tests.models.util import ids, tiny_config


def build(head, pattern="mamba,attn", dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return head(tiny_config(pattern, **kw)).to(dtype).eval()


def edit_config(directory, fn):
    path = directory / "config.json"
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def rewrite_weights(directory, fn):
    """Apply fn to the saved tensors and save them back (dropping the recorded checksum)."""
    tensors = load_file(directory / "model.safetensors")
    fn(tensors)
    save_file(tensors, directory / "model.safetensors")
    edit_config(directory, lambda m: m.pop("weights_sha256"))


CASES = [
    (CausalLM, "mamba,attn", {}, lambda: ids(2, 6)),
    (CausalLM, "gated*2", {"tie_embeddings": False, "mlp": "swiglu", "norm": "layernorm"}, lambda: ids(2, 6)),
    (PrefixLM, "gated,mamba", {}, lambda: ids(2, 6)),
    (SequenceClassifier, "bi-mamba,s4d", {"num_classes": 3}, lambda: ids(2, 6)),
    (Regressor, "mamba2,h3", {"d_input": 3, "d_output": 2}, lambda: torch.randn(2, 6, 3)),
    (Forecaster, "longconv,rglru,s4", {"d_input": 2, "d_output": 2}, lambda: torch.randn(2, 6, 2)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].__name__}-{c[1]}")
def test_round_trip_identical_outputs(tmp_path, case):
    head, pattern, kw, make_input = case
    model = build(head, pattern, **kw)
    x = make_input()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    loaded = load_pretrained(tmp_path)
    assert type(loaded) is head and not loaded.training
    assert loaded.config == model.config
    again = head.from_pretrained(tmp_path)
    with torch.no_grad():
        a, b, c = model(x), loaded(x), again(x)
    field = "outputs" if head in (Regressor, Forecaster) else "logits"
    assert torch.equal(getattr(a, field), getattr(b, field))
    assert torch.equal(getattr(a, field), getattr(c, field))
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


def test_float64_round_trip_keeps_dtype(tmp_path):
    model = build(CausalLM, "gated,attn", dtype=torch.float64)
    model.save_pretrained(tmp_path)
    head, _, meta = read_config(tmp_path)
    assert head == "CausalLM" and meta["dtype"] == "float64"
    loaded = load_pretrained(tmp_path)
    assert next(loaded.parameters()).dtype == torch.float64
    x = ids(1, 5)
    assert torch.equal(model(x).logits, loaded(x).logits)


def test_tied_weights_saved_once_and_retied(tmp_path):
    model = build(CausalLM, "gated")
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "backbone.embedding.weight" in keys and "lm_head.weight" not in keys
    loaded = load_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.backbone.embedding.weight
    untied = build(CausalLM, "gated", tie_embeddings=False)
    untied.save_pretrained(tmp_path / "u")
    with safe_open(tmp_path / "u" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" in set(f.keys())


def test_overwrite_and_wrong_class(tmp_path):
    build(CausalLM, "gated").save_pretrained(tmp_path)
    clf = build(SequenceClassifier, "gated", num_classes=2)
    clf.save_pretrained(tmp_path)  # overwrites in place
    assert type(load_pretrained(tmp_path)) is SequenceClassifier
    with pytest.raises(CheckpointError, match="holds a SequenceClassifier, not a CausalLM"):
        CausalLM.from_pretrained(tmp_path)


def test_nothing_is_unpickled(tmp_path, monkeypatch):
    build(CausalLM, "mamba,attn").save_pretrained(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    load_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------- bad files
@pytest.fixture()
def saved(tmp_path):
    build(CausalLM, "mamba,attn", tie_embeddings=False).save_pretrained(tmp_path)
    return tmp_path


def test_truncated_weights_fail_with_path(saved):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*SHA-256"):
        load_pretrained(saved)
    edit_config(saved, lambda m: m.pop("weights_sha256"))  # without the checksum safetensors itself fails
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors"):
        load_pretrained(saved)


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 7, b"not a safetensors file at all", b"\xff" * 64])
def test_corrupt_weights_fail_with_path(saved, garbage):
    (saved / "model.safetensors").write_bytes(garbage)
    edit_config(saved, lambda m: m.pop("weights_sha256"))
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors"):
        load_pretrained(saved)


def test_flipped_byte_is_detected(saved):
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x55  # inside the tensor data: safetensors alone would not notice
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_pretrained(saved)


def test_missing_unexpected_misshaped_tensors_listed(saved):
    def damage(t):
        t.pop("lm_head.weight")
        t.pop("backbone.blocks.0.mixer.A_log")
        t["backbone.blocks.9.extra"] = torch.zeros(2)
        t["backbone.final_norm.weight"] = torch.ones(3)

    rewrite_weights(saved, damage)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(saved)
    msg = str(e.value)
    assert "missing tensors: backbone.blocks.0.mixer.A_log, lm_head.weight" in msg
    assert "unexpected tensors: backbone.blocks.9.extra" in msg
    assert "mis-shaped tensors: backbone.final_norm.weight (3,) (expected (8,))" in msg
    assert "model.safetensors" in msg


def test_wrong_dtype_tensor_listed(saved):
    rewrite_weights(saved, lambda t: t.update({"backbone.final_norm.weight": torch.ones(8, dtype=torch.float64)}))
    with pytest.raises(CheckpointError, match="wrong dtypes: backbone.final_norm.weight torch.float64"):
        load_pretrained(saved)


def test_unknown_config_key_fails_naming_it(saved):
    edit_config(saved, lambda m: m["config"].update(n_head=4))
    with pytest.raises(CheckpointError, match="config.json: config: .*unknown key.*'n_head'"):
        load_pretrained(saved)


def test_bad_config_value_fails_naming_it(saved):
    edit_config(saved, lambda m: m["config"].update(norm="batchnorm"))
    with pytest.raises(CheckpointError, match="config.json: config: .*norm.*'rmsnorm'"):
        load_pretrained(saved)


def test_bad_metadata(saved):
    edit_config(saved, lambda m: m.update(extra=1))
    with pytest.raises(CheckpointError, match="unknown key.*'extra'"):
        load_pretrained(saved)
    edit_config(saved, lambda m: (m.pop("extra"), m.update(head="Seq2Seq")))
    with pytest.raises(CheckpointError, match="unknown head 'Seq2Seq'.*CausalLM"):
        load_pretrained(saved)
    edit_config(saved, lambda m: (m.update(head="CausalLM", ssmkit_format=99)))
    with pytest.raises(CheckpointError, match="ssmkit_format 99"):
        load_pretrained(saved)
    (saved / "config.json").write_text('{"ssmkit_format": 1, "head": ')
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_pretrained(saved)


def test_config_mismatching_weights(saved):
    """A config edited to other sizes: every tensor mismatch is reported."""
    edit_config(saved, lambda m: (m["config"].update(d_model=16), m.pop("weights_sha256")))
    with pytest.raises(CheckpointError, match="mis-shaped tensors: .*backbone.embedding.weight"):
        load_pretrained(saved)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
    build(CausalLM, "gated").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path)


def test_failed_write_leaves_old_checkpoint_and_no_temp(tmp_path, monkeypatch):
    model = build(CausalLM, "gated")
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    import ssmkit.models.checkpoint as ckpt

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        build(CausalLM, "gated", init_std=0.5).save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    load_pretrained(tmp_path)
