"""``ssmkit train``: train a model on a task into a run directory (or continue one with --resume).

Under ``torchrun`` (``torchrun --nproc_per_node N -m ssmkit.cli train ...``) every worker runs this same command
and trains data parallel (see :mod:`ssmkit.train.trainer`); ``--nproc N`` starts exactly that through
``python -m torch.distributed.run --standalone`` after checking the command line once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .common import EXIT_USAGE, UsageError, float_in, int_at_least, removed_on_failure, setup_logging, slug

T = TypeVar("T")
#: errors in what the user asked for (one line, exit status 2; see ssmkit.cli.main)
_USER_ERRORS = (ValueError, TypeError, FileNotFoundError)

_OUTPUTS = ("config.json", "config.yaml", "metrics.jsonl", "metrics.csv", "loss.png", "metric.png",
            "report.md")


def register(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser("train", help="train a model on a task", formatter_class=fmt, description=(
        "Train a model on a task; writes metrics.jsonl/.csv, loss.png, metric.png, report.md, config.json\n"
        "and checkpoints into the run directory. Ctrl-C (SIGINT) or SIGTERM saves a checkpoint first;\n"
        "--resume continues exactly (model, optimizer, schedule, RNG, data position)."), epilog=(
        "examples:\n"
        "  ssmkit train --task mqar --model mamba --set task.seq_len=64 --set train.steps=500\n"
        "  ssmkit train --task selective_copy --model s4d --set model.d_model=128 --run-dir runs/sc\n"
        "  ssmkit train --task text --set task.path=book.txt --model mamba2 --set train.lr=1e-3\n"
        "  ssmkit train --config run.yaml --set train.batch_size=16\n"
        "  ssmkit train --resume --run-dir runs/sc --set train.steps=2000\n"
        "  ssmkit train --nproc 2 --task mqar --set train.batch_size=32 --run-dir runs/dp   # data parallel\n"
        "  torchrun --nproc_per_node 2 -m ssmkit.cli train --task mqar --run-dir runs/dp   # the same\n\n"
        "--set keys: task.<parameter> (see `ssmkit tasks`), model.<ModelConfig field> (d_model, pattern,\n"
        "n_layers, mlp, norm, dropout, ... and model.mixer_options.<mixer>.<option>, model.head),\n"
        "train.<field> (steps, batch_size, grad_accum, lr, min_lr_ratio, warmup_steps, schedule,\n"
        "weight_decay, grad_clip, seed, eval_every, eval_batches, log_every, save_every, dtype, autocast,\n"
        "activation_checkpointing, chunk_len, sequence_parallel, threads, ...). A bare key (lr=1e-3) works\n"
        "when unambiguous."))
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
    p.add_argument("--nproc", type=int_at_least(1), metavar="N",
                   help="train data parallel on N processes of this machine (runs `python -m "
                        "torch.distributed.run --standalone --nproc_per_node N -m ssmkit.cli train ...`); "
                        "train.batch_size is the global batch")
    p.add_argument("--backend", default="auto", metavar="NAME",
                   help="torch.distributed backend of a data-parallel run: auto (gloo on CPU, nccl on CUDA), "
                        "gloo or nccl (default: auto)")
    p.add_argument("--dist-timeout", type=float_in(0.0, low_open=True), metavar="SECONDS",
                   help="a data-parallel rank waiting longer than this for the others fails instead of hanging "
                        "(default: $SSMKIT_DIST_TIMEOUT or 600)")
    p.set_defaults(func=run)


def _clear_outputs(run_dir: Path) -> None:
    """Remove a previous run's outputs (only ssmkit's own files) for --overwrite."""
    for name in _OUTPUTS:
        (run_dir / name).unlink(missing_ok=True)
    for p in run_dir.glob("eval_*.json"):
        p.unlink()
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def _sections(args: argparse.Namespace, run_dir: Path | None) -> dict[str, dict[str, Any]]:
    from ..train import apply_overrides, load_config_file
    from ..train.run_dir import read_config

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
        from ..data import TASKS

        raise UsageError(f"no task given: use --task NAME (one of {', '.join(TASKS)}) or task.name in "
                         f"--config")
    return apply_overrides(sections, args.set or [])


def _given_run_dir(args: argparse.Namespace) -> Path | None:
    run_dir = Path(args.run_dir) if args.run_dir else None
    if args.resume and run_dir is None:
        raise UsageError("--resume needs --run-dir DIR (the run to continue)")
    return run_dir


def _default_run_dir(setup: Any) -> Path:
    return Path("runs") / slug(f"{setup.task.name}-{setup.model.preset}")


def _check_run_dir(args: argparse.Namespace, run_dir: Path, *, clear: bool) -> None:
    if not args.resume and run_dir.exists() and any(run_dir.iterdir()):
        if not args.overwrite:
            raise UsageError(f"run directory {run_dir} exists and is not empty; use --resume to continue it, "
                             f"--overwrite to start over, or another --run-dir")
        if clear:
            _clear_outputs(run_dir)


def run(args: argparse.Namespace) -> int:
    from ..distributed.env import detect

    env = detect()
    if args.nproc is not None:
        if env.distributed or "TORCHELASTIC_RUN_ID" in os.environ:
            raise UsageError("--nproc starts torchrun itself; leave it out when the command runs under torchrun")
        if args.nproc > 1:
            return _launch(args)
    if env.distributed:
        return _run_data_parallel(args, env)
    from ..distributed.env import resolve_backend, resolve_timeout
    from ..train import resolve_run

    resolve_backend(args.backend)
    resolve_timeout(args.dist_timeout)
    setup_logging(args.quiet)
    run_dir = _given_run_dir(args)
    setup = resolve_run(_sections(args, run_dir))
    run_dir = run_dir or _default_run_dir(setup)
    _check_run_dir(args, run_dir, clear=True)
    return _train(args, setup, run_dir, main=True)


# ------------------------------------------------------------------------------------------- data parallel
def _worker_argv(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The ``train`` command line every worker runs (``--nproc`` dropped, the run directory explicit)."""
    out = ["train"]
    for flag in ("task", "model", "config"):
        if getattr(args, flag) is not None:
            out += [f"--{flag}", getattr(args, flag)]
    for item in args.set or []:
        out += ["--set", item]
    out += ["--run-dir", str(run_dir), "--backend", args.backend]
    if args.dist_timeout is not None:
        out += ["--dist-timeout", repr(args.dist_timeout)]
    out += [f"--{flag}" for flag in ("resume", "overwrite", "quiet") if getattr(args, flag)]
    return out


def _launch(args: argparse.Namespace) -> int:
    """``--nproc N``: check the command once here, then become ``python -m torch.distributed.run --standalone
    --nproc_per_node N -m ssmkit.cli train ...`` (torchrun's own launcher; signals go straight to it)."""
    from ..distributed.env import resolve_backend, resolve_timeout
    from ..train import resolve_run

    resolve_backend(args.backend)
    resolve_timeout(args.dist_timeout)
    setup_logging(args.quiet)
    run_dir = _given_run_dir(args)
    setup = resolve_run(_sections(args, run_dir))
    _check_layout(setup, args.nproc)
    run_dir = run_dir or _default_run_dir(setup)
    _check_run_dir(args, run_dir, clear=False)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
            "--max_restarts=0", "-m", "ssmkit.cli", *_worker_argv(args, run_dir)]
    logging.getLogger("ssmkit.train").info("data parallel on %d processes: %s", args.nproc, " ".join(argv[1:]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)
    return 0  # not reached


def _check_layout(setup: Any, world_size: int) -> None:
    """train.sequence_parallel divides the world size and the global batch splits over the data-parallel ranks."""
    from ..distributed.data_parallel import check_global_batch, data_parallel_layout

    cfg = setup.train
    size, _ = data_parallel_layout(world_size, 0, cfg.sequence_parallel)
    check_global_batch(cfg.batch_size, size, cfg.grad_accum,
                       what="world size" if cfg.sequence_parallel == 1 else "data-parallel size")


def _same_on_all_ranks(fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it raises a user error on any rank, every rank raises rank 0's error (or
    the first failing rank's, naming it), so all stop together with one message."""
    from ..distributed import data_parallel as dp

    try:
        value, err = fn(), None
    except _USER_ERRORS as e:
        value, err = None, e
    messages = dp.gather_to_main(None if err is None else " ".join(str(err).split()))

    def check() -> None:
        if err is not None:
            raise err
        bad = [(r, m) for r, m in enumerate(messages or []) if m]
        if bad:
            raise UsageError(f"rank {bad[0][0]}: {bad[0][1]}")

    dp.run_on_main(check)
    return value  # type: ignore[return-value]


def _run_data_parallel(args: argparse.Namespace, env: Any) -> int:
    """A worker of a torchrun job: join the process group, agree on the run, train; rank 0 reports."""
    from ..distributed import data_parallel as dp
    from ..distributed.env import is_peer_failure, peer_failure_text, process_group, resolve_backend, resolve_timeout
    from ..train import resolve_run

    setup_logging(args.quiet)
    if not env.is_main:  # progress and logs come from rank 0
        logging.getLogger("ssmkit").setLevel(logging.ERROR)
    try:
        backend, timeout = resolve_backend(args.backend), resolve_timeout(args.dist_timeout)
        run_dir = _given_run_dir(args)
        setup = None
        if not args.resume:  # the command line alone decides the run: check it before joining the job
            setup = resolve_run(_sections(args, run_dir))
            _check_layout(setup, env.world_size)
        with process_group(env, backend, timeout):
            if setup is None:  # a resumed run's config is rank 0's file; every rank builds and checks it
                sections = dp.run_on_main(lambda: _sections(args, run_dir))
                setup = _same_on_all_ranks(lambda: resolve_run(sections))
                _check_layout(setup, env.world_size)
            run_dir = run_dir or _default_run_dir(setup)
            dp.run_on_main(lambda: _check_run_dir(args, run_dir, clear=True))
            try:
                return _train(args, setup, run_dir, main=env.is_main)
            except RuntimeError as e:
                if not is_peer_failure(e):
                    raise
                print(f"ssmkit train: error: rank {env.rank}: lost another rank of the job "
                      f"({peer_failure_text(e)}); stopping. Resume from the newest complete checkpoint with "
                      f"--resume --run-dir {run_dir}", file=sys.stderr)
                return 1
    except _USER_ERRORS:
        if not env.is_main:
            return EXIT_USAGE  # rank 0 prints the same one-line error
        raise


# ------------------------------------------------------------------------------------------- training
def _train(args: argparse.Namespace, setup: Any, run_dir: Path, *, main: bool) -> int:
    from ..train import Trainer, TrainingInterrupted

    log = logging.getLogger("ssmkit.train")
    trainer = None

    def wrote_something_real() -> bool:  # a checkpoint, or training records worth looking at
        return trainer is not None and (trainer.last_checkpoint is not None or trainer.step > 0)

    cleanup = removed_on_failure(run_dir, keep=wrote_something_real) if main else contextlib.nullcontext()
    with cleanup:
        trainer = Trainer(setup, run_dir, resume=args.resume, quiet=args.quiet)
        log.info("%s  (%s parameters)", trainer.model.summary(), f"{trainer.model.num_parameters():,}")
        log.info("task %s: %s; chance level %s; run directory %s", setup.task.name, setup.task.description,
                 setup.task.chance_level, run_dir)
        try:
            metrics = trainer.train()
        except TrainingInterrupted as e:
            if not main:
                return 128 + e.signum
            print(f"interrupted at step {e.step}/{setup.train.total_steps}; checkpoint saved to {e.checkpoint}\n"
                  f"continue with: ssmkit train --resume --run-dir {run_dir}", file=sys.stderr)
            return 128 + e.signum
    if not main:
        return 0
    m = setup.task.metric
    chance = setup.task.chance_level
    print(f"done: step {trainer.step}/{setup.train.total_steps}, val {m} {metrics.get(m, float('nan')):.4f}"
          + (f" (chance {chance:.4g})" if chance is not None else ""))
    print(f"report:     {run_dir / 'report.md'}")
    print(f"plots:      {run_dir / 'loss.png'}, {run_dir / 'metric.png'}")
    print(f"metrics:    {run_dir / 'metrics.jsonl'}, {run_dir / 'metrics.csv'}")
    print(f"checkpoint: {trainer.last_checkpoint}")
    return 0
