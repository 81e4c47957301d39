"""Self-pretraining (train.pretrain): config errors, batch preparation against hand-made oracles, the phase switch,
and exact resume in the pretraining phase, at the boundary and in the fine-tuning phase."""

from __future__ import annotations

import pytest
import torch

from ssmkit.models import ModelConfig, SequenceClassifier
from ssmkit.train import TrainConfig, Trainer, latest_checkpoint, resolve_run
from ssmkit.train.pretrain import SelfPretrainer

from .util import params_of, tiny_setup

LISTOPS = {"name": "listops", "min_length": 12, "max_length": 24, "max_depth": 3, "num_train": 24, "num_val": 8,
           "num_test": 8}
QUIET = {"batch_size": 8, "eval_every": 0, "save_every": 0, "log_every": 1, "warmup_steps": 1, "plots": False,
         "eval_batch_size": 8}


def _listops_setup(**train):
    return resolve_run({"task": LISTOPS, "model": {"preset": "s4d", "d_model": 16, "n_layers": 2, "dropout": 0.1},
                        "train": {**QUIET, **train}})


@pytest.mark.parametrize(("kw", "field"), [
    ({"pretrain": "mlm"}, "train.pretrain"),
    ({"pretrain_steps": 5}, "train.pretrain_steps"),
    ({"pretrain": "ar"}, "train.pretrain_steps"),
    ({"pretrain": "ar", "pretrain_steps": -1}, "train.pretrain_steps"),
    ({"pretrain": "denoise", "pretrain_steps": 2, "pretrain_mask_rate": 1.0}, "train.pretrain_mask_rate"),
    ({"pretrain": "denoise", "pretrain_steps": 2, "chunk_len": 8}, "train.pretrain"),
])
def test_config_errors_are_one_line_naming_the_field(kw, field):
    with pytest.raises(ValueError) as e:
        TrainConfig(**kw)
    assert str(e.value).startswith(field) and "\n" not in str(e.value)


def test_total_steps_and_ar_needs_a_causal_model():
    assert TrainConfig(steps=7, pretrain="ar", pretrain_steps=3).total_steps == 10
    cfg = ModelConfig(d_model=8, n_layers=1, pattern="bi-s4d", vocab_size=12, num_classes=3)
    with pytest.raises(ValueError, match=r"^train\.pretrain='ar' needs a causal model.*bi-s4d.*denoise$"):
        SelfPretrainer(SequenceClassifier(cfg), "ar", 0.15, 0)
    SelfPretrainer(SequenceClassifier(cfg), "denoise", 0.15, 0)  # denoising works for any backbone


def _classifier(**kw) -> SequenceClassifier:
    torch.manual_seed(0)
    return SequenceClassifier(ModelConfig(d_model=8, n_layers=1, pattern="s4d", num_classes=3, **kw))


def test_ar_targets_skip_padding_and_segment_starts():
    pt = SelfPretrainer(_classifier(vocab_size=20), "ar", 0.15, 0)
    ids = torch.tensor([[3, 4, 5, 6, 0], [7, 8, 9, 10, 11]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    reset = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    b = pt.prepare({"input_ids": ids, "mask": mask, "reset": reset, "labels": torch.tensor([0, 1])}, 0)
    assert torch.equal(b["pt_inputs"], ids)
    want_scored = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0]], dtype=torch.bool)  # not into pad / a new segment
    assert torch.equal(b["pt_scored"], want_scored)
    assert torch.equal(b["pt_targets"][want_scored], torch.tensor([4, 5, 6, 8, 10, 11]))
    assert torch.equal(b["pt_reset"], reset)  # causal, right-padded: nothing real can see the padding
    assert pt.weight(b) == 6
    bi = ModelConfig(d_model=8, n_layers=1, pattern="bi-s4d", vocab_size=20, num_classes=3)
    d = SelfPretrainer(SequenceClassifier(bi), "denoise", 0.15, 0).prepare({"input_ids": ids, "mask": mask}, 0)
    assert torch.equal(d["pt_reset"], torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool))


def test_denoise_corrupts_real_positions_only_and_is_a_function_of_the_step():
    pt = SelfPretrainer(_classifier(vocab_size=20), "denoise", 0.5, seed=3)
    ids = torch.arange(1, 201).reshape(4, 50) % 20
    mask = torch.ones(4, 50, dtype=torch.bool)
    mask[:, 40:] = False
    batch = {"input_ids": ids, "mask": mask}
    a, again, other = pt.prepare(batch, 5), pt.prepare(batch, 5), pt.prepare(batch, 6)
    assert torch.equal(a["pt_scored"], again["pt_scored"]) and torch.equal(a["pt_inputs"], again["pt_inputs"])
    assert not torch.equal(a["pt_scored"], other["pt_scored"])
    scored = a["pt_scored"]
    assert not scored[:, 40:].any() and 0.3 < scored[:, :40].float().mean() < 0.7
    assert torch.equal(a["pt_inputs"][~scored], ids[~scored]) and torch.equal(a["pt_targets"], ids)
    # real-valued inputs: masked positions become 0; the loss is the squared error there
    real = SelfPretrainer(_classifier(d_input=2).double(), "denoise", 0.5, seed=3)
    x = torch.randn(3, 10, 2, dtype=torch.float64) + 5.0
    r = real.prepare({"inputs": x}, 0)
    assert torch.equal(r["pt_inputs"][r["pt_scored"]], torch.zeros(int(r["pt_scored"].sum()), 2))
    assert torch.equal(r["pt_inputs"][~r["pt_scored"]], x[~r["pt_scored"]])
    out = real.net(r["pt_inputs"], r["pt_reset"])
    want = ((out - x) ** 2).mean(-1)[r["pt_scored"]].mean()
    torch.testing.assert_close(real.loss(r), want, rtol=1e-13, atol=0)


def test_phases_pretrain_the_backbone_then_train_the_task(tmp_path):
    tr = Trainer(_listops_setup(steps=2, pretrain="denoise", pretrain_steps=3), tmp_path / "r", quiet=True)
    init = params_of(tr.model)
    tr.train(until=3)  # exactly the pretraining phase
    after = params_of(tr.model)
    assert tr.pretrainer is None and not tr.optimizer.state  # fine-tuning starts with a fresh AdamW
    assert torch.equal(after["classifier.weight"], init["classifier.weight"])  # the task head is not pretrained
    assert not torch.equal(after["backbone.embedding.weight"], init["backbone.embedding.weight"])
    assert tr.source.state_dict()["position"] == 0  # the task's data restarts from the beginning
    tr.train()
    splits = [(r["step"], r["split"]) for r in tr.metrics.records]
    assert splits == [(1, "pretrain"), (2, "pretrain"), (3, "pretrain"), (4, "train"), (5, "train"), (5, "val")]


@pytest.mark.parametrize("stop", [2, 3, 4])
def test_resume_is_exact_across_the_phase_boundary(tmp_path, stop):
    """Stopping in the pretraining phase (2), at its last step (3) or in fine-tuning (4) and resuming equals
    an uninterrupted run bit for bit (dropout, corruption, both optimizers, the rewound data)."""
    kw = {"steps": 3, "pretrain": "denoise", "pretrain_steps": 3, "pretrain_mask_rate": 0.3}
    straight = Trainer(_listops_setup(**kw), tmp_path / "straight", quiet=True)
    straight.train()
    first = Trainer(_listops_setup(**kw), tmp_path / "split", quiet=True)
    first.train(until=stop)
    assert latest_checkpoint(tmp_path / "split" / "checkpoints").name == f"step-{stop:08d}"
    del first
    second = Trainer(_listops_setup(**kw), tmp_path / "split", resume=True, quiet=True)
    assert second.step == stop and (second.pretrainer is not None) == (stop < 3)
    second.train()
    a, b = params_of(second.model), params_of(straight.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [(r["step"], r["split"], r.get("loss")) for r in straight.metrics.records]
    assert [(r["step"], r["split"], r.get("loss")) for r in second.metrics.records] == losses


def test_ar_on_real_valued_inputs_trains_the_backbone(tmp_path):
    setup = tiny_setup(steps=1, pretrain="ar", pretrain_steps=2, model={"preset": "mamba"})
    tr = Trainer(setup, tmp_path / "ar", quiet=True)
    tr.train()
    assert [r["split"] for r in tr.metrics.records][:2] == ["pretrain", "pretrain"]
    digits = resolve_run({"task": {"name": "sdigits", "mode": "row"}, "model": {"preset": "s4d", "d_model": 8},
                          "train": {**QUIET, "steps": 1, "pretrain": "ar", "pretrain_steps": 2}})
    tr = Trainer(digits, tmp_path / "digits", quiet=True)
    before = params_of(tr.model)
    tr.train(until=2)
    assert not torch.equal(params_of(tr.model)["backbone.input_proj.weight"], before["backbone.input_proj.weight"])
