"""Install torch 2.13 into the running Python (the project's .venv) without pulling the multi-GB CUDA build.

Run by the venv's own interpreter (``make setup`` does ``.venv/bin/python scripts/install_torch.py``); standard
library only. Decision, in order:

1. a torch 2.13.x is already importable here: keep it (so a CUDA torch you installed yourself stays);
2. ``SSMKIT_TORCH_INDEX=default``: install from pip's configured index, no probe;
   ``SSMKIT_TORCH_INDEX=<url>``: install from that index (``--index-url``), no probe, no fallback;
3. PyTorch's CPU wheel index (https://download.pytorch.org/whl/cpu) answers within the timeout: install the
   CPU wheel from it (if that install fails, fall back to 4);
4. otherwise install from pip's configured index (on Linux, PyPI's torch is the CUDA build).

Every path prints one line starting with ``install_torch:`` saying what it did and why.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

TORCH_VERSION = "2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
ENV_VAR = "SSMKIT_TORCH_INDEX"
DEFAULT_TIMEOUT = 8.0
PREFIX = "install_torch:"

Probe = Callable[[str], "str | None"]  # index url -> None when reachable, else why not
Runner = Callable[[list[str]], int]  # command -> exit code


@dataclass(frozen=True)
class Plan:
    """What to do: ``action`` is "keep" or "install"; ``index_url`` None means pip's configured index."""

    action: str
    index_url: str | None
    reason: str
    fallback: bool = False  # on a failed install from index_url, retry from pip's configured index


def same_minor(version: str, wanted: str = TORCH_VERSION) -> bool:
    """True when ``version`` (e.g. "2.13.0+cpu") has the same major.minor as ``wanted``."""
    release = version.split("+", 1)[0].split(".")
    return release[:2] == wanted.split(".")[:2]


def decide(env: Mapping[str, str], installed: str | None, probe: Probe) -> Plan:
    """The set-up decision from the environment, the importable torch version (None: none) and an index probe."""
    minor = ".".join(TORCH_VERSION.split(".")[:2])
    if installed is not None and same_minor(installed):
        return Plan("keep", None, f"torch {installed} is already installed here; keeping it")
    replaced = f" (replacing torch {installed})" if installed is not None else ""
    override = env.get(ENV_VAR, "").strip()
    if override.lower() == "default":
        return Plan("install", None, f"{ENV_VAR}=default: using pip's configured index, no probe{replaced}")
    if override:
        return Plan("install", override, f"{ENV_VAR}={override}: using that index, no probe{replaced}")
    why_not = probe(CPU_INDEX)
    if why_not is None:
        return Plan("install", CPU_INDEX, f"PyTorch's CPU index is reachable: installing the CPU-only wheel{replaced}",
                    fallback=True)
    return Plan("install", None, f"PyTorch's CPU index {CPU_INDEX} is unreachable ({why_not}); falling back to pip's "
                                 f"configured index (on Linux PyPI serves the CUDA build of torch {minor}){replaced}")


def probe_index(url: str, timeout: float = DEFAULT_TIMEOUT) -> str | None:
    """GET ``url``/torch/ (the index's torch page); None when it answers 200 within ``timeout`` s, else the reason."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=timeout) as resp:
            status = resp.status
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return f"{type(e).__name__}: {reason}"
    return None if status == 200 else f"HTTP {status}"


def installed_torch() -> str | None:
    """Version of the torch this interpreter can import, or None."""
    try:
        version = importlib.metadata.version("torch")
        with warnings.catch_warnings():  # e.g. "Failed to initialize NumPy" before numpy is installed
            warnings.simplefilter("ignore")
            importlib.import_module("torch")
    except Exception:  # not installed, or installed but broken: either way not usable
        return None
    return version


def pip_command(index_url: str | None, python: str = sys.executable) -> list[str]:
    """``pip install torch==TORCH_VERSION``, from ``index_url`` when given."""
    cmd = [python, "-m", "pip", "install", "-q", f"torch=={TORCH_VERSION}"]
    return cmd + (["--index-url", index_url] if index_url else [])


def run(plan: Plan, runner: Runner, say: Callable[[str], None] = print) -> int:
    """Carry out ``plan``; returns the exit code of the last pip call (0 when nothing ran)."""
    say(f"{PREFIX} {plan.reason}")
    if plan.action == "keep":
        return 0
    where = plan.index_url or "pip's configured index"
    say(f"{PREFIX} pip install torch=={TORCH_VERSION} from {where}")
    code = runner(pip_command(plan.index_url))
    if code != 0 and plan.fallback:
        say(f"{PREFIX} install from {where} failed (exit {code}); falling back to pip's configured index")
        code = runner(pip_command(None))
    say(f"{PREFIX} {'done' if code == 0 else f'pip failed (exit {code})'}")
    return code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for the CPU index")
    ap.add_argument("--dry-run", action="store_true", help="print the decision and the pip command, install nothing")
    args = ap.parse_args(argv)
    if not args.timeout > 0:
        ap.error(f"--timeout: expected a positive number of seconds, got {args.timeout}")
    plan = decide(os.environ, installed_torch(), lambda url: probe_index(url, args.timeout))
    if args.dry_run:
        print(f"{PREFIX} {plan.reason}")
        if plan.action == "install":
            print(f"{PREFIX} would run: {' '.join(pip_command(plan.index_url))}")
        return 0
    return run(plan, lambda cmd: subprocess.call(cmd))


if __name__ == "__main__":
    sys.exit(main())
