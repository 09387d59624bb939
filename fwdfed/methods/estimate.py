"""The forward-only estimate every method shares: central differences along seeded directions.

For seeds s_1..s_n, one program call evaluates the batch at w + eps*z_k and w - eps*z_k for
all k (P = 2n adapter vectors), and returns (L+ - L-) / (2 eps) per direction: an estimate
of the directional derivative z_k . grad L (exact for a quadratic). MeZO steps along it at
once; the forward gradient (FwdLLM) sums the estimates at a fixed point.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields

import numpy as np

from fwdfed import task_keys as keys
from fwdfed.batch import Batch
from fwdfed.directions import KINDS, SEED_LIMIT, block_direction, seed_pool
from fwdfed.progress import progress
from fwdfed.tensor_scale import ScaleRanges, check_ranges, scaled
from fwdfed.update import SeedUpdate

# Bounds on what a task may ask of a device, checked before anything is allocated: the task
# comes over the network, and 10**9 directions would be 10**9 adapter-sized vectors.
MAX_LOCAL_STEPS = 100_000  # 2000 times the coordinator's default of 50
MAX_DIRECTIONS = 4096  # per step, which holds 3n adapter-sized vectors (n directions, 2n perturbed copies)
MAX_CANDIDATES = 64  # FwdLLM's selection draws and scores candidates x directions directions per step


def weighted_mean(losses: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean over the real examples of a batch, for each of the P rows of `losses`."""
    return (losses * weights).sum(axis=-1) / max(float(weights.sum()), 1.0)


def mean_loss(engine, batches: list[Batch], adapter: np.ndarray) -> float:
    """Example-weighted mean loss of `adapter` over `batches`."""
    total = sum(float((engine.losses(b, adapter)[0] * b.weights).sum()) for b in batches)
    count = sum(b.num_examples for b in batches)
    return total / max(count, 1)


class PoolDraws:
    """A task's seed stream when the task names a seed pool (FedKSeed): each seed is the pool's entry at an
    index drawn uniformly from [0, K) by `rng`, with replacement, so every direction is one of the pool's."""

    def __init__(self, rng: np.random.Generator, pool: np.ndarray):
        self.rng, self.pool = rng, pool

    def draw(self, n: int) -> list[int]:
        return [int(s) for s in self.pool[self.rng.integers(0, len(self.pool), size=n)]]


def draw_seeds(rng: np.random.Generator | PoolDraws, n: int) -> list[int]:
    """n seeds of a task's directions: free ones in [0, 2^63), or the pool's."""
    if isinstance(rng, PoolDraws):
        return rng.draw(n)
    return [int(s) for s in rng.integers(0, SEED_LIMIT, size=n, dtype=np.int64)]


def hparam(hparams: dict, name: str, kind: type, default=None):
    """`hparams[name]` read as `kind` (int, float or str); `default` when absent, which None makes required."""
    if name not in hparams:
        if default is None:
            raise ValueError(f"{name} is missing")
        return default
    try:
        return kind(hparams[name])
    except (ValueError, TypeError, OverflowError):  # int("x"), int(float("inf")), float([])
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {hparams[name]!r}") from None


def check_positive(name: str, value: float) -> None:
    """A learning rate or step size: finite and > 0 (NaN fails `> 0` by itself, infinity does not)."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_count(name: str, value: int, limit: int) -> None:
    if not 1 <= value <= limit:
        raise ValueError(f"{name} must be between 1 and {limit}, got {value!r}")


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown direction kind {kind!r}; expected one of {KINDS}")


@dataclass(frozen=True, kw_only=True)
class StepConfig:
    """What every estimator's step reads, checked in one place: the learning rate, the perturbation size
    eps (the forward gradient's finite-difference step h), n directions a step, their kind
    (docs/directions.md), the adapter block they are restricted to, and the per-tensor scales they are
    multiplied by (fwdfed.tensor_scale). A method's config extends it with its own fields, and may give these
    other defaults."""

    lr: float = 1e-3
    eps: float = 1e-2
    directions: int = 1
    kind: str = "rademacher"
    block: tuple[int, int] | None = None
    scales: ScaleRanges | None = None

    def __post_init__(self):
        check_positive("lr", self.lr)
        check_positive("eps", self.eps)
        check_count("directions", self.directions, MAX_DIRECTIONS)
        check_kind(self.kind)

    @classmethod
    def step_hparams(cls, hparams: dict) -> dict:
        """These fields read from a task's hparams: `lr` and `eps` required, `directions` and `kind` this
        config's defaults when absent, the block from `block_start`/`block_end`, the scales from `tensor_scales`."""
        default = {f.name: f.default for f in fields(cls)}
        return dict(lr=hparam(hparams, keys.LR, float), eps=hparam(hparams, keys.EPS, float),
                    directions=hparam(hparams, keys.DIRECTIONS, int, default["directions"]),
                    kind=hparam(hparams, keys.KIND, str, default["kind"]), block=parse_block(hparams),
                    scales=check_ranges(hparams[keys.TENSOR_SCALES]) if keys.TENSOR_SCALES in hparams else None)

    def direction(self, seed: int, dim: int) -> np.ndarray:
        """The float32 direction a step moves along: seed's, restricted to the block, times the scales."""
        return scaled(block_direction(seed, dim, self.kind, self.block), self.scales)

    def step_fields(self) -> dict:
        """This config's shared fields, for the step config of the method it runs (fedkd runs MeZO's)."""
        return {f.name: getattr(self, f.name) for f in fields(StepConfig)}


def parse_steps(hparams: dict) -> int:
    """The local steps a task asks for (batches, for the forward gradient)."""
    steps = hparam(hparams, keys.LOCAL_STEPS, int)
    check_count(keys.LOCAL_STEPS, steps, MAX_LOCAL_STEPS)
    return steps


def parse_block(hparams: dict) -> tuple[int, int] | None:
    """The adapter block a task restricts perturbations to (block-cyclic updates), if any.
    Its end is checked against the adapter's dimension by the device, which knows it."""
    if keys.BLOCK_START not in hparams:
        return None
    start, end = hparam(hparams, keys.BLOCK_START, int), hparam(hparams, keys.BLOCK_END, int)
    if not 0 <= start < end:
        raise ValueError(f"the adapter block must have 0 <= block_start < block_end, got [{start}, {end})")
    return start, end


POOL_KEY_TEXT = re.compile(r"[0-9a-f]{16}")


def parse_seed_pool(hparams: dict) -> np.ndarray | None:
    """The seed pool a task names (`seed_pool` K and `seed_pool_key`, docs/directions.md), or None."""
    if keys.SEED_POOL not in hparams and keys.SEED_POOL_KEY not in hparams:
        return None
    size, key = hparam(hparams, keys.SEED_POOL, int), hparams.get(keys.SEED_POOL_KEY)
    if not (isinstance(key, str) and POOL_KEY_TEXT.fullmatch(key) and int(key, 16) < SEED_LIMIT):
        raise ValueError(f"seed_pool_key must be 16 lowercase hex digits of a number below 2^63, got {key!r}")
    return seed_pool(int(key, 16), size)


def scheduled_steps(step, batches: list[Batch], steps: int, lr: float, schedule: str, guard=None) -> "LocalRun":
    """`step(batch, run, lr_t)` for `steps` steps cycling over `batches`, the learning rate constant or linear to 0
    (mezo's and fzoo's `schedule`); `guard()` after each (the memory budget)."""
    run = LocalRun()
    for i in progress(range(steps), desc="local steps", unit="step"):
        step(batches[i % len(batches)], run, lr * (1.0 - i / steps if schedule == "linear" else 1.0))
        if guard:
            guard()
    return run


@dataclass
class Estimate:
    projected: np.ndarray  # [n] (L+ - L-) / (2 eps)
    directions: np.ndarray  # [n, d] the directions used
    loss: float  # mean loss over the 2n evaluations (~ L(w))


def central_differences(engine, batch: Batch, adapter: np.ndarray, seeds: list[int], config: StepConfig) -> Estimate:
    eps = config.eps
    z = np.stack([config.direction(s, adapter.shape[0]) for s in seeds])
    adapters = np.concatenate([adapter + eps * z, adapter - eps * z])  # [2n, d], fresh copies
    losses = weighted_mean(engine.losses(batch, adapters), batch.weights)
    n = len(seeds)
    return Estimate((losses[:n] - losses[n:]) / (2.0 * eps), z, float(losses.mean()))


@dataclass
class LocalRun:
    """A device's local result: w_final = scale * w_start + sum coef_k z(seed_k) (+ dense).

    `scale` is 1 unless weight decay shrank the adapter. Coefficients are stored divided by the
    decay accumulated when they were made, so later decay applies to them in O(1).
    """

    step_losses: list[float] = field(default_factory=list)
    scale: float = 1.0
    dense: np.ndarray | None = None  # a dense change (the backprop baseline), added to the seed form
    _seeds: list[int] = field(default_factory=list)
    _raw: list[float] = field(default_factory=list)

    def add(self, seeds: list[int], coefs: np.ndarray) -> None:
        self._seeds.extend(seeds)
        self._raw.extend(float(c) / self.scale for c in coefs)

    def decay(self, factor: float) -> None:
        self.scale *= factor

    @property
    def pairs(self) -> list[tuple[int, float]]:
        return [(s, r * self.scale) for s, r in zip(self._seeds, self._raw)]

    @property
    def update(self) -> SeedUpdate:
        return SeedUpdate(self.pairs, self.scale, self.dense)
