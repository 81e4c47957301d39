"""The ``ssmkit`` command: train, eval, generate, tasks, models, bench, birdie and demo.

    ssmkit train --task mqar --model mamba --set task.seq_len=64 --set train.steps=500 --run-dir runs/mqar
    ssmkit eval runs/mqar
    ssmkit generate runs/mqar --example 0
    ssmkit tasks | ssmkit models | ssmkit bench | ssmkit demo

Errors in what the user typed (unknown names, bad values) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

EXIT_USAGE = 2

#: the main job (``ssmkit demo`` / ``make demo``): a small Mamba on selective copying (Mamba paper, sec. 3.1)
DEMO_TASK = "selective_copy"
DEMO_MODEL = "mamba"
DEMO_SETS = (
    "task.vocab_size=10", "task.seq_len=32", "task.num_tokens=4", "task.num_train=20000",
    "model.d_model=64", "train.steps=600", "train.batch_size=32", "train.lr=3e-3", "train.warmup_steps=50",
    "train.eval_every=100", "train.save_every=200", "train.threads=1",
)
DEMO_RUN_DIR = "runs/demo"


class UsageError(ValueError):
    """A mistake in the command line (printed as one line, exit status 2)."""


# ------------------------------------------------------------------------------------------- helpers
def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("ssmkit")
    if not any(getattr(h, "_ssmkit_cli", False) for h in logger.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        h._ssmkit_cli = True  # type: ignore[attr-defined]
        logger.addHandler(h)
        logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _find_run(path: str) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) from a run directory or one of its checkpoint directories."""
    from .train.checkpoints import STATE_JSON, latest_checkpoint
    from .train.run_dir import CHECKPOINTS

    p = Path(path)
    if not p.exists():
        raise UsageError(f"{path}: no such run directory")
    if (p / STATE_JSON).is_file():
        return p.parent.parent, p
    ckpt = latest_checkpoint(p / CHECKPOINTS)
    if ckpt is None:
        raise UsageError(f"{path}: no checkpoint found (expected {p / CHECKPOINTS}/step-*/); train first "
                         f"with `ssmkit train --run-dir {path}`")
    return p, ckpt


def _load_run(path: str) -> tuple[Path, Path, Any, Any, dict]:
    """(run dir, checkpoint dir, task, model, run config) of a trained run."""
    from .models import load_pretrained
    from .train import resolve_task
    from .train.run_dir import read_config

    run_dir, ckpt = _find_run(path)
    config = read_config(run_dir)
    task = resolve_task(config["task"])
    model = load_pretrained(ckpt)
    return run_dir, ckpt, task, model, config


# ------------------------------------------------------------------------------------------- train
_OUTPUTS = ("config.json", "config.yaml", "metrics.jsonl", "metrics.csv", "loss.png", "metric.png",
            "report.md")


def _clear_outputs(run_dir: Path) -> None:
    """Remove a previous run's outputs (only ssmkit's own files) for --overwrite."""
    for name in _OUTPUTS:
        (run_dir / name).unlink(missing_ok=True)
    for p in run_dir.glob("eval_*.json"):
        p.unlink()
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def _train_sections(args: argparse.Namespace, run_dir: Path | None) -> dict[str, dict[str, Any]]:
    from .train import apply_overrides, load_config_file
    from .train.run_dir import read_config

    if args.resume:
        if args.config:
            raise UsageError("--config cannot be combined with --resume (the run's own config.json is used; "
                             "change train settings with --set train.KEY=VALUE)")
        base = read_config(run_dir)
        for flag, section, key in (("task", "task", "name"), ("model", "model", "preset")):
            given = getattr(args, flag)
            if given is not None and given != base[section].get(key):
                raise UsageError(f"--{flag} {given} differs from the run's {section}.{key}="
                                 f"{base[section].get(key)!r}; a resumed run keeps its {section}")
        return apply_overrides(base, args.set or [])
    sections = load_config_file(args.config) if args.config else {"task": {}, "model": {}, "train": {}}
    if args.task is not None:
        if sections["task"].get("name") not in (None, args.task):
            sections["task"] = {}  # parameters of the file's task do not apply to another task
        sections["task"]["name"] = args.task
    if args.model is not None:
        sections["model"]["preset"] = args.model
    if not sections["task"].get("name"):
        from .data import TASKS

        raise UsageError(f"no task given: use --task NAME (one of {', '.join(TASKS)}) or task.name in "
                         f"--config")
    return apply_overrides(sections, args.set or [])


def cmd_train(args: argparse.Namespace) -> int:
    from .train import Trainer, resolve_run

    _setup_logging(args.quiet)
    run_dir = Path(args.run_dir) if args.run_dir else None
    if args.resume and run_dir is None:
        raise UsageError("--resume needs --run-dir DIR (the run to continue)")
    sections = _train_sections(args, run_dir)
    setup = resolve_run(sections)
    if run_dir is None:
        run_dir = Path("runs") / _slug(f"{setup.task.name}-{setup.model.preset}")
    if not args.resume and run_dir.exists() and any(run_dir.iterdir()):
        if not args.overwrite:
            raise UsageError(f"run directory {run_dir} exists and is not empty; use --resume to continue it, "
                             f"--overwrite to start over, or another --run-dir")
        _clear_outputs(run_dir)
    log = logging.getLogger("ssmkit.train")
    trainer = Trainer(setup, run_dir, resume=args.resume, quiet=args.quiet)
    log.info("%s  (%s parameters)", trainer.model.summary(), f"{trainer.model.num_parameters():,}")
    log.info("task %s: %s; chance level %s; run directory %s", setup.task.name, setup.task.description,
             setup.task.chance_level, run_dir)
    from .train import TrainingInterrupted

    try:
        metrics = trainer.train()
    except TrainingInterrupted as e:
        print(f"interrupted at step {e.step}/{setup.train.steps}; checkpoint saved to {e.checkpoint}\n"
              f"continue with: ssmkit train --resume --run-dir {run_dir}", file=sys.stderr)
        return 128 + e.signum
    m = setup.task.metric
    chance = setup.task.chance_level
    print(f"done: step {trainer.step}/{setup.train.steps}, val {m} {metrics.get(m, float('nan')):.4f}"
          + (f" (chance {chance:.4g})" if chance is not None else ""))
    print(f"report:     {run_dir / 'report.md'}")
    print(f"plots:      {run_dir / 'loss.png'}, {run_dir / 'metric.png'}")
    print(f"metrics:    {run_dir / 'metrics.jsonl'}, {run_dir / 'metrics.csv'}")
    print(f"checkpoint: {trainer.last_checkpoint}")
    return 0


# ------------------------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from .train import evaluate_model
    from .train.checkpoints import write_text_atomic

    _setup_logging(True)
    run_dir, ckpt, task, model, config = _load_run(args.run_dir)
    if args.split not in task.splits:
        raise UsageError(f"--split {args.split!r}: task {task.name!r} has splits {', '.join(task.splits)}")
    bs = args.batch_size or config["train"].get("eval_batch_size") or config["train"].get("batch_size", 32)
    t = time.perf_counter()
    metrics = evaluate_model(model, task, args.split, bs, args.max_batches)
    secs = time.perf_counter() - t
    out = {"checkpoint": str(ckpt), "split": args.split, "metric": task.metric,
           "chance_level": task.chance_level, "metrics": metrics, "seconds": secs}
    write_text_atomic(run_dir / f"eval_{args.split}.json", json.dumps(out, indent=2) + "\n")
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"checkpoint {ckpt} on task {task.name} ({args.split} split, {secs:.1f} s)")
    for k, v in metrics.items():
        mark = "  <- headline" if k == task.metric else ""
        print(f"  {k:>20s}: {v:.4f}{mark}")
    if task.chance_level is not None:
        print(f"  {'chance level':>20s}: {task.chance_level:.4f}")
    return 0


# ------------------------------------------------------------------------------------------- generate
def _tokenizer_of(config: dict) -> Any:
    params = config["task"]
    if "tokenizer" not in params:
        return None
    from .data import get_tokenizer

    return get_tokenizer(params["tokenizer"], params.get("bpe_dir") or None)


def _parse_ids(text: str, vocab_size: int) -> list[int]:
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    if not parts:
        raise UsageError("--prompt is empty; give token ids separated by spaces or commas, e.g. "
                         "--prompt '5 9 12'")
    ids = []
    for p in parts:
        try:
            ids.append(int(p))
        except ValueError:
            raise UsageError(f"--prompt: {p!r} is not a token id; this task takes token ids in "
                             f"[0, {vocab_size}) separated by spaces or commas") from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UsageError(f"--prompt: token id {bad[0]} is outside [0, vocab_size={vocab_size})")
    return ids


def _example_prompt(task: Any, index: int) -> tuple[list[int], list[int]]:
    """(prompt ids, expected continuation) from validation example ``index``: the prompt ends at the first
    scored position (for language modelling, where nearly every position is scored, at the middle); the
    expected continuation is the run of labels that the following inputs repeat (teacher forcing): at least
    one token, at most 64."""
    n = task.num_examples("val")
    if not 0 <= index < n:
        raise UsageError(f"--example {index}: the validation split has examples 0..{n - 1}")
    batch = next(itertools.islice(task.batches("val", 1, 0), index, None))
    ids = batch["input_ids"][0]
    labels = batch["labels"][0]
    if "mask" in batch:
        keep = int(batch["mask"][0].sum())
        ids, labels = ids[:keep], labels[:keep]
    scored = (labels != -100).nonzero().flatten().tolist()
    if not scored:
        raise UsageError(f"--example {index}: the example has no scored position")
    dense = len(scored) >= len(ids) // 2  # language modelling: (nearly) every position is scored
    start = len(ids) // 2 if dense else 0
    p = next((s for s in scored if s >= start), scored[0])
    expected = [int(labels[p])]
    q = p + 1
    while (q < len(ids) and len(expected) < 64 and labels[q] != -100
           and int(ids[q]) == int(labels[q - 1])):
        expected.append(int(labels[q]))
        q += 1
    return [int(i) for i in ids[: p + 1]], expected


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .infer import generate, quantize_weights
    from .models import CausalLM

    _setup_logging(True)
    run_dir, ckpt, task, model, config = _load_run(args.run_dir)
    if not isinstance(model, CausalLM):
        raise UsageError(f"generate needs a language model; {run_dir} holds a {type(model).__name__} for the "
                         f"{task.kind} task {task.name!r} (use `ssmkit eval` instead)")
    if args.int8:
        model = quantize_weights(model)
    if (args.prompt is None) == (args.example is None):
        raise UsageError("give exactly one of --prompt TEXT_OR_IDS and --example INDEX")
    tok = _tokenizer_of(config)
    vocab = model.config.vocab_size
    if args.example is not None:
        jobs = [(i, *_example_prompt(task, i)) for i in args.example]
    elif tok is not None:
        text = args.prompt.encode("utf-8").decode("unicode_escape") if args.escapes else args.prompt
        jobs = [(None, tok.encode(text), None)]
        if not jobs[0][1]:
            raise UsageError("--prompt is empty")
    else:
        jobs = [(None, _parse_ids(args.prompt, vocab), None)]
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    eos = getattr(tok, "eos_id", None) if tok is not None else None

    def show(ids: list[int]) -> str:
        return repr(tok.decode(ids)) if tok is not None else " ".join(map(str, ids))

    print(f"checkpoint: {ckpt}")
    total_hits = total = 0
    for index, prompt, expected in jobs:
        n_new = args.max_new_tokens
        if n_new is None:
            n_new = len(expected) if expected is not None else (64 if tok is not None else 8)
        out = generate(model, torch.tensor([prompt]), n_new, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, eos_token_id=eos, seed=args.seed)[0].tolist()
        if eos is not None and eos in out:
            out = out[: out.index(eos) + 1]
        head = "" if index is None else f"example {index}: "
        print(f"{head}prompt ({len(prompt)} tokens): {show(prompt)}")
        print(f"{' ' * len(head)}generated ({len(out)} tokens): {show(out)}")
        if expected is not None:
            hits = sum(a == b for a, b in zip(out, expected, strict=False))
            total_hits, total = total_hits + hits, total + len(expected)
            print(f"{' ' * len(head)}expected: {show(expected)}   ({hits}/{len(expected)} tokens match)")
    if total and len(jobs) > 1:
        print(f"{total_hits}/{total} expected tokens generated")
    return 0


# ------------------------------------------------------------------------------------------- listings
def cmd_tasks(args: argparse.Namespace) -> int:
    from .data import format_task_list

    print(format_task_list(common=args.all_params))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import CausalLM, ModelConfig, compress_pattern, mixer_names
    from .train.presets import ALIASES, PRESETS, preset_fields

    vocab = args.vocab_size
    print(f"Model presets (--model NAME; parameter counts for a CausalLM with vocab_size={vocab}):\n")
    rows = []
    for name, (desc, _) in PRESETS.items():
        fields = preset_fields(name)
        try:
            model = CausalLM(ModelConfig(**fields, vocab_size=vocab))
            count = f"{model.num_parameters():,}"
            pattern = compress_pattern(model.backbone.mixer_names)
        except Exception as e:  # noqa: BLE001 - list the preset even if one mixer cannot be built here
            count, pattern = "?", f"({type(e).__name__}: {e})"
        rows.append((name, count, f"d_model={fields['d_model']}", pattern, desc))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"  {'preset':<{widths[0]}}  {'params':>{widths[1]}}  {'width':<{widths[2]}}  "
          f"{'pattern':<{widths[3]}}  description")
    for name, count, width, pattern, desc in rows:
        print(f"  {name:<{widths[0]}}  {count:>{widths[1]}}  {width:<{widths[2]}}  "
              f"{pattern:<{widths[3]}}  {desc}")
    print(f"\n  aliases: {', '.join(f'{a} = {b}' for a, b in ALIASES.items())}")
    print(f"\nMixers (for a custom block pattern: --model 'mamba2*2,attn' or --set model.pattern=...):\n  "
          f"{', '.join(mixer_names())}")
    print("\nOverride any field: --set model.d_model=128 --set model.mlp=swiglu "
          "--set model.mixer_options.mamba.d_state=8")
    return 0


# ------------------------------------------------------------------------------------------- bench
def _bench_script() -> Path | None:
    here = Path(__file__).resolve()
    for root in (Path.cwd(), *here.parents):
        cand = root / "benchmarks" / "bench_ops.py"
        if cand.is_file():
            return cand
    return None


def _builtin_bench() -> None:
    import torch

    from .models import CausalLM, ModelConfig
    from .ops import selective_scan

    def timed(fn, repeat: int = 3) -> float:
        fn()
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    g = torch.Generator().manual_seed(0)
    b, length, d, n = 1, 2048, 256, 16
    u, dt = torch.randn(b, length, d, generator=g), torch.randn(b, length, d, generator=g)
    a = -torch.rand(d, n, generator=g) - 0.5
    bm, cm = torch.randn(b, length, n, generator=g), torch.randn(b, length, n, generator=g)
    s = timed(lambda: selective_scan(u, dt, a, bm, cm, delta_softplus=True))
    print(f"selective_scan forward  (batch 1, length {length}, dim {d}, N {n}): {s * 1e3:8.2f} ms, "
          f"{length / s:,.0f} positions/s")
    model = CausalLM(ModelConfig(d_model=128, pattern="mamba*2", vocab_size=256)).eval()
    ids = torch.randint(0, 256, (4, 256), generator=g)
    with torch.no_grad():
        s = timed(lambda: model(ids))
    print(f"Mamba LM forward        (2 layers, d_model 128, 4 x 256 tokens):   {s * 1e3:8.2f} ms, "
          f"{ids.numel() / s:,.0f} tokens/s")
    state = model.init_state(4)
    tok = ids[:, 0]
    with torch.no_grad():
        s = timed(lambda: model.step(tok, state), repeat=20)
    print(f"Mamba LM recurrent step (batch 4):                                 {s * 1e3:8.3f} ms/token")
    print(f"(torch threads: {torch.get_num_threads()}; on a busy machine --set train.threads=1 is often "
          f"faster)")


def cmd_bench(args: argparse.Namespace) -> int:
    script = None if args.builtin else _bench_script()
    if script is None:
        print("running the built-in timing (benchmarks/bench_ops.py not found)" if not args.builtin else
              "running the built-in timing")
        _builtin_bench()
        return 0
    cmd = [sys.executable, str(script), *(["--quick"] if not args.full else []), *args.extra]
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)


# ------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    run_dir = args.run_dir
    me = [sys.executable, "-m", "ssmkit.cli"]
    train = ["train", "--task", DEMO_TASK, "--model", DEMO_MODEL, *itertools.chain.from_iterable(
        ("--set", s) for s in (*DEMO_SETS, *(args.set or []))), "--run-dir", run_dir, "--overwrite"]
    if args.quiet:
        train.append("--quiet")
    steps = [
        ("train a small Mamba on selective copying: remember 4 tokens scattered among 32 blanks", train),
        ("evaluate the saved checkpoint in a fresh process", ["eval", run_dir]),
        ("generate from the checkpoint: prompted with the blanks, the scattered tokens and the first marker, "
         "the model must emit the first scattered token (validation examples 0-4)",
         ["generate", run_dir, "--example", "0", "1", "2", "3", "4"]),
    ]
    t0 = time.perf_counter()
    for i, (what, argv) in enumerate(steps, 1):
        print(f"\n=== [{i}/{len(steps)}] {what}\n$ ssmkit {' '.join(_quote(a) for a in argv)}", flush=True)
        rc = subprocess.call([*me, *argv])
        if rc != 0:
            print(f"demo: step {i} failed with exit status {rc}", file=sys.stderr)
            return rc
    print(f"\n=== done in {time.perf_counter() - t0:.0f} s. The run directory {run_dir}/ holds report.md, "
          f"loss.png, metric.png, metrics.jsonl/.csv, config.json/.yaml and checkpoints/.")
    return 0


def _quote(a: str) -> str:
    return a if re.fullmatch(r"[A-Za-z0-9_./=,:+-]+", a) else "'" + a.replace("'", "'\\''") + "'"


# ------------------------------------------------------------------------------------------- birdie
def _default_text() -> str:
    """../shared/data/tinyshakespeare.txt next to the working directory or to this checkout."""
    here = Path(__file__).resolve()
    for base in (Path.cwd(), *here.parents[:4]):
        cand = base.parent / "shared" / "data" / "tinyshakespeare.txt"
        if cand.is_file():
            return str(cand)
    raise FileNotFoundError("--text: no text given and ../shared/data/tinyshakespeare.txt was not found; pass "
                            "--text PATH (a UTF-8 text file)")


def _birdie_config(args: argparse.Namespace) -> Any:
    import yaml

    from .experiments.birdie_config import QUICK, RUNS, BirdieConfig

    fields = dict(QUICK) if args.quick else {}
    fields["text"] = args.text or _default_text()
    if args.runs:
        runs = tuple(r.strip() for r in args.runs.split(",") if r.strip())
        unknown = [r for r in runs if r not in RUNS]
        if unknown:
            raise UsageError(f"--runs: unknown run(s) {unknown}; choose from {', '.join(RUNS)}")
        fields["runs"] = runs
    known = set(BirdieConfig.__dataclass_fields__)
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        v = yaml.safe_load(value)
        fields[key] = tuple(v) if isinstance(v, list) else v
    return BirdieConfig.from_dict(fields)


def cmd_birdie(args: argparse.Namespace) -> int:
    from .experiments.birdie import collect_results, run_birdie
    from .experiments.birdie_report import markdown_table, write_report
    from .train.trainer import TrainingInterrupted

    _setup_logging(args.quiet)
    cfg = _birdie_config(args)
    out = Path(args.out)
    if args.report_only:
        results = collect_results(cfg, out)
        write_report(results, out)
    else:
        print(f"birdie: {len(cfg.runs)} run(s) of {cfg.steps} steps ({cfg.steps * cfg.batch_size * cfg.seq_len} "
              f"tokens each) on {cfg.text} -> {out}/", flush=True)
        try:
            results = run_birdie(cfg, out, quiet=args.quiet)
        except TrainingInterrupted as e:
            print(f"ssmkit birdie: {e}; run the same command again to continue", file=sys.stderr)
            return 130
    print(markdown_table(results), end="")
    print(f"results: {out / 'results.json'}, report and plots: {out}/")
    return 0


# ------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="ssmkit", description="State space sequence models on CPU: train, "
                                     "evaluate and generate.", formatter_class=fmt,
                                     epilog="Run `ssmkit COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model on a task", formatter_class=fmt, description=(
        "Train a model on a task; writes metrics.jsonl/.csv, loss.png, metric.png, report.md, config.json\n"
        "and checkpoints into the run directory. Ctrl-C (SIGINT) or SIGTERM saves a checkpoint first;\n"
        "--resume continues exactly (model, optimizer, schedule, RNG, data position)."), epilog=(
        "examples:\n"
        "  ssmkit train --task mqar --model mamba --set task.seq_len=64 --set train.steps=500\n"
        "  ssmkit train --task selective_copy --model s4d --set model.d_model=128 --run-dir runs/sc\n"
        "  ssmkit train --task text --set task.path=book.txt --model mamba2 --set train.lr=1e-3\n"
        "  ssmkit train --config run.yaml --set train.batch_size=16\n"
        "  ssmkit train --resume --run-dir runs/sc --set train.steps=2000\n\n"
        "--set keys: task.<parameter> (see `ssmkit tasks`), model.<ModelConfig field> (d_model, pattern,\n"
        "n_layers, mlp, norm, dropout, ... and model.mixer_options.<mixer>.<option>, model.head),\n"
        "train.<field> (steps, batch_size, grad_accum, lr, min_lr_ratio, warmup_steps, schedule,\n"
        "weight_decay, grad_clip, seed, eval_every, eval_batches, log_every, save_every, dtype, autocast,\n"
        "activation_checkpointing, chunk_len, threads, ...). A bare key (lr=1e-3) works when unambiguous."))
    p.add_argument("--task", help="task name (see `ssmkit tasks`)")
    p.add_argument("--model", help="model preset (see `ssmkit models`) or a block pattern such as "
                                   "'mamba2*2,attn' (default: mamba)")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file with task/model/train sections")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting (repeatable)")
    p.add_argument("--run-dir", metavar="DIR", help="output directory (default: runs/TASK-MODEL)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over in an existing --run-dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no info logging")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained run's checkpoint", formatter_class=fmt, description=(
        "Evaluate the newest checkpoint of RUN_DIR (or the checkpoint directory given) on a split of its\n"
        "task with the task's metrics; prints them and writes RUN_DIR/eval_SPLIT.json."))
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or one of its checkpoints/step-* dirs)")
    p.add_argument("--split", default="val", help="split to evaluate (default: val)")
    p.add_argument("--batch-size", type=int, help="evaluation batch size (default: the run's)")
    p.add_argument("--max-batches", type=int, default=0, help="evaluate at most this many batches (0 = all)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="generate tokens from a trained language model", formatter_class=fmt,
                       description=(
        "Continue a prompt with a trained run's language model (prefill, then O(1) recurrent steps).\n"
        "Text tasks (with a tokenizer) take text and print text; synthetic tasks take token ids\n"
        "('5 9 12' or '5,9,12') and print ids. --example I builds the prompt from validation example I\n"
        "(up to its first scored position) and shows the expected tokens."), epilog=(
        "examples:\n  ssmkit generate runs/demo --example 0 1 2\n"
        "  ssmkit generate runs/demo --prompt '0 0 5 0 7 0 0 1'\n"
        "  ssmkit generate runs/text --prompt 'Once upon a time' --max-new-tokens 100 --temperature 0.8"))
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or one of its checkpoints/step-* dirs)")
    p.add_argument("--prompt", help="prompt text (text tasks) or token ids (synthetic tasks)")
    p.add_argument("--example", type=int, nargs="+", metavar="INDEX",
                   help="use validation example(s) INDEX as prompts and show the expected tokens")
    p.add_argument("--max-new-tokens", type=int, help="tokens to generate (default: the expected answer's "
                                                      "length with --example, 64 for text, 8 for ids)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), > 0 = sampling")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--escapes", action="store_true", help="decode backslash escapes (\\n) in a text --prompt")
    p.add_argument("--int8", action="store_true", help="decode with int8 weight-only linear layers (faster, "
                                                      "approximate: see ssmkit.infer.quantize)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("tasks", help="list the tasks and their parameters", description=(
        "List every task with its kind, headline metric and parameters (set them with "
        "--set task.KEY=VALUE)."))
    p.add_argument("--all-params", action="store_true", help="also show the split sizes of generated tasks")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("models", help="list model presets and mixers", description=(
        "List the --model presets with parameter counts, and the mixer names usable in block patterns."))
    p.add_argument("--vocab-size", type=int, default=256, help="vocabulary for the parameter counts (256)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("bench", help="time the ops", formatter_class=fmt, description=(
        "Run benchmarks/bench_ops.py --quick (speed and memory against peers), or a small built-in timing\n"
        "when the benchmarks directory is not available (installed package)."))
    p.add_argument("--full", action="store_true", help="run bench_ops.py without --quick")
    p.add_argument("--builtin", action="store_true", help="run the small built-in timing")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="further arguments for bench_ops.py")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("birdie", help="the Birdie comparison: objective mixtures vs next-token pretraining",
                       formatter_class=fmt, description=(
        "Pretrain the same small model on one text with one token budget under each objective mixture (ntp,\n"
        "ul2, fixed, birdie, birdie-causal) and a Transformer with ntp; then evaluate held-out perplexity,\n"
        "infilling and phone-book retrieval (after a short phone-book fine-tune). Writes OUT/<run>/ (trainer\n"
        "run directories with result.json), OUT/results.json, OUT/birdie_report.md and plots. Running the\n"
        "same command again skips finished runs and resumes interrupted ones (Ctrl-C saves a checkpoint).\n"
        "Several processes may share OUT with different --runs."), epilog=(
        "examples:\n  ssmkit birdie --quick --out runs/birdie-smoke\n"
        "  ssmkit birdie --runs ntp,birdie --set tokens=3000000 --set d_model=256\n"
        "  ssmkit birdie --report-only --out runs/birdie\n\n"
        "--set keys are the fields of ssmkit.experiments.birdie_config.BirdieConfig (tokens, seq_len,\n"
        "batch_size, mixer, d_model, n_layers, lr, length_scale, controller_scale, phonebook_steps, ...)."))
    p.add_argument("--text", help="UTF-8 text to pretrain on (default: ../shared/data/tinyshakespeare.txt)")
    p.add_argument("--out", default="runs/birdie", help="output directory (default: runs/birdie)")
    p.add_argument("--runs", help="comma-separated runs (default: all)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a BirdieConfig field")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run (a few minutes)")
    p.add_argument("--report-only", action="store_true", help="only gather finished runs and write the report")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no info logging")
    p.set_defaults(func=cmd_birdie)

    p = sub.add_parser("demo", help="the main job: train, evaluate and generate (a few minutes)",
                       formatter_class=fmt, description=(
        "Train a small Mamba on selective copying, then run `ssmkit eval` and `ssmkit generate` on its\n"
        "checkpoint in fresh processes. Training settings:\n"
        + textwrap.fill(" ".join(f"--set {x}" for x in DEMO_SETS), 100, initial_indent="  ",
                        subsequent_indent="  ")))
    p.add_argument("--run-dir", default=DEMO_RUN_DIR,
                   help=f"output directory (default: {DEMO_RUN_DIR}; replaced)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="extra overrides for the training run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data import MissingDataError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"ssmkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `ssmkit tasks | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError, MissingDataError) as e:
        # user errors (unknown names, bad values, missing files or data): one line, no traceback
        if os.environ.get("SSMKIT_DEBUG"):
            raise
        msg = " ".join(str(e).split())
        print(f"ssmkit {args.command}: error: {msg}  (SSMKIT_DEBUG=1 shows a traceback)", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
