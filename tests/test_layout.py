"""The package layering, read from the source (every import, including those inside functions):

models/ imports neither training/ nor service/ nor the entry point; training/ and service/ never import each
other; only iwae_cli/ may import both; and no module imports itself through others (no cycles).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "training", "service", "iwae_cli")
FORBIDDEN = {
    "models": {"training", "service", "iwae_cli"},
    "training": {"service", "iwae_cli"},
    "service": {"training", "iwae_cli"},
    "iwae_cli": set(),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported_names(path: Path, name: str) -> set[str]:
    """Every module name an import statement in ``path`` mentions (``from a import b`` gives a and a.b)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{alias.name}" for alias in node.names)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for m in imported_names(path, name) if m in mods and m != name} for name, path in mods.items()}


def test_the_layout_is_found() -> None:
    graph = import_graph()
    assert {"models.engine", "training.train", "iwae_cli", "service.app"} <= set(graph)
    assert "training.train" in graph["training.cli"] or "training.config" in graph["training.cli"]


def test_packages_import_only_what_their_layer_allows() -> None:
    bad = [
        f"{mod} imports {dep}"
        for mod, path in modules().items()
        for dep in imported_names(path, mod)
        if dep.split(".")[0] in FORBIDDEN[mod.split(".")[0]]
    ]
    assert not bad, bad


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a path [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles() -> None:
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()) or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
