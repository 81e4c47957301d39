"""The Birdie comparison at CPU scale: the same model, data and token budget under different objective mixtures.

    from ssmkit.experiments.birdie import BirdieConfig, run_birdie
    results = run_birdie(BirdieConfig(text="shakespeare.txt"), "runs/birdie")

Each run (:data:`~ssmkit.experiments.birdie_config.RUNS`) pretrains a fresh model with the :class:`Trainer` on a
:class:`~ssmkit.objectives.MixtureBatchSource` over the training text (byte-level, every Birdie arm at
``length_scale``), the Birdie runs adapting their mixture to per-arm validation losses on the controller's
schedule. Then, on held-out text and generated phone books, it measures

* next-token loss / perplexity (:class:`~ssmkit.objectives.text_task.ObjectiveText` validation split);
* infilling accuracy (15% masked, mean span 3; teacher-forced, :func:`.retrieval.infilling_accuracy`);
* phone-book digit accuracy for each query count, before and after a short phone-book fine-tune (greedy
  generation, :mod:`ssmkit.experiments.retrieval`).

Layout: ``OUT/<run>/`` is the trainer's run directory (checkpoints, metrics, report) plus ``result.json``;
``OUT/results.json`` gathers every finished run. Runs are resumable: a run with ``result.json`` is skipped, one
with a checkpoint continues from it (Ctrl-C saves a checkpoint).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssmkit.models import CausalLM
from ssmkit.objectives import ControllerConfig, MixtureBatchSource, birdie_arms, make_mixture, per_row_lm_loss
from ssmkit.objectives.mixtures import BirdieMixture
from ssmkit.objectives.text_task import ObjectiveText
from ssmkit.train import Trainer
from ssmkit.train.build import RunSetup
from ssmkit.train.checkpoints import latest_checkpoint, write_text_atomic
from ssmkit.train.config import TrainConfig
from ssmkit.train.presets import resolve_model
from ssmkit.train.run_dir import CHECKPOINTS

from .birdie_config import RUNS, BirdieConfig
from .retrieval import finetune_phonebook, infilling_accuracy, phonebook_digit_accuracy, phonebook_length

log = logging.getLogger("ssmkit.birdie")

RESULT = "result.json"


def build_task(cfg: BirdieConfig, prefix_mask: bool) -> ObjectiveText:
    return ObjectiveText(path=cfg.text, seq_len=cfg.seq_len, val_fraction=cfg.val_fraction,
                         num_placeholders=cfg.num_placeholders, prefix_mask=prefix_mask)


def controller_config(cfg: BirdieConfig) -> ControllerConfig:
    """The paper's controller schedule times ``cfg.controller_scale``, the exploration decay over
    ``cfg.explore_decay_steps`` (default: the whole run) and the configured reward-model size."""
    c = ControllerConfig(hidden=cfg.reward_hidden, num_layers=cfg.reward_layers, fit_steps=cfg.reward_fit_steps,
                         seed=cfg.seed).scaled(cfg.controller_scale)
    return dataclasses.replace(c, explore_decay_steps=cfg.explore_decay_steps or cfg.steps)


def build_run(cfg: BirdieConfig, name: str) -> tuple[RunSetup, MixtureBatchSource]:
    """The trainer setup and batch source of run ``name``."""
    if name not in RUNS:
        raise ValueError(f"unknown run {name!r}; expected one of {', '.join(RUNS)}")
    mixture_name, kind = RUNS[name]
    probe = ObjectiveText(path=cfg.text, seq_len=cfg.seq_len, val_fraction=cfg.val_fraction,
                          num_placeholders=cfg.num_placeholders)
    arms = birdie_arms(probe.vocab, length_scale=cfg.length_scale)
    mixture = make_mixture(mixture_name, arms, config=controller_config(cfg))
    prefix = mixture.prefix_bidirectional and kind == "ssm"
    task = build_task(cfg, prefix)
    if kind == "ssm":
        model = {"preset": cfg.mixer, "pattern": f"{cfg.mixer}*{cfg.n_layers}"}
    else:
        model = {"preset": "attn", "pattern": f"attn*{cfg.n_layers}",
                 "mixer_options": {"attn": {"n_heads": cfg.transformer_heads, "rotary": True}}}
    model.update(head="PrefixLM" if prefix else "CausalLM", d_model=cfg.d_model, mlp="swiglu",
                 mlp_ratio=cfg.mlp_ratio)
    spec = resolve_model(model, task)
    eval_batch = 16
    train = TrainConfig.from_dict({
        "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "warmup_steps": cfg.warmup_steps,
        "seed": cfg.seed, "eval_every": cfg.eval_every, "eval_batch_size": eval_batch,
        "eval_batches": -(-cfg.eval_rows // eval_batch), "log_every": 10, "save_every": max(cfg.eval_every, 50),
        "threads": cfg.threads, "plots": True})
    source = MixtureBatchSource(task.split_tokens("train"), mixture, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                                pad_id=task.pad_id, seed=cfg.seed, val_tokens=task.split_tokens("val"),
                                val_rows=cfg.val_rows, prefix_mask=prefix)
    return RunSetup(task=task, model=spec, train=train), source


def row_loss_fn(model: CausalLM):
    """batch -> per-row next-token losses (rows,), in eval mode (the controller's per-arm validation loss)."""

    def fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        was = model.training
        model.eval()
        try:
            kw = {k: batch[k] for k in ("reset", "prefix_mask") if k in batch}
            return per_row_lm_loss(model(batch["input_ids"], **kw).logits, batch["labels"])
        finally:
            model.train(was)

    return fn


def evaluate_run(cfg: BirdieConfig, model: CausalLM, task: ObjectiveText, quiet: bool = True) -> dict[str, Any]:
    """Infilling and phone-book evaluations (the latter before and after a phone-book fine-tune of a copy)."""
    vocab = task.vocab
    out: dict[str, Any] = {}
    t = time.perf_counter()
    out["infilling"] = infilling_accuracy(model, vocab, task.split_tokens("val"), seq_len=cfg.seq_len,
                                          pad_id=task.pad_id, rows=cfg.infill_rows, seed=cfg.seed + 4321)
    pb = {"zero_shot": {}, "finetuned": {}}
    for q in cfg.phonebook_queries:
        pb["zero_shot"][str(q)] = phonebook_digit_accuracy(
            model, vocab, num_entries=cfg.phonebook_entries, num_queries=q,
            num_examples=max(8, cfg.phonebook_examples // 4), seed=cfg.seed + 99)
    tuned = copy.deepcopy(model)
    losses = finetune_phonebook(tuned, vocab, steps=cfg.phonebook_steps, batch_size=cfg.phonebook_batch,
                                lr=cfg.phonebook_lr, num_entries=cfg.phonebook_entries,
                                max_queries=max(cfg.phonebook_queries), pad_id=task.pad_id, seed=cfg.seed,
                                quiet=quiet)
    pb["finetune_loss"] = {"first": losses[0] if losses else None, "last10": float(np.mean(losses[-10:]))
                           if losses else None}
    for q in cfg.phonebook_queries:
        pb["finetuned"][str(q)] = phonebook_digit_accuracy(
            tuned, vocab, num_entries=cfg.phonebook_entries, num_queries=q, num_examples=cfg.phonebook_examples,
            seed=cfg.seed + 1)
    pb["max_length"] = phonebook_length(vocab, cfg.phonebook_entries, max(cfg.phonebook_queries))
    out["phonebook"] = pb
    out["eval_time"] = time.perf_counter() - t
    return out


def run_one(cfg: BirdieConfig, name: str, out_dir: str | Path, *, quiet: bool = False) -> dict[str, Any]:
    """Train and evaluate run ``name`` in ``out_dir/name`` (resuming or skipping finished work)."""
    run_dir = Path(out_dir) / name
    done = run_dir / RESULT
    if done.is_file():
        saved = json.loads(done.read_text(encoding="utf-8"))
        if saved.get("config") == cfg.identity():
            log.info("%s: already finished (%s)", name, done)
            return saved
        raise ValueError(f"{done} was produced with another BirdieConfig; use another output directory")
    setup, source = build_run(cfg, name)
    resume = latest_checkpoint(run_dir / CHECKPOINTS) is not None
    trainer = Trainer(setup, run_dir, source=source, resume=resume, quiet=quiet)
    source.loss_fn = row_loss_fn(trainer.model)
    t = time.perf_counter()
    final = trainer.train()
    model = trainer.model.eval()
    result: dict[str, Any] = {
        "run": name, "mixture": RUNS[name][0], "model_kind": RUNS[name][1], "head": setup.model.head,
        "model": model.summary(), "parameters": model.num_parameters(), "steps": trainer.step,
        "tokens": trainer.tokens_seen, "train_time": trainer.train_time, "val": final,
        "arm_counts": dict(zip(source.mixture.arm_names, source.counts.tolist(), strict=True)),
    }
    if isinstance(source.mixture, BirdieMixture):
        result["controller_log"] = [{k: v for k, v in e.items() if k in ("step", "action", "explored", "losses",
                                                                           "reward")}
                                    for e in source.mixture.controller.log]
    result.update(evaluate_run(cfg, model, setup.task, quiet=quiet))
    result["wall_time"] = time.perf_counter() - t
    result["arm_names"] = source.mixture.arm_names
    result["config"] = cfg.identity()
    write_text_atomic(done, json.dumps(result, indent=1) + "\n")
    return result


def collect_results(cfg: BirdieConfig, out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The finished runs in ``out_dir`` made with ``cfg``'s settings, in :data:`RUNS` order (runs of other
    settings are skipped with a warning)."""
    out = Path(out_dir)
    results = {}
    for name in RUNS:
        path = out / name / RESULT
        if not path.is_file():
            continue
        r = json.loads(path.read_text(encoding="utf-8"))
        if r.get("config") != cfg.identity():
            log.warning("%s: made with other settings; left out", path)
            continue
        results[name] = r
    return results


def run_birdie(cfg: BirdieConfig, out_dir: str | Path, *, quiet: bool = False) -> dict[str, dict[str, Any]]:
    """Every run of ``cfg.runs`` (see :func:`run_one`), one after the other; then ``out_dir/results.json``
    gathers all finished runs of these settings (also those of other processes working on the same directory
    with other ``runs``), and the report and plots are written. Returns the gathered results."""
    from .birdie_report import write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in cfg.runs:
        log.info("run %s: %d steps of %d x %d tokens", name, cfg.steps, cfg.batch_size, cfg.seq_len)
        run_one(cfg, name, out, quiet=quiet)
    results = collect_results(cfg, out)
    write_text_atomic(out / "results.json", json.dumps(results, indent=1) + "\n")
    write_report(results, out)
    return results
