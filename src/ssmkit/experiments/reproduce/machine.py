"""The machine a reproduction ran on (cores, CPU model, load), for the report."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor(), else "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """cores (logical, and usable by this process), CPU model, OS, Python/torch versions, 1-min load average."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {"cpu": cpu_model(), "cores": os.cpu_count() or 0, "usable_cores": usable,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "torch": torch.__version__, "load_1min": load}


def machine_line(info: dict[str, Any]) -> str:
    """One line for the report, e.g. '2 cores (2 usable), Intel(R) Xeon(R) ..., Linux 6.1, torch 2.13.0'."""
    load = "" if info.get("load_1min") is None else f", load average {info['load_1min']} when this report began"
    return (f"{info['cores']} cores ({info['usable_cores']} usable), {info['cpu']}, {info['os']}, "
            f"Python {info['python']}, torch {info['torch']}{load}")
