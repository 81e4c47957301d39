"""The modules of ssmkit.models import each other without a circle (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

MODELS = Path(__file__).resolve().parents[2] / "src" / "ssmkit" / "models"


def graph_of(package: Path) -> dict[str, set[str]]:
    """module -> the sibling modules it imports (anywhere in the file), for every module of ``package``."""
    names = {p.stem for p in package.glob("*.py")} - {"__init__"}
    return {name: sibling_imports(package / f"{name}.py", names) for name in names}


def sibling_imports(path: Path, names: set[str]) -> set[str]:
    """The modules among ``names`` that ``path`` imports anywhere in the file (``from . import x`` included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                mods = [node.module] if node.module else [a.name for a in node.names]
            elif node.level == 0 and (node.module or "").startswith("ssmkit.models"):
                rest = node.module.split(".")[2:]
                mods = rest[:1] if rest else [a.name for a in node.names]
            else:
                continue
            out |= {m.split(".")[0] for m in mods} & names
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("ssmkit.models.")} & names
    return out - {path.stem}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path a -> ... -> a), or None."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_models_import_graph_is_acyclic():
    graph = graph_of(MODELS)
    assert graph["heads"] >= {"checkpoint", "backbone"}, "the parser must see these edges"
    cycle = find_cycle(graph)
    assert cycle is None, "import circle in ssmkit.models: " + " -> ".join(cycle)
    assert "heads" not in graph["checkpoint"], "checkpoint.py is the low level and must know no heads"


def test_checker_sees_the_old_lazy_circle(tmp_path):
    """The checker itself: the old layout (checkpoint imports heads; heads imports checkpoint inside a method)."""
    (tmp_path / "checkpoint.py").write_text("from .heads import HEADS\nfrom .config import ModelConfig\n")
    (tmp_path / "heads.py").write_text("import torch\n\n\nclass M:\n    def save(self):\n"
                                       "        from .checkpoint import save_pretrained\n")
    (tmp_path / "config.py").write_text("from ssmkit.models import outputs\n")
    (tmp_path / "outputs.py").write_text("")
    graph = graph_of(tmp_path)
    assert graph == {"checkpoint": {"heads", "config"}, "heads": {"checkpoint"}, "config": {"outputs"},
                     "outputs": set()}
    assert find_cycle(graph) == ["checkpoint", "heads", "checkpoint"]


def test_public_checkpoint_names_still_import():
    import ssmkit.models as m
    from ssmkit.models.pretrained import load_pretrained, read_config, save_pretrained

    assert (m.load_pretrained, m.read_config, m.save_pretrained) == (load_pretrained, read_config, save_pretrained)
    assert {"load_pretrained", "read_config", "save_pretrained", "load_state", "CheckpointError"} <= set(m.__all__)
