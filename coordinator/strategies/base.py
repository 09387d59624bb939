"""What a strategy is: the seam between the round machinery and the rule it runs.

Like Flower's, a strategy both configures a round (how many devices and which, what each
device's task says: its learning rate, the round's block, the wave; whether the round needs
another wave of perturbations) and aggregates the answers into the next global adapter. The
round machinery (coordinator.server) does everything else: connections, tasks stored and
sent, deadlines, restarts.

A rule is registered by its module (`STRATEGY = StrategySpec(...)`, coordinator.strategies):
its name for `serve --strategy`, its class, and its own options, which `serve` takes as flags
and the job stores (`JobOptions.strategy_options`), so a resumed job aggregates as it started.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import numpy as np

from fwdfed.update import SeedSums, SeedUpdate

Block = tuple[int, int] | None
# Per device: its train loss in every closed round it took part in, and its change of the adapter
# in the latest one (for FedMeZO's model-diff learning rates).
History = tuple[dict[str, list[float]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class AcceptedUpdate:
    """An accepted update as aggregation reads it."""
    device_id: str
    num_examples: int
    change: SeedUpdate

    @property
    def pairs(self) -> list[tuple[int, float]]:
        return self.change.pairs

    @classmethod
    def of(cls, device_id: str, pairs: list[tuple[int, float]], num_examples: int, scale: float = 1.0,
           dense: np.ndarray | None = None) -> "AcceptedUpdate":
        return cls(device_id, num_examples, SeedUpdate(pairs, scale, dense))

    @classmethod
    def from_row(cls, row, span: tuple[int, int] | None = None, dim: int = 0) -> "AcceptedUpdate":
        """A stored update (coordinator.store's UpdateRow); a dense part that covers `span` only (Method.dense_span)
        placed there in an adapter of `dim` values, so that every rule reads a change of the whole adapter."""
        pairs = [(int(a), float(b)) for a, b in msgpack.unpackb(row.pairs)]
        dense = np.frombuffer(row.dense, "<f4") if row.dense else None
        if dense is not None and span is not None:
            dense = place_dense(dense, span, dim)
        return cls(row.device_id, row.num_examples, SeedUpdate(pairs, row.scale, dense))


def span_length(span: tuple[int, int]) -> int:
    return span[1] - span[0]


def place_dense(dense: np.ndarray, span: tuple[int, int], dim: int) -> np.ndarray:
    """A dense change of `span` alone as the float32 change of the whole adapter: zero off the span
    (docs/protocol.md, Aggregation: D sums the placed parts)."""
    if dense.shape[0] != span_length(span) or not 0 <= span[0] < span[1] <= dim:
        raise ValueError(f"a dense part of {dense.shape[0]} values does not fill [{span[0]}, {span[1]}) of {dim}")
    placed = np.zeros(dim, np.float32)
    placed[span[0] : span[1]] = dense
    return placed


class Strategy(Protocol):
    def target(self, connected: int, current: int) -> int:
        """Devices the round samples, given how many are connected and the round's target so far."""

    def sample(self, idle: list[str], count: int, rng: random.Random) -> list[str]:
        """`count` of the idle connected devices to task."""

    def configure(self, wave: int, block: Block, devices: list[str], history: Callable[[], History],
                  rng: random.Random) -> dict[str, dict]:
        """Each chosen device's task hyperparameters."""

    def another_wave(self, updates: list[AcceptedUpdate], dim: int, wave: int,
                     block: Block) -> tuple[bool, float | None]:
        """Whether the round asks its devices for another wave, and the estimate variance (if any)."""

    def aggregate(self, global_adapter: np.ndarray, updates: list[AcceptedUpdate], block: Block = None) -> np.ndarray:
        """The next global adapter."""

    def version_sums(self, updates: list[AcceptedUpdate], block: Block = None) -> SeedSums | None:
        """What `aggregate` adds, as per-seed sums a device can replay (`dense_part` when it changes more, which then
        goes down as the span of values the sums do not give); None: the version goes down dense."""

    def round_metrics(self, number: int) -> dict[str, float]:
        """What the rule adds to round `number`'s stored metrics (a privacy budget, say)."""


@dataclass(frozen=True)
class Option:
    """A strategy's own job option: `python -m coordinator serve --<name>` sets it; stored with the job."""
    name: str  # as in JobOptions.strategy_options; the flag is --name-with-dashes
    type: type
    default: Any  # None with required=True: the flag must be given
    help: str
    valid: Callable[[Any], bool] = lambda value: True
    requirement: str = ""  # what `valid` asks, for the error ("must be in [0, 0.5)")
    required: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class StrategySpec:
    name: str  # what `serve --strategy` and the stored job say
    summary: str  # one line, for --help
    make: Callable[..., Strategy]  # (method=, hparams=, options=, devices_per_round=, min_devices=, layout=)
    options: tuple[Option, ...] = ()

    def checked(self, given: dict[str, Any]) -> dict[str, Any]:
        """Every option's value, from `given` (name -> value, None where not given) or its default; ValueError
        naming the flag for a missing or invalid one."""
        values = {}
        for o in self.options:
            value = given.get(o.name)
            if value is None:
                if o.required:
                    raise ValueError(f"--strategy {self.name} needs {o.flag}")
                value = o.default
            if not o.valid(value):
                raise ValueError(f"{o.flag} {o.requirement}, got {value!r}")
            values[o.name] = value
        return values


def group_by_device(updates: list[AcceptedUpdate]) -> dict[str, list[AcceptedUpdate]]:
    """A device that answered several waves of a round has one update per wave: a rule that treats devices
    alike (not by their example counts) takes their updates together."""
    groups: dict[str, list[AcceptedUpdate]] = defaultdict(list)
    for u in updates:
        groups[u.device_id].append(u)
    return groups


def device_change(w: np.ndarray, updates: list[AcceptedUpdate], kind: str, block: Block) -> np.ndarray:
    """The mean of one device's changes of `w` (float64), zero outside `block`.

    The mean keeps an equal-weight rule equal to SeedFedAvg's (with equal example counts) when every
    device answered every wave."""
    return sum(update_change(w, u, kind, block) for u in updates) / len(updates)


def update_change(w: np.ndarray, u: AcceptedUpdate, kind: str, block: Block) -> np.ndarray:
    change = u.change.delta(w, kind, block)
    if block is None:
        return change
    # A shrink (weight decay) or dense part outside the block would change what the round does not
    # own: drop it, so that the round changes the block only.
    inside = np.zeros_like(change)
    inside[block[0] : block[1]] = change[block[0] : block[1]]
    return inside
