"""The import layering of docs/design.md: a subpackage imports only from the tiers below it, never up or sideways."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ssmkit"

#: tier of every top-level module or subpackage of ssmkit (docs/design.md, "Layering")
TIERS = {
    "_dataclass_dict": 0, "_annotations": 0, "ops": 0, "init": 0,
    "layers": 1,
    "models": 2, "data": 2, "distributed": 2,
    "objectives": 3, "train": 3, "infer": 3, "interop": 3, "timeseries": 3,
    "experiments": 4, "export": 4,
    "cli": 5, "selfcheck": 5, "__main__": 6,
}
#: imports allowed within one tier (tier 0 shares private helpers; nothing else is sideways)
SIDEWAYS = {("ops", "_dataclass_dict"), ("init", "ops"), ("init", "_dataclass_dict")}


def owner(path: Path, root: Path = PACKAGE) -> str:
    rel = path.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_units(path: Path, root: Path = PACKAGE) -> set[str]:
    """Top-level ssmkit units (subpackage or module names) that ``path`` imports, anywhere in the file."""
    rel = path.relative_to(root)
    here = list(rel.parts[:-1])  # the file's package, relative to ssmkit
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("ssmkit.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] == "ssmkit":
                    out |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
                continue
            if node.level - 1 > len(here):
                raise AssertionError(f"{rel}: relative import above the ssmkit package")
            base = here[: len(here) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
            out |= {target[0]} if target else {a.name for a in node.names}
    return out - {owner(path, root)}


def test_every_unit_has_a_tier():
    units = {p.name if p.is_dir() else p.stem for p in PACKAGE.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.stem != "__init__")}
    assert units == set(TIERS), f"give new units a tier in TIERS and docs/design.md: {sorted(units ^ set(TIERS))}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    me = owner(path)
    if me == "__init__":
        return
    bad = sorted(u for u in imported_units(path)
                 if u in TIERS and TIERS[u] >= TIERS[me] and (me, u) not in SIDEWAYS)
    assert not bad, f"{path.relative_to(PACKAGE)} ({me}, tier {TIERS[me]}) imports {bad}: only lower tiers allowed"


def test_the_checker_sees_relative_absolute_and_nested_imports(tmp_path):
    root = tmp_path / "ssmkit"
    (root / "layers").mkdir(parents=True)
    f = root / "layers" / "x.py"
    f.write_text("from ..models import CausalLM\nimport ssmkit.train.config\nfrom . import base\n"
                 "from .base import LayerState\ndef g():\n    from ssmkit import cli\n")
    assert imported_units(f, root) == {"models", "train", "cli"}
