"""A task's hparams keys are named once, in fwdfed.task_keys: docs/protocol.md documents that set, and no module
of the project reads or writes a key by its literal (a misspelt literal is a key no one sends)."""

from __future__ import annotations

import ast
import re

from fwdfed import methods, task_keys
from fwdfed.directions import KINDS
from fwdfed.methods.mezo import SCHEDULES
from tests.conftest import ROOT

SOURCES = ("fwdfed", "coordinator", "device_sdk", "export", "benchmarks")
# Backticked in the hparams row but no key: "its finite-difference step h is `eps` (no task carries an `h`)".
NOT_KEYS = {"hparams", "h"}


def documented_keys() -> set[str]:
    """The keys the `hparams` row of docs/protocol.md's `task` table names: its backticked words, less the
    values it names (methods, direction kinds, schedules), flags and numbers."""
    doc = (ROOT / "docs" / "protocol.md").read_text()
    section = doc[doc.index("### `task`"):]
    row = next(line for line in section.splitlines() if line.startswith("| `hparams` |"))
    words = set(re.findall(r"`([^`]+)`", row))
    values = set(methods.names()) | set(KINDS) | set(SCHEDULES) | NOT_KEYS
    return {w for w in words - values if not w.startswith("-") and not re.fullmatch(r"[0-9.]+", w)}


def test_the_protocol_document_names_exactly_the_task_keys():
    documented = documented_keys()
    assert documented - task_keys.TASK_KEYS == set(), "documented in docs/protocol.md, not in fwdfed.task_keys"
    assert task_keys.TASK_KEYS - documented == set(), "in fwdfed.task_keys, not documented in docs/protocol.md"


def test_every_methods_own_hyperparameter_is_a_task_key():
    assert set(task_keys.COMMON) <= task_keys.TASK_KEYS
    for method in methods.METHODS.values():
        assert {h.name for h in method.hparams} <= task_keys.TASK_KEYS, method.name


def is_hparams(node: ast.AST) -> bool:
    """An expression that names a hparams dict: `hparams`, `task.hparams`, `first_hparams`..."""
    return ast.unparse(node).endswith("hparams")


def is_key(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in task_keys.TASK_KEYS


def call_name(call: ast.Call) -> str:
    return getattr(call.func, "id", None) or getattr(call.func, "attr", "")


def enclosing_function(node: ast.AST, parents: dict) -> str:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return node.name
    return ""


def is_hparams_dict(node: ast.Dict, parents: dict) -> bool:
    """A dict literal that is (or goes into) a task's hparams: it spreads one, is assigned or merged into one,
    is passed as one, or is what a `*hparams` function returns or is given."""
    parent = parents.get(node)
    if any(k is None and is_hparams(v) for k, v in zip(node.keys, node.values)):
        return True
    if isinstance(parent, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
        targets = parent.targets if isinstance(parent, ast.Assign) else [parent.target]
        return any(is_hparams(t) for t in targets)
    if isinstance(parent, ast.BinOp) and isinstance(parent.op, ast.BitOr):
        return is_hparams(parent.left) or is_hparams(parent.right)
    if isinstance(parent, ast.keyword):
        return parent.arg == "hparams"
    if isinstance(parent, ast.Call):
        return call_name(parent).endswith("hparams")
    if isinstance(parent, ast.Return):
        return enclosing_function(node, parents).endswith("hparams")
    return False


def literal_keys(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, key) for each task key a module reads or writes by a string literal."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        keys: list[ast.AST] = []
        if isinstance(node, ast.Subscript) and is_hparams(node.value):  # hparams["lr"]
            keys = [node.slice]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("get", "pop", "setdefault") and is_hparams(node.func.value):  # hparams.get("lr")
            keys = node.args[:1]
        elif isinstance(node, ast.Call) and call_name(node) in ("hparam", "Hparam"):  # hparam(h, "lr", float)
            keys = node.args[:2]
        elif isinstance(node, ast.Call) and call_name(node) == "dict" and node.args and is_hparams(node.args[0]):
            found += [(node.lineno, k.arg) for k in node.keywords if k.arg in task_keys.TASK_KEYS]  # dict(h, wave=1)
        elif isinstance(node, ast.Compare) and isinstance(node.ops[0], (ast.In, ast.NotIn)) and \
                is_hparams(node.comparators[0]):  # "lr" in hparams
            keys = [node.left]
        elif isinstance(node, ast.Dict) and is_hparams_dict(node, parents):  # {"lr": 1.0, ...}
            keys = [k for k in node.keys if k is not None]
        elif isinstance(node, ast.comprehension) and isinstance(node.iter, (ast.Tuple, ast.List, ast.Set)) and \
                "hparams" in ast.unparse(parents[node]):  # {k: hparams[k] for k in ("kd_weight", ...)}
            keys = node.iter.elts
        found += [(k.lineno, k.value) for k in keys if is_key(k)]
    return found


def test_the_scan_finds_every_way_of_naming_a_key_by_its_literal():
    source = '''
def round_hparams():
    return {"lr": 1.0}
def f(task, hparams, job):
    a = task.hparams["eps"] + hparams.get("kind") + hparam(hparams, "wave", int)
    b = "seed_pool" in hparams and Hparam("candidates", int, 1, "")
    hparams = {"directions": 1}
    hparams |= {"block_start": 0}
    c = job.hparams | {"block_end": 1}
    d = {**hparams, "local_steps": 1}
    e = dict(job.hparams, schedule="linear")
    g = {k: job.hparams[k] for k in ("teacher_sha256", "kd_weight")}
    return Strategy(hparams={"num_classes": 2}), from_hparams({"feature_dim": 3})
def not_hparams(config, record):
    return {"lr": config.lr}, record["kind"], getattr(config, "directions"), dict(lr=1.0), ("eps", "kind")
'''
    found = sorted(key for _, key in literal_keys(ast.parse(source)))
    assert found == sorted(["lr", "eps", "kind", "wave", "seed_pool", "candidates", "directions", "block_start",
                            "block_end", "local_steps", "schedule", "teacher_sha256", "kd_weight", "num_classes",
                            "feature_dim"])


def test_no_module_names_a_task_key_by_its_literal():
    found = {}
    for package in SOURCES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "fwdfed" / "task_keys.py":
                continue
            if literals := literal_keys(ast.parse(path.read_text(), str(path))):
                found[str(path.relative_to(ROOT))] = literals
    assert found == {}, "name these keys by fwdfed.task_keys"
