"""Training methods, one module each, found by name: `fwdfed.methods.get("mezo")`.

Every module of this package that defines `METHOD = Method(...)` is a method: the
coordinator's `--method` choices and flags, the device's task handling, the memory plan and
the profiler's modes all read it from here. Adding a method is adding one module;
docs/methods.md walks through one.
"""

from __future__ import annotations

import importlib
import pkgutil

from fwdfed.methods.base import COMMON_HPARAMS, Hparam, Method

__all__ = ["COMMON_HPARAMS", "Hparam", "Method", "METHODS", "get", "names"]

_NOT_METHODS = {"base", "estimate"}


def _discover() -> dict[str, Method]:
    found: dict[str, Method] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name in _NOT_METHODS:
            continue
        method = getattr(importlib.import_module(f"{__name__}.{info.name}"), "METHOD", None)
        if isinstance(method, Method):
            if method.name in found:
                raise RuntimeError(f"two modules define method {method.name!r}")
            found[method.name] = method
    return found


METHODS: dict[str, Method] = _discover()


def names(selectable_only: bool = False) -> list[str]:
    """Method names, the default (mezo) first; `selectable_only`: those a job may name as its method."""
    return sorted((n for n, m in METHODS.items() if m.selectable or not selectable_only), key=lambda n: (n != "mezo", n))


def get(name: str) -> Method:
    """The method called `name`; ValueError naming the known ones otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(names())}") from None
