"""What a run leaves behind: the caller's RNGs untouched, no files before set-up succeeds, nothing rewritten by a
resume that cannot run, file permissions from the umask, and the warm-up/steps rule."""

from __future__ import annotations

import os
import random
import stat

import numpy as np
import pytest
import torch

from ssmkit.train import LRSchedule, ResumeError, TrainConfig, Trainer, evaluate_model, resolve_run

from .util import TINY_MODEL, params_of, tiny_setup


def _global_states() -> tuple:
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def _assert_same_states(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0])
    assert a[1][0] == b[1][0] and np.array_equal(a[1][1], b[1][1]) and a[1][2:] == b[1][2:]
    assert a[2] == b[2]


def test_trainer_keeps_the_callers_global_rngs(tmp_path):
    """Constructing and training a Trainer leaves torch's, numpy's and Python's global RNGs as they were, and
    what the caller draws from them in between does not change the run (dropout draws from the run's own)."""
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    before = _global_states()
    setup = dict(steps=3, seed=5, model={"dropout": 0.1})
    quiet_run = Trainer(tiny_setup(**setup), tmp_path / "a", quiet=True)
    _assert_same_states(_global_states(), before)
    quiet_run.train()
    _assert_same_states(_global_states(), before)

    busy_run = Trainer(tiny_setup(**setup), tmp_path / "b", quiet=True)
    torch.rand(1000), np.random.rand(10), random.random()  # the caller uses its RNGs between init and train
    busy_run.train()
    a, b = params_of(quiet_run.model), params_of(busy_run.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_fewer_steps_than_done_changes_nothing(tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_setup(steps=3), run, quiet=True).train()
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ResumeError, match=r"train.steps=2 is below the checkpoint's step 3"):
        Trainer(tiny_setup(steps=2), run, resume=True, quiet=True)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
    tr = Trainer(tiny_setup(steps=3), run, resume=True, quiet=True)  # equal: nothing left to do, accepted
    tr.train()
    assert tr.step == 3


def test_no_run_directory_before_set_up_succeeds(tmp_path):
    run = tmp_path / "never"
    with pytest.raises(ValueError, match="batch_size=128 is larger"):
        Trainer(tiny_setup(batch_size=128), run, quiet=True)
    assert not run.exists()
    with pytest.raises(ResumeError, match="no checkpoint"):
        Trainer(tiny_setup(), run, resume=True, quiet=True)
    assert not run.exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_follow_the_umask(tmp_path, umask):
    """Atomic writes (config, metrics, report, checkpoints, the latest pointer) get the mode any open() gets:
    0666 / 0777 minus the umask (tempfile's 0600 / 0700 would hide runs from the group)."""
    old = os.umask(umask)
    try:
        run = tmp_path / "run"
        Trainer(tiny_setup(steps=2, save_every=1, plots=True), run, quiet=True).train()
    finally:
        os.umask(old)
    paths = [p for p in run.rglob("*")]
    names = {p.name for p in paths}
    assert {"config.json", "metrics.csv", "report.md", "loss.png", "latest", "model.safetensors",
            "trainer_state.json", "trainer_state.safetensors"} <= names
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))


def test_warmup_at_most_steps():
    assert TrainConfig(steps=30).warmup == 30 and TrainConfig(steps=3000).warmup == 100
    assert TrainConfig(steps=30).to_dict()["warmup_steps"] is None  # the default follows steps on resume
    assert TrainConfig(steps=30, warmup_steps=30).warmup == 30
    for kind in ("cosine", "linear", "constant"):
        with pytest.raises(ValueError, match=r"train.warmup_steps=31 is invalid: .*\[0, steps=30\]"):
            TrainConfig(steps=30, warmup_steps=31, schedule=kind)
        # warm-up == steps: the peak lr is reached exactly at the last step
        s = LRSchedule.from_config(TrainConfig(steps=5, warmup_steps=5, schedule=kind))
        assert [s.factor(i) for i in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        TrainConfig(warmup_steps=-1)


def test_evaluate_model_rejects_negative_max_batches():
    setup = tiny_setup()
    model = setup.build_model()
    with pytest.raises(ValueError, match=r"max_batches must be an int >= 0 \(0 = all\), got -1"):
        evaluate_model(model, setup.task, "val", 8, -1)


def test_resume_accepts_a_checkpoint_from_before_a_new_task_parameter(tmp_path):
    """A task parameter added later (e.g. text's ``encoding``) is absent from older checkpoints; at its default
    it does not block resuming, at another value it does."""
    import json

    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question. " * 40)
    task = {"name": "text", "path": str(text), "seq_len": 16}

    def setup(steps: int, **task_params):
        return resolve_run({"task": {**task, **task_params}, "model": TINY_MODEL,
                            "train": {"steps": steps, "batch_size": 8, "eval_every": 0, "plots": False}})

    run = tmp_path / "run"
    Trainer(setup(2), run, quiet=True).train()
    state = next(run.glob("checkpoints/step-*/trainer_state.json"))
    meta = json.loads(state.read_text())
    del meta["config"]["task"]["encoding"]
    state.write_text(json.dumps(meta))
    tr = Trainer(setup(3), run, resume=True, quiet=True)
    assert tr.step == 2
    with pytest.raises(ResumeError, match="another task config"):
        Trainer(setup(3, encoding="bytes"), run, resume=True, quiet=True)


def test_resume_accepts_a_checkpoint_from_before_a_new_model_field(tmp_path):
    """ModelConfig fields added later (the muP multipliers) are absent from older checkpoints; at their defaults
    they do not block resuming, at another value they do."""
    import json

    def setup(steps: int, **model):
        return resolve_run({"task": {"name": "mqar", "vocab_size": 32, "seq_len": 16, "num_pairs": 2,
                                     "num_train": 32, "num_val": 8}, "model": {**TINY_MODEL, **model},
                            "train": {"steps": steps, "batch_size": 8, "eval_every": 0, "plots": False}})

    run = tmp_path / "run"
    Trainer(setup(2), run, quiet=True).train()
    state = next(run.glob("checkpoints/step-*/trainer_state.json"))
    meta = json.loads(state.read_text())
    for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
        del meta["config"]["model"][name]
    state.write_text(json.dumps(meta))
    assert Trainer(setup(3), run, resume=True, quiet=True).step == 2
    with pytest.raises(ResumeError, match="differs from the run's model config"):
        Trainer(setup(3, logits_scaling=2.0), run, resume=True, quiet=True)
