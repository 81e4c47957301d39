"""TrainConfig validation, config files, --set overrides and model presets."""

from __future__ import annotations

import json

import pytest

from ssmkit.data import get_task
from ssmkit.train import (
    TrainConfig,
    apply_overrides,
    load_config_file,
    preset_names,
    resolve_model,
    resolve_run,
)
from ssmkit.train.config import parse_literal


def _empty() -> dict:
    return {"task": {"name": "mqar"}, "model": {}, "train": {}}


@pytest.mark.parametrize(("kw", "match"), [
    ({"steps": 0}, "train.steps"), ({"batch_size": -1}, "train.batch_size"), ({"lr": 0.0}, "train.lr"),
    ({"lr": float("nan")}, "train.lr"), ({"batch_size": 6, "grad_accum": 4}, "train.grad_accum"),
    ({"schedule": "exp"}, "'cosine'"), ({"dtype": "float16"}, "train.dtype"), ({"steps": 1.5}, "train.steps"),
    ({"steps": True}, "train.steps"), ({"autocast": "bf16", "dtype": "float64"}, "train.autocast"),
    ({"chunk_len": 0}, "train.chunk_len"), ({"beta2": 1.0}, "train.beta2"),
])
def test_train_config_rejects(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_train_config_accepts_sequence_parallel_with_chunk_len():
    """Sequence parallel and chunked training combine (tests/distributed/test_sequence_parallel_chunked_training.py
    checks the result); self-pretraining still refuses either."""
    cfg = TrainConfig(sequence_parallel=2, chunk_len=64)
    assert (cfg.sequence_parallel, cfg.chunk_len) == (2, 64)
    with pytest.raises(ValueError, match="train.pretrain"):
        TrainConfig(sequence_parallel=2, chunk_len=64, pretrain="ar", pretrain_steps=1)


def test_train_config_from_dict_unknown_key_lists_valid():
    with pytest.raises(ValueError, match="valid keys: steps, batch_size"):
        TrainConfig.from_dict({"stepz": 3})
    assert TrainConfig(batch_size=8, grad_accum=4).micro_batch_size == 2


def test_parse_literal():
    assert parse_literal("1e-3") == 1e-3
    assert parse_literal("12") == 12 and isinstance(parse_literal("12"), int)
    assert parse_literal("true") is True and parse_literal("None") is None
    assert parse_literal("[1, 2]") == [1, 2]
    assert parse_literal("mamba*2,attn") == "mamba*2,attn"


def test_overrides_dotted_bare_and_nested():
    s = apply_overrides(_empty(), ["train.lr=1e-3", "steps=7", "task.seq_len=48", "model.d_model=24",
                                   "model.mixer_options.mamba.d_state=8", "model.pattern=mamba*2,attn",
                                   "train.eval_batch_size=none"])
    assert s["train"] == {"lr": 1e-3, "steps": 7, "eval_batch_size": None}
    assert s["task"] == {"name": "mqar", "seq_len": 48}
    assert s["model"] == {"d_model": 24, "mixer_options": {"mamba": {"d_state": 8}},
                          "pattern": "mamba*2,attn"}


def test_override_task_name_applies_first():
    s = apply_overrides(_empty(), ["task.num_tokens=4", "task.name=selective_copy"])
    assert s["task"] == {"name": "selective_copy", "num_tokens": 4}


@pytest.mark.parametrize(("item", "match"), [
    ("train.stepz=3", r"unknown train key 'stepz'; valid train keys: steps, batch_size"),
    ("model.dmodel=3", r"unknown model key 'dmodel'; valid model keys: preset, head, d_model"),
    ("task.seqlen=3", r"unknown task key 'seqlen'; valid task keys: name, .*seq_len"),
    ("frobnicate=1", r"key 'frobnicate' is unknown; use section.key; valid keys: task\.\{name, vocab_size"),
    ("nosuchsection.x=1", "is unknown"),
    ("train.steps=many", "train.steps must be int"),
    ("task.seq_len=abc", "seq_len"),
    ("train.lr", "expected key=value"),
])
def test_override_errors(item, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(_empty(), [item])


def test_config_files_yaml_and_json(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("task:\n  name: mqar\n  seq_len: 32\nmodel:\n  preset: s4d\ntrain:\n  lr: 3.0e-3\n")
    assert load_config_file(y) == {"task": {"name": "mqar", "seq_len": 32}, "model": {"preset": "s4d"},
                                   "train": {"lr": 3e-3}}
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"train": {"steps": 5}}))
    assert load_config_file(j)["train"] == {"steps": 5}
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian:\n  steps: 3\n")
    with pytest.raises(ValueError, match="unknown section.*'trian'.*valid sections: task, model, train"):
        load_config_file(bad)
    with pytest.raises(ValueError, match="unknown extension"):
        load_config_file(tmp_path / "x.toml") if (tmp_path / "x.toml").write_text("") is not None else None
    with pytest.raises(FileNotFoundError):
        load_config_file(tmp_path / "missing.yaml")


def test_presets_and_model_resolution():
    task = get_task("mqar", vocab_size=32, seq_len=16, num_pairs=2)
    assert {"mamba", "mamba2", "s4d", "gated", "rglru", "attn", "hybrid"} <= set(preset_names())
    spec = resolve_model({"preset": "hybrid", "d_model": 32}, task)
    assert spec.head == "CausalLM" and spec.config.vocab_size == 32 and spec.config.d_model == 32
    assert spec.config.pattern == ["mamba2", "mamba2", "attn", "mamba2", "mamba2"]
    # a per-mixer override keeps the preset's other options
    spec = resolve_model({"preset": "mamba2", "mixer_options": {"mamba2": {"d_state": 8}}}, task)
    assert spec.config.mixer_options["mamba2"] == {"d_state": 8, "headdim": 16}
    # a bare pattern as the model, and leftovers of the preset dropped when the pattern changes
    assert resolve_model({"preset": "gated*2,attn"}, task).config.n_layers == 3
    assert "mamba2" not in resolve_model({"preset": "mamba2", "pattern": "attn"}, task).config.mixer_options
    with pytest.raises(ValueError, match="unknown model 'mamba9'; valid presets: mamba, mamba2"):
        resolve_model({"preset": "mamba9"}, task)
    with pytest.raises(ValueError, match="model.vocab_size is set by the task"):
        resolve_model({"vocab_size": 64}, task)
    with pytest.raises(ValueError, match="valid heads: CausalLM, PrefixLM"):
        resolve_model({"head": "SequenceClassifier"}, task)
    with pytest.raises(ValueError, match="d_model"):
        resolve_model({"d_model": -3}, task)


def test_resolve_run_round_trips_through_its_dict():
    setup = resolve_run({"task": {"name": "mqar", "seq_len": 32, "num_pairs": 4}, "model": {"preset": "attn"},
                         "train": {"steps": 3}})
    d = setup.to_dict()
    again = resolve_run(json.loads(json.dumps(d)))
    assert again.to_dict() == d
    assert again.model.config == setup.model.config


def test_resolve_run_errors():
    with pytest.raises(ValueError, match="unknown task 'mqr'; valid tasks: mqar"):
        resolve_run({"task": {"name": "mqr"}})
    with pytest.raises(ValueError, match="no task given"):
        resolve_run({"task": {}})
    with pytest.raises(ValueError, match="num_pairs"):
        resolve_run({"task": {"name": "mqar", "seq_len": 16, "num_pairs": 40}})


@pytest.mark.parametrize(("seq_len", "chunk_len", "ok"), [(64, 32, True), (64, 30, True), (64, 21, False)])
def test_sequence_parallel_chunks_must_each_split_over_the_ranks(seq_len, chunk_len, ok):
    """Each chunk is itself split over the sequence-parallel ranks, so a last chunk shorter than P is refused
    before training (checked by the trainer once the job has joined; the check itself needs no job)."""
    from types import SimpleNamespace

    from ssmkit.train.trainer import Trainer

    task = get_task("mqar", vocab_size=seq_len + 8, seq_len=seq_len, num_pairs=2,
                    num_train=8, num_val=8)
    fake = SimpleNamespace(sp=4, task=task, cfg=TrainConfig(sequence_parallel=4, chunk_len=chunk_len))
    if ok:
        Trainer._check_sequence_parallel_task(fake)
    else:
        with pytest.raises(ValueError, match=r"train.chunk_len=21 leaves a last chunk of 1 of the task's 64 "
                                             r"positions, fewer than train.sequence_parallel=4"):
            Trainer._check_sequence_parallel_task(fake)
