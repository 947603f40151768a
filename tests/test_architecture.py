"""The package's shape: no import cycle, and each subpackage imports only those below it.

Every import counts, wherever it stands: at module level, inside a function (a lazy
import hides a cycle, it does not remove it) and under `TYPE_CHECKING`.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "detr_train"

# Top to bottom: a subpackage may import only the ones after it (and errors.py, below all).
LAYERS = ("cli", "search", "reporting", "training", "evaluation", "modeling", "data", "checkpointing", "config",
          "distributed", "errors")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The package modules an import statement loads."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.startswith("detr_train")]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if not source.startswith("detr_train"):
        return []
    # `from detr_train.x import y` loads detr_train.x.y when y is a module, else detr_train.x.
    return [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = set()
        for node in ast.walk(tree):
            targets.update(_imported(node, module, path.name == "__init__.py", known))
        graph[module] = {target for target in targets if target in known and target != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_import_cycle():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(cycle) for cycle in cycles)


def test_subpackages_import_only_those_below():
    upward = []
    for module, targets in import_graph().items():
        source_layer = _layer(module)
        for target in targets:
            target_layer = _layer(target)
            if source_layer and target_layer and LAYERS.index(target_layer) < LAYERS.index(source_layer):
                upward.append(f"{module} imports {target} ({source_layer} is below {target_layer})")
    assert not upward, "\n".join(sorted(upward))


def test_only_the_entry_points_and_errors_stay_at_the_top():
    top_level = sorted(path.name for path in PACKAGE_DIR.glob("*.py"))
    assert top_level == ["__init__.py", "__main__.py", "errors.py"]


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
