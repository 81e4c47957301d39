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
  generation, :mod:`ssmkit.experiments.retrieval`);
* MQAR value accuracy per number of key-value pairs after a short MQAR fine-tune.

Layout: ``OUT/<run>/`` is the trainer's run directory (checkpoints, metrics, report) plus ``result.json``;
``OUT/results.json`` gathers every finished run. Runs are resumable: a run with ``result.json`` is only
re-evaluated where an evaluation is missing or its settings changed, one with a checkpoint continues from it
(Ctrl-C saves a checkpoint).
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

from ssmkit.models import CausalLM, load_pretrained
from ssmkit.objectives import ControllerConfig, MixtureBatchSource, birdie_arms, make_mixture, per_row_lm_loss
from ssmkit.objectives.mixtures import BirdieMixture
from ssmkit.objectives.text_task import ObjectiveText
from ssmkit.train import Trainer
from ssmkit.train.build import RunSetup
from ssmkit.train.checkpoints import latest_checkpoint, write_text_atomic
from ssmkit.train.config import TrainConfig
from ssmkit.train.presets import resolve_model
from ssmkit.train.run_dir import CHECKPOINTS

from .aligned_recall import LETTERS, aligned_accuracy, finetune_aligned
from .birdie_config import EVALS, RUNS, BirdieConfig
from .retrieval import (
    finetune_mqar,
    finetune_phonebook,
    infilling_accuracy,
    mqar_accuracy,
    phonebook_digit_accuracy,
    phonebook_length,
)

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
    prefix = mixture.prefix_bidirectional and kind == "ssm" and cfg.prefix_layers
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
        "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
        "warmup_steps": min(cfg.warmup_steps, cfg.steps),
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


def eval_infilling(cfg: BirdieConfig, model: CausalLM, task: ObjectiveText, quiet: bool) -> dict[str, Any]:
    return infilling_accuracy(model, task.vocab, task.split_tokens("val"), seq_len=cfg.seq_len, pad_id=task.pad_id,
                              rows=cfg.infill_rows, seed=cfg.seed + 4321)


def eval_phonebook(cfg: BirdieConfig, model: CausalLM, task: ObjectiveText, quiet: bool) -> dict[str, Any]:
    """Digit accuracy per query count before (a quarter of the examples) and after a phone-book fine-tune of a
    copy of ``model``."""
    vocab = task.vocab
    book = {"digits": cfg.phonebook_digits, "name_parts": cfg.phonebook_name_parts}
    out: dict[str, Any] = {"zero_shot": {}, "finetuned": {}}
    for q in cfg.phonebook_queries:
        out["zero_shot"][str(q)] = phonebook_digit_accuracy(
            model, vocab, num_entries=cfg.phonebook_entries, num_queries=q,
            num_examples=max(8, cfg.phonebook_examples // 4), seed=cfg.seed + 99, **book)
    tuned = copy.deepcopy(model)
    losses = finetune_phonebook(tuned, vocab, steps=cfg.phonebook_steps, batch_size=cfg.phonebook_batch,
                                lr=cfg.phonebook_lr, num_entries=cfg.phonebook_entries,
                                max_queries=max(cfg.phonebook_queries), pad_id=task.pad_id, seed=cfg.seed,
                                quiet=quiet, **book)
    out["finetune_loss"] = _loss_summary(losses)
    for q in cfg.phonebook_queries:
        out["finetuned"][str(q)] = phonebook_digit_accuracy(
            tuned, vocab, num_entries=cfg.phonebook_entries, num_queries=q, num_examples=cfg.phonebook_examples,
            seed=cfg.seed + 1, **book)
    out["max_length"] = phonebook_length(vocab, cfg.phonebook_entries, max(cfg.phonebook_queries), **book)
    out["finetune_losses"] = [round(v, 4) for v in losses]
    return out


def eval_mqar(cfg: BirdieConfig, model: CausalLM, task: ObjectiveText, quiet: bool) -> dict[str, Any]:
    """MQAR value accuracy per number of pairs after an MQAR fine-tune of a copy of ``model``
    (``cfg.mqar_layout``: the layout of :func:`.retrieval.mqar_pair` or of :mod:`.aligned_recall`)."""
    tuned = copy.deepcopy(model)
    common = {"pad_id": task.pad_id}
    if cfg.mqar_layout == "aligned":
        kv = {"num_keys": cfg.mqar_keys or LETTERS,
              "query_fraction": cfg.mqar_query_fraction}
        tune, score = finetune_aligned, aligned_accuracy
    else:
        kv = {"num_keys": cfg.mqar_keys, "interleaved": cfg.mqar_layout == "interleaved",
              "query_fraction": cfg.mqar_query_fraction}
        tune, score = finetune_mqar, mqar_accuracy
    losses = tune(tuned, task.vocab, steps=cfg.mqar_steps, batch_size=cfg.mqar_batch, lr=cfg.mqar_lr,
                  max_pairs=cfg.mqar_train_pairs or max(cfg.mqar_pairs), seed=cfg.seed, quiet=quiet, **common, **kv)
    acc = {str(n): score(tuned, task.vocab, num_pairs=n, num_examples=cfg.mqar_examples, seed=cfg.seed + 2024,
                         **common, **kv) for n in cfg.mqar_pairs}
    return {"accuracy": acc, "finetune_loss": _loss_summary(losses),
            "finetune_losses": [round(v, 4) for v in losses]}


def _loss_summary(losses: list[float]) -> dict[str, float | None]:
    return {"first": losses[0] if losses else None, "last10": float(np.mean(losses[-10:])) if losses else None}


#: evaluation name -> function(cfg, model, task, quiet) -> JSON-able result (keys as in ``EVALS``)
EVAL_FNS = {"infilling": eval_infilling, "phonebook": eval_phonebook, "mqar": eval_mqar}


def _saved_settings(result: dict[str, Any], name: str) -> dict[str, Any] | None:
    if name not in result:
        return None
    settings = result.get("eval_settings", {}).get(name)
    if settings is None:  # results written before eval_settings existed kept them in "config"
        settings = {k: result.get("config", {}).get(k) for k in EVALS[name]}
    return settings


def run_one(cfg: BirdieConfig, name: str, out_dir: str | Path, *, quiet: bool = False) -> dict[str, Any]:
    """Train and evaluate run ``name`` in ``out_dir/name``: a finished run (``result.json``) is only
    re-evaluated where evaluations are missing or their settings changed (from its final checkpoint); an
    interrupted one resumes from its checkpoint."""
    run_dir = Path(out_dir) / name
    done = run_dir / RESULT
    identity = cfg.identity()
    if done.is_file():
        result = json.loads(done.read_text(encoding="utf-8"))
        saved = {k: result.get("config", {}).get(k) for k in identity}
        if saved != identity:
            raise ValueError(f"{done} was produced with another BirdieConfig ("
                             f"{', '.join(k for k in identity if saved[k] != identity[k])} differ); use another "
                             f"output directory")
        todo = [e for e in cfg.evals if _saved_settings(result, e) != cfg.eval_settings(e)]
        if not todo:
            log.info("%s: already finished (%s)", name, done)
            return result
        ckpt = latest_checkpoint(run_dir / CHECKPOINTS)
        if ckpt is None:
            raise FileNotFoundError(f"{run_dir}: evaluations {todo} are due but no checkpoint is left")
        model = load_pretrained(ckpt).eval()
        task = build_task(cfg, prefix_mask=bool(model.backbone.accepts_prefix))
        log.info("%s: evaluating %s from %s", name, ", ".join(todo), ckpt)
    else:
        setup, source = build_run(cfg, name)
        resume = latest_checkpoint(run_dir / CHECKPOINTS) is not None
        trainer = Trainer(setup, run_dir, source=source, resume=resume, quiet=quiet)
        source.loss_fn = row_loss_fn(trainer.model)
        final = trainer.train()
        model, task = trainer.model.eval(), setup.task
        result = {
            "run": name, "mixture": RUNS[name][0], "model_kind": RUNS[name][1], "head": setup.model.head,
            "model": model.summary(), "parameters": model.num_parameters(), "steps": trainer.step,
            "tokens": trainer.tokens_seen, "train_time": trainer.train_time, "val": final,
            "arm_names": source.mixture.arm_names,
            "arm_counts": dict(zip(source.mixture.arm_names, source.counts.tolist(), strict=True)),
        }
        if isinstance(source.mixture, BirdieMixture):
            result["controller_log"] = [{k: e[k] for k in ("step", "action", "explored", "losses", "reward")
                                         if k in e} for e in source.mixture.controller.log]
        todo = list(cfg.evals)
    settings = result.setdefault("eval_settings", {})
    old_threads = torch.get_num_threads()
    if cfg.threads is not None:  # the trainer restores its caller's thread count; evaluations use cfg's too
        torch.set_num_threads(cfg.threads)
    try:
        _evaluate(cfg, model, task, result, settings, todo, identity, done, quiet)
    finally:
        torch.set_num_threads(old_threads)
    return result


def _evaluate(cfg: BirdieConfig, model: CausalLM, task: ObjectiveText, result: dict[str, Any],
              settings: dict[str, Any], todo: list[str], identity: dict[str, Any], done: Path, quiet: bool) -> None:
    for e in todo:
        t = time.perf_counter()
        result[e] = EVAL_FNS[e](cfg, model, task, quiet)
        settings[e] = cfg.eval_settings(e)
        result.setdefault("eval_time", {})
        if not isinstance(result["eval_time"], dict):
            result["eval_time"] = {}
        result["eval_time"][e] = time.perf_counter() - t
        result["config"] = identity
        write_text_atomic(done, json.dumps(result, indent=1) + "\n")


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
        if {k: r.get("config", {}).get(k) for k in cfg.identity()} != cfg.identity():
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
