"""``ssmkit tasks``: every task with its kind, headline metric and parameters."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser("tasks", help="list the tasks and their parameters", description=(
        "List every task with its kind, headline metric and parameters (set them with "
        "--set task.KEY=VALUE)."))
    p.add_argument("--all-params", action="store_true", help="also show the split sizes of generated tasks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data import format_task_list

    print(format_task_list(common=args.all_params))
    return 0
