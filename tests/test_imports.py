"""The packages' import rules, checked on the import graph built from the source.

- no cycle between packages;
- `device_sdk` and `export` never import `coordinator`;
- `fwdfed` (but its demo, which runs the others as commands) imports none of the others;
- where one package runs another's code, the edge runs one way: the exporter verifies and
  measures with the device runtime (export -> device_sdk), the coordinator evaluates through it
  (coordinator -> device_sdk).
"""

from __future__ import annotations

import ast
import itertools

from tests.conftest import ROOT

PACKAGES = ("fwdfed", "coordinator", "device_sdk", "export")


def imported_packages(path) -> set[str]:
    """Project packages a module imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & set(PACKAGES)
    return found


def package_graph(exclude=()) -> dict[str, set[str]]:
    """package -> the other packages its modules import."""
    graph = {p: set() for p in PACKAGES}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if str(path.relative_to(ROOT)) in exclude:
                continue
            graph[package] |= imported_packages(path) - {package}
    return graph


def has_path(graph, start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(graph[node])
    return False


def test_no_cycle_between_packages():
    graph = package_graph()
    for a, b in itertools.permutations(PACKAGES, 2):
        assert not (b in graph[a] and has_path(graph, b, a)), f"{a} -> {b} -> ... -> {a}: {graph}"


def test_device_sdk_and_export_never_import_the_coordinator():
    graph = package_graph()
    assert "coordinator" not in graph["device_sdk"]
    assert "coordinator" not in graph["export"]


def test_the_ground_floor_imports_no_other_package():
    graph = package_graph(exclude={"fwdfed/demo.py"})
    assert graph["fwdfed"] == set(), graph["fwdfed"]


def test_runtime_edges_run_one_way():
    graph = package_graph()
    assert "device_sdk" not in graph["coordinator"] or "coordinator" not in graph["device_sdk"]
    assert "export" not in graph["device_sdk"], "the device SDK must not need the exporter"


def test_the_checker_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from coordinator.store import open_store\n    import export.pipeline\n")
    assert imported_packages(module) == {"coordinator", "export"}
