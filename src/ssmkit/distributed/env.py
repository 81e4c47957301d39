"""Where this process sits in a ``torch.distributed`` job: rank, world size, backend; set-up and tear-down.

``torchrun`` (``python -m torch.distributed.run``) starts every worker with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in its environment;
:func:`detect` reads them (a plain process is rank 0 of 1). :func:`init_process_group` joins the job with a
bounded ``timeout``: a collective that waits longer than that for another rank (a hung or lost peer) raises
instead of hanging. A peer that exits closes its connections, so gloo fails the collective at once, and
torchrun then stops the remaining workers.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

#: backends a training job may ask for ("auto": nccl for CUDA tensors, gloo for CPU tensors)
BACKENDS = ("auto", "gloo", "nccl")
#: seconds a collective may wait for the other ranks before it raises (torch's own default is 30 min)
DEFAULT_TIMEOUT = 600.0
#: environment variable that overrides :data:`DEFAULT_TIMEOUT`
TIMEOUT_ENV = "SSMKIT_DIST_TIMEOUT"


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job (rank 0 of 1 outside a distributed launch)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        """True when there is more than one process (a torchrun job of world size 1 runs as one process)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, environ: dict[str, str]) -> int:
    text = environ[name]
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} must be an int (set by torchrun)") from None


def detect(environ: dict[str, str] | None = None) -> DistEnv:
    """Rank and world size from the launcher's environment variables (none set: rank 0 of 1)."""
    environ = dict(os.environ if environ is None else environ)
    if "WORLD_SIZE" not in environ and "RANK" not in environ:
        return DistEnv()
    missing = [n for n in ("RANK", "WORLD_SIZE") if n not in environ]
    if missing:
        raise ValueError(f"environment: {', '.join(missing)} missing while "
                         f"{'RANK' if 'RANK' in environ else 'WORLD_SIZE'} is set; start distributed jobs "
                         f"with torchrun (or ssmkit train --nproc N)")
    rank, world = _env_int("RANK", environ), _env_int("WORLD_SIZE", environ)
    local = _env_int("LOCAL_RANK", environ) if "LOCAL_RANK" in environ else rank
    local_world = _env_int("LOCAL_WORLD_SIZE", environ) if "LOCAL_WORLD_SIZE" in environ else world
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"environment: RANK={rank} and WORLD_SIZE={world} must satisfy 0 <= RANK < "
                         f"WORLD_SIZE")
    if world > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in environ:
                raise ValueError(f"environment: {name} is not set but WORLD_SIZE={world}; start distributed "
                                 f"jobs with torchrun (or ssmkit train --nproc N)")
    return DistEnv(rank, world, local, local_world)


def resolve_backend(name: str, device: torch.device | str = "cpu") -> str:
    """The process-group backend for training on ``device``: "auto" is nccl for CUDA, gloo for CPU.
    Raises ValueError for an unknown name or nccl without CUDA tensors."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is unknown; expected one of {', '.join(BACKENDS)}")
    dev = torch.device(device)
    if name == "auto":
        return "nccl" if dev.type == "cuda" else "gloo"
    if name == "nccl" and dev.type != "cuda":
        raise ValueError(f"backend 'nccl' needs CUDA tensors but this job trains on {dev.type}; use "
                         f"backend gloo (or auto)")
    if name == "nccl" and not dist.is_nccl_available():
        raise ValueError("backend 'nccl' is not available in this PyTorch build; use gloo (or auto)")
    if name == "gloo" and not dist.is_gloo_available():
        raise ValueError("backend 'gloo' is not available in this PyTorch build")
    return name


def resolve_timeout(seconds: float | None = None, environ: dict[str, str] | None = None) -> float:
    """``seconds``, else ``$SSMKIT_DIST_TIMEOUT``, else :data:`DEFAULT_TIMEOUT`; must be a positive number."""
    if seconds is None:
        text = (os.environ if environ is None else environ).get(TIMEOUT_ENV)
        if text is None:
            return DEFAULT_TIMEOUT
        try:
            seconds = float(text)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={text!r} must be a number of seconds") from None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < float("inf"):
        raise ValueError(f"distributed timeout must be a positive number of seconds, got {seconds!r}")
    return float(seconds)


def init_process_group(env: DistEnv, backend: str = "gloo", timeout: float | None = None) -> None:
    """Join the job described by ``env`` (``init_method="env://"``) with a bounded collective timeout."""
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group is already initialised in this process")
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=resolve_timeout(timeout)))


def destroy_process_group() -> None:
    """Leave the job (a no-op when no process group is initialised)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(env: DistEnv, backend: str = "gloo", timeout: float | None = None) -> Iterator[DistEnv]:
    """``with process_group(env, backend):`` joins the job when ``env.distributed`` and always leaves it."""
    if not env.distributed:
        yield env
        return
    init_process_group(env, backend, timeout)
    try:
        yield env
    finally:
        destroy_process_group()


def current() -> DistEnv:
    """The initialised default process group's rank and world size (rank 0 of 1 without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistEnv()
    environ = os.environ
    local = int(environ.get("LOCAL_RANK", dist.get_rank()))
    local_world = int(environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    return DistEnv(dist.get_rank(), dist.get_world_size(), local, local_world)


def is_peer_failure(error: BaseException) -> bool:
    """True for errors of a collective whose peer died, hung past the timeout or could not be reached (gloo
    raises them as plain RuntimeErrors naming its transport)."""
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo" in str(error))


def peer_failure_text(error: BaseException) -> str:
    """The gist of a :func:`is_peer_failure` error on one line (source paths and boilerplate dropped)."""
    text = " ".join(str(error).split())
    text = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". This is typically")[0].strip() or type(error).__name__
