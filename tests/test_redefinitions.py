"""No function or method is defined twice in one module or class body: the later silently replaces the
earlier, and pyflakes does not see it inside a class (the seed-form downlink's `Coordinator._history`
once replaced the client-lr strategies' and crashed every `--lr-strategy` job)."""

from __future__ import annotations

import ast
import collections

from tests.conftest import ROOT

SOURCES = ("fwdfed", "coordinator", "device_sdk", "export", "benchmarks", "tests")


def redefined(tree: ast.Module) -> list[tuple[str, str]]:
    """(scope, name) for each name defined more than once in a module's or a class's own body; a property's
    setter (`@x.setter`) and `typing.overload` are meant to repeat a name."""
    found = []
    for scope in (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef))):
        names = collections.Counter(
            f.name for f in scope.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            and not any(isinstance(d, ast.Attribute) or (isinstance(d, ast.Name) and d.id == "overload")
                        for d in f.decorator_list))
        found += [(getattr(scope, "name", "<module>"), name) for name, count in names.items() if count > 1]
    return found


def test_the_check_sees_a_method_defined_twice():
    assert redefined(ast.parse("class C:\n    def f(self): pass\n    def f(self, x): pass\n")) == [("C", "f")]


def test_no_module_or_class_defines_a_function_twice():
    found = {str(path.relative_to(ROOT)): twice for package in SOURCES for path in (ROOT / package).rglob("*.py")
             if (twice := redefined(ast.parse(path.read_text(), str(path))))}
    assert found == {}
