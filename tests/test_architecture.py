"""The folder tree is the architecture: no import cycles, few flat modules, files and functions a reader can hold.

The layer order itself (cli down to layers) is import-linter's contract in pyproject.toml, checked by
`make lint`; these tests add what a layers contract cannot see: cycles between modules of one package.
"""

import ast
from pathlib import Path

import grimp
import pytest

import mmlm

SRC = Path(mmlm.__file__).parent
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80


def strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """Return the import cycles among mmlm's modules (Tarjan), function-level imports included."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in graph.find_modules_directly_imported_by(module):
            if not other.startswith("mmlm"):
                continue
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module.startswith("mmlm") and module not in index:
            visit(module)
    return cycles


def test_no_import_cycles_between_modules():
    assert strongly_connected(grimp.build_graph("mmlm")) == []


def test_cycle_finder_sees_a_cycle():
    graph = grimp.ImportGraph()
    for module in ("mmlm", "mmlm.a", "mmlm.b", "mmlm.c"):
        graph.add_module(module)
    graph.add_import(importer="mmlm.a", imported="mmlm.b")
    graph.add_import(importer="mmlm.b", imported="mmlm.a")
    graph.add_import(importer="mmlm.c", imported="mmlm.a")
    assert strongly_connected(graph) == [["mmlm.a", "mmlm.b"]]


def test_at_most_eight_flat_modules():
    flat = sorted(p.name for p in SRC.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(flat) <= 8, flat


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_files_and_functions_stay_readable(path: Path):
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_FILE_LINES
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []
