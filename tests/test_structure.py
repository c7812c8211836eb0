"""The shape of the package: no import circles (counting imports inside functions), and no
module of the core importing an adapter (adapters add their commands through entry points)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "torch_rlds").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    for path in (ROOT / "adapters").glob("*.py"):
        out[f"torch_rlds.adapters.{path.stem}".removesuffix(".__init__")] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the torch_rlds modules it imports anywhere (but under TYPE_CHECKING)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        found: set[str] = set()

        def visit(node: ast.AST, module: str = module, found: set[str] = found) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                names: list[str] = []
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom) and child.module:
                    base = child.module
                    if child.level:
                        base = ".".join(module.split(".")[:-child.level] + [child.module])
                    names = [base] + [f"{base}.{a.name}" for a in child.names]
                for name in names:
                    target = resolve(name) if name.startswith("torch_rlds") else None
                    if target and target not in (module, "torch_rlds"):
                        found.add(target)
                visit(child)

        visit(ast.parse(path.read_text()))
        graph[module] = found
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    reach, stack = set(), [start]
    while stack:
        for nxt in graph.get(stack.pop(), ()):
            if nxt not in reach:
                reach.add(nxt)
                stack.append(nxt)
    return reach


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The modules that import each other round a circle, one list per circle."""
    reach = {m: _reachable(graph, m) for m in graph}
    circles: list[list[str]] = []
    for m in sorted(graph):
        if m in reach[m] and not any(m in c for c in circles):
            circles.append(sorted(n for n in reach[m] if m in reach.get(n, ())))
    return circles


def test_no_import_circles_even_through_imports_inside_functions():
    graph = _imports(_modules())
    graph.pop("torch_rlds", None)  # the package re-exports; it is not part of any circle
    assert _circles(graph) == []
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_core_module_imports_an_adapter():
    graph = _imports(_modules())
    assert {(m, t) for m, targets in graph.items() if ".adapters" not in m
            for t in targets if ".adapters" in t} == set()


def test_the_command_line_has_the_adapters_commands():
    from torch_rlds.cli import build_parser

    # from the torch_rlds.commands entry point
    assert "check" in build_parser().format_help()
