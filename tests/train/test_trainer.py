"""The training loop: accumulation, autocast, activation checkpointing, seeding, exact resume, outputs."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ssmkit.train import (
    ResumeError,
    TaskBatchSource,
    Trainer,
    enable_activation_checkpointing,
    latest_checkpoint,
    read_training_state,
)
from ssmkit.train.taskio import model_outputs, task_loss

from .util import grads_of, params_of, tiny_setup


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest (and leave the shared machine alone) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def _uneven_batch(setup) -> dict:
    """A batch whose rows score different numbers of positions (some labels dropped)."""
    batch = TaskBatchSource(setup.task, 8, seed=3).next_batch()
    labels = batch["labels"].clone()
    labels[0] = -100  # row 0 scores nothing at all
    for row in range(4, 8):  # rows 4..7 keep only their first scored position
        cols = (labels[row] != -100).nonzero().flatten()
        labels[row, cols[1:]] = -100
    return {**batch, "labels": labels}


def test_grad_accumulation_equals_big_batch(tmp_path):
    grads = []
    for accum in (1, 2, 4):
        setup = tiny_setup(dtype="float64", grad_accum=accum)
        tr = Trainer(setup, tmp_path / f"a{accum}", quiet=True)
        batch = _uneven_batch(setup)
        counts = [int((mb != -100).sum()) for mb in batch["labels"].chunk(accum)]
        assert len(set(counts)) > 1 or accum == 1  # micro-batches really are uneven
        loss = tr.accumulate_gradients(batch)
        grads.append((loss, grads_of(tr.model)))
    ref_loss, ref = grads[0]
    with torch.no_grad():  # the model is the same init (same seed); float32 task loss agrees to 1e-6
        full = tr.task.loss(model_outputs(tr.model, tr.task, batch), batch)
        assert task_loss(tr.task, model_outputs(tr.model, tr.task, batch), batch).dtype == torch.float64
    assert ref_loss == pytest.approx(float(full), rel=1e-6)
    for loss, g in grads[1:]:
        assert loss == pytest.approx(ref_loss, rel=1e-12)
        _assert_same(g, ref, atol=1e-12)


class _MatmulDtypes(TorchDispatchMode):
    """Records the dtypes of the matrix multiplications that run."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.dtypes.append(args[-1].dtype)
        return func(*args, **(kwargs or {}))


def test_bf16_autocast_runs_matmuls_in_bfloat16(tmp_path):
    setup = tiny_setup(autocast="bf16", steps=2)
    tr = Trainer(setup, tmp_path, quiet=True)
    before = params_of(tr.model)
    with _MatmulDtypes() as seen:
        metrics = tr.train()
    assert torch.bfloat16 in seen.dtypes and torch.float32 not in seen.dtypes[:4]
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    name = "backbone.blocks.0.mixer.in_proj.weight"
    assert not torch.equal(before[name], tr.model.state_dict()[name])
    rec = [r for r in tr.metrics.records if r["split"] == "train"]
    assert len(rec) == 2 and all(r["loss"] is not None and r["loss"] > 0 for r in rec)
    assert 0.0 <= metrics["accuracy"] <= 1.0
    # without autocast the same run multiplies in float32 only
    with _MatmulDtypes() as seen32:
        Trainer(tiny_setup(steps=1), tmp_path / "fp32", quiet=True).train()
    assert set(seen32.dtypes) == {torch.float32}


def test_activation_checkpointing_same_gradients(tmp_path):
    setup = tiny_setup(dtype="float64", model={"dropout": 0.1, "mlp": "gelu"})
    batch = TaskBatchSource(setup.task, 8, seed=1).next_batch()
    out = {}
    for ckpt in (False, True):
        tr = Trainer(setup, tmp_path / str(ckpt), quiet=True)
        calls = []
        tr.model.backbone.blocks[0].mixer.register_forward_hook(lambda m, i, o, calls=calls: calls.append(1))
        if ckpt:
            assert enable_activation_checkpointing(tr.model) == 2
            assert enable_activation_checkpointing(tr.model) == 0  # idempotent
        torch.manual_seed(5)  # same dropout masks
        loss = tr.accumulate_gradients(batch)
        out[ckpt] = (loss, grads_of(tr.model), len(calls), list(tr.model.state_dict()))
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-12)
    _assert_same(out[True][1], out[False][1], atol=1e-12)
    assert out[False][2] == 1 and out[True][2] == 2  # the block's forward really was recomputed
    # state_dict names are unchanged by the wrapping
    assert out[True][3] == out[False][3]


def test_seeding_is_deterministic(tmp_path):
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        tr = Trainer(tiny_setup(seed=seed, steps=3, model={"dropout": 0.1}), tmp_path / name, quiet=True)
        tr.train()
        runs.append(params_of(tr.model))
    _assert_same(runs[0], runs[1])
    assert not torch.equal(runs[0]["backbone.embedding.weight"], runs[2]["backbone.embedding.weight"])


def test_resume_is_exact(tmp_path):
    """Stopping after 3 of 7 steps and resuming in a new Trainer equals training straight through: model,
    optimizer moments, schedule, dropout RNG and data position (a 24-example split: epochs roll over)."""
    kw = {"steps": 7, "model": {"dropout": 0.1}, "task": {"num_train": 24}, "eval_every": 2,
          "warmup_steps": 2}
    straight = Trainer(tiny_setup(**kw), tmp_path / "straight", quiet=True)
    straight.train()

    first = Trainer(tiny_setup(**kw), tmp_path / "split", quiet=True)
    first.train(until=3)
    assert first.step == 3 and latest_checkpoint(tmp_path / "split" / "checkpoints").name == "step-00000003"
    del first
    torch.manual_seed(1234)  # scramble the global RNG: resume must not depend on it, nor change it
    caller_rng = torch.get_rng_state()
    second = Trainer(tiny_setup(**kw), tmp_path / "split", resume=True, quiet=True)
    assert second.step == 3 and second.source.state_dict()["position"] == 3  # the whole epoch 0 (3 x 8)
    second.train()
    _assert_same(params_of(second.model), params_of(straight.model))
    a, b = second.optimizer.state_dict()["state"], straight.optimizer.state_dict()["state"]
    for i in a:
        _assert_same(a[i], b[i])
    assert second.source.state_dict() == straight.source.state_dict()
    assert torch.equal(torch.get_rng_state(), caller_rng)
    # the metrics log of the resumed run matches the straight one (losses, lrs, val metrics)
    strip = [{k: v for k, v in r.items() if k in ("step", "split", "loss", "lr", "accuracy")}
             for r in straight.metrics.records]
    got = [{k: v for k, v in r.items() if k in ("step", "split", "loss", "lr", "accuracy")}
           for r in second.metrics.records]
    assert got == strip


def test_resume_rejects_other_config_and_missing_checkpoint(tmp_path):
    with pytest.raises(ResumeError, match="no checkpoint"):
        Trainer(tiny_setup(), tmp_path / "none", resume=True, quiet=True)
    Trainer(tiny_setup(steps=1), tmp_path / "r", quiet=True).train()
    with pytest.raises(ResumeError, match="another model config|differs"):
        Trainer(tiny_setup(model={"d_model": 8}), tmp_path / "r", resume=True, quiet=True)
    # a corrupted optimizer file is detected
    ckpt = latest_checkpoint(tmp_path / "r" / "checkpoints")
    meta, tensors = read_training_state(ckpt)
    assert meta["step"] == 1 and "rng.torch" in tensors and any(k.startswith("optim.") for k in tensors)
    with open(ckpt / "trainer_state.safetensors", "r+b") as f:
        f.seek(-3, 2)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ResumeError, match="SHA-256"):
        Trainer(tiny_setup(), tmp_path / "r", resume=True, quiet=True)


def test_outputs_written(tmp_path):
    setup = tiny_setup(steps=4, eval_every=2, save_every=2, keep_checkpoints=1, plots=True)
    tr = Trainer(setup, tmp_path, quiet=True)
    final = tr.train()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["split"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in lines if r["split"] == "val"] == [2, 4]
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) for r in lines if r["split"] == "train")
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert len(rows) == len(lines) and {"step", "split", "loss", "accuracy"} <= set(rows[0])
    for png in ("loss.png", "metric.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
        import matplotlib.image

        assert matplotlib.image.imread(tmp_path / png).ndim == 3
    report = (tmp_path / "report.md").read_text()
    for field in ("mqar", "chance level: 0.0625", "CausalLM", "parameters:", "tokens/s", "peak memory (RSS)",
                  "wall time", "| accuracy |", "step-00000004"):
        assert field in report, field
    assert f"{tr.model.num_parameters():,}" in report
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["task"]["name"] == "mqar" and cfg["train"]["steps"] == 4 and cfg["model"]["preset"] == "mamba"
    assert (tmp_path / "config.yaml").is_file()
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-00000004"]  # keep_checkpoints=1 pruned step 2
    assert final == tr.last_eval and "accuracy" in final


def test_custom_batch_source_and_on_eval(tmp_path):
    setup = tiny_setup(steps=4, eval_every=2)

    class Source:
        def __init__(self):
            self.inner = TaskBatchSource(setup.task, 8, seed=9)
            self.evals = []
            self.calls = 0

        def next_batch(self):
            self.calls += 1
            return self.inner.next_batch()

        def state_dict(self):
            return {"inner": self.inner.state_dict(), "calls": self.calls}

        def load_state_dict(self, s):
            self.inner.load_state_dict(s["inner"])
            self.calls = s["calls"]

        def on_eval(self, step, metrics):
            self.evals.append((step, set(metrics)))

    src = Source()
    Trainer(setup, tmp_path, source=src, quiet=True).train()
    assert src.calls == 4 and [s for s, _ in src.evals] == [2, 4] and "accuracy" in src.evals[0][1]
    meta, _ = read_training_state(latest_checkpoint(tmp_path / "checkpoints"))
    assert meta["source"]["calls"] == 4


def test_task_batch_source_state_round_trip():
    setup = tiny_setup(task={"num_train": 20})
    a = TaskBatchSource(setup.task, 8, seed=2)
    seen = [a.next_batch()["input_ids"] for _ in range(3)]  # 2 full batches per epoch: rolls over
    assert a.state_dict()["epoch"] == 1 and a.state_dict()["position"] == 1
    assert not torch.equal(seen[0], seen[2])  # fresh data in epoch 1
    b = TaskBatchSource(setup.task, 8, seed=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.next_batch()["input_ids"], b.next_batch()["input_ids"])
    with pytest.raises(ValueError, match="seed"):
        TaskBatchSource(setup.task, 8, seed=3).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="batch_size=32 is larger than the 20 training examples"):
        TaskBatchSource(setup.task, 32)


def test_chunk_len_uses_exact_chunked_training(tmp_path):
    """train.chunk_len runs ssmkit.train.chunked: the same loss and gradients as the whole sequence."""
    out = {}
    for chunk in (None, 5):
        setup = tiny_setup(dtype="float64", grad_accum=2, chunk_len=chunk)
        tr = Trainer(setup, tmp_path / str(chunk), quiet=True)
        batch = _uneven_batch(setup)
        out[chunk] = (tr.accumulate_gradients(batch), grads_of(tr.model))
    assert out[5][0] == pytest.approx(out[None][0], rel=1e-10)
    _assert_same(out[5][1], out[None][1], atol=1e-10)
    with pytest.raises(ValueError, match="chunk_len needs a task of kind 'lm'"):
        from ssmkit.train import resolve_run

        resolve_run({"task": {"name": "listops"}, "train": {"chunk_len": 8}})
