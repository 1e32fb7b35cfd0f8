"""The package's shape, measured from its source: no import cycle, the flow in one screen."""

from __future__ import annotations

import ast
from pathlib import Path

import photd

PACKAGE = Path(photd.__file__).resolve().parent


def _import_graph() -> dict[str, set[str]]:
    """Module -> the photd modules it imports (at the top or inside functions)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name in modules:
        deps: set[str] = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                parts = (node.module or "").split(".")
                if node.level == 1:
                    deps |= {parts[0]} if node.module else {a.name for a in node.names}
                elif parts[0] == "photd":
                    deps |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names
                         if a.name.startswith("photd.")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_no_module_imports_itself_through_others():
    assert _cycles(_import_graph()) == []


def test_reports_and_demo_do_not_import_the_daemon():
    graph = _import_graph()
    assert "scheduler" not in graph["reports"] and "cli" not in graph["demo"]


def test_process_science_reads_in_one_screen():
    tree = ast.parse((PACKAGE / "pipeline.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef)
              and n.name == "process_science")
    assert fn.end_lineno - fn.lineno + 1 <= 40
