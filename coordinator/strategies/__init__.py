"""Aggregation strategies, one module each, found by name: `coordinator.strategies.get("fedavg")`.

Every module of this package that defines `STRATEGY = StrategySpec(...)` is a strategy:
`python -m coordinator serve --strategy` lists it, takes its options as flags and stores them
with the job, and the coordinator builds the job's rule from it. Adding a rule is adding one
module; docs/strategies.md walks through one.
"""

from __future__ import annotations

import importlib
import pkgutil

from coordinator.job import JobOptions
from coordinator.strategies.base import AcceptedUpdate, Option, Strategy, StrategySpec
from coordinator.strategies.fedavg import SeedFedAvg, device_deltas, estimate_variance
from fwdfed import methods

__all__ = ["AcceptedUpdate", "Option", "SeedFedAvg", "STRATEGIES", "Strategy", "StrategySpec", "build",
           "device_deltas", "estimate_variance", "get", "names"]

DEFAULT = "fedavg"


def _discover() -> dict[str, StrategySpec]:
    found: dict[str, StrategySpec] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name == "base":
            continue
        spec = getattr(importlib.import_module(f"{__name__}.{info.name}"), "STRATEGY", None)
        if isinstance(spec, StrategySpec):
            if spec.name in found:
                raise RuntimeError(f"two modules define strategy {spec.name!r}")
            taken = {o.name for s in found.values() for o in s.options}
            if clash := taken & {o.name for o in spec.options}:
                raise RuntimeError(f"strategy {spec.name!r} declares options another one has: {sorted(clash)}")
            found[spec.name] = spec
    return found


STRATEGIES: dict[str, StrategySpec] = _discover()


def names() -> list[str]:
    """Strategy names, the default (fedavg) first."""
    return sorted(STRATEGIES, key=lambda n: (n != DEFAULT, n))


def get(name: str) -> StrategySpec:
    """The strategy called `name`; ValueError naming the known ones otherwise."""
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown strategy {name!r}; known strategies: {', '.join(names())}") from None


def build(job, options: JobOptions, layout=None) -> Strategy:
    """The job's rule, from what the job stored: a resumed job aggregates as it started. `layout`, the bundle's
    adapter layout, is what the rule's per-tensor scales (`--tensor-scale`) are made of."""
    spec = get(options.strategy)
    return spec.make(method=methods.get(job.method), hparams=job.hparams, options=options,
                     devices_per_round=job.devices_per_round, min_devices=job.min_devices, layout=layout)
