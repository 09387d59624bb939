"""The packages' import rules, checked on the import graph built from the source.

- no cycle between packages, nor between the modules of the tree (inside one folder too);
- `device_sdk` and `export` never import `coordinator`;
- `fwdfed` (but its demo, which runs the others as commands) imports none of the others;
- `runtime`, the library that runs programs, stands on `fwdfed` alone: the device app
  (device_sdk), the exporter's verification and the coordinator's evaluation all run through it,
  and neither the coordinator nor the exporter imports the device app.
"""

from __future__ import annotations

import ast
import itertools

from tests.conftest import ROOT

PACKAGES = ("fwdfed", "runtime", "coordinator", "device_sdk", "export")


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


def test_the_runtime_library_stands_on_fwdfed_alone_and_the_device_app_on_no_server():
    graph = package_graph()
    assert graph["runtime"] == {"fwdfed"}, graph["runtime"]
    assert "device_sdk" not in graph["coordinator"], "the coordinator runs programs through runtime, not the app"
    assert "device_sdk" not in graph["export"], "the exporter verifies through runtime, not the app"
    assert "export" not in graph["device_sdk"], "the device SDK must not need the exporter"


def project_modules() -> dict[str, object]:
    """Dotted module name -> its file, for every module of the packages (a package is its __init__)."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_modules(path, modules) -> set[str]:
    """Project modules a module imports, at the top or inside functions: `from a.b import c` is a.b.c where
    that is a module, else a.b."""
    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {known(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {known(f"{node.module}.{alias.name}") for alias in node.names}
    return found - {None}


def module_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                on_stack.discard(w)
                component.append(w)
            on_stack.discard(v)
            if component:
                cycles.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_cycle_between_modules():
    modules = project_modules()
    graph = {name: imported_modules(path, modules) - {name} for name, path in modules.items()}
    assert module_cycles(graph) == []


def test_the_cycle_checker_finds_a_circle_through_a_function_level_import(tmp_path):
    (tmp_path / "a.py").write_text("from p.b import thing\n")
    (tmp_path / "b.py").write_text("def f():\n    from p.a import other\n")
    (tmp_path / "c.py").write_text("import p.a\n")
    modules = {f"p.{n}": tmp_path / f"{n}.py" for n in "abc"}
    graph = {name: imported_modules(path, modules) - {name} for name, path in modules.items()}
    assert graph == {"p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": {"p.a"}}
    assert module_cycles(graph) == [["p.a", "p.b"]]


def test_the_checker_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from coordinator.store import open_store\n    import export.pipeline\n")
    assert imported_packages(module) == {"coordinator", "export"}
