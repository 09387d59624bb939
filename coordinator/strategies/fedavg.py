"""FedAvg by seed: the default rule (`serve --strategy fedavg`).

Each device's seed-form change weighted by its examples and summed by seed, so the round's
version is itself a per-seed sum a device can replay (the downlink in seed form).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from coordinator.job import JobOptions
from coordinator.lr_strategies import client_lrs
from coordinator.strategies.base import AcceptedUpdate, Block, History, StrategySpec
from fwdfed import methods
from fwdfed import task_keys as keys
from fwdfed.directions import task_kind
from fwdfed.methods import Method
from fwdfed.update import PoolOrder, SeedSums, SeedUpdate, pool_order, round_sums, weighted_sum


@dataclass
class SeedFedAvg:
    """w' = w + server_lr * sum_i (n_i / N) * delta_i, delta_i = (scale_i - 1) w + sum_k coef_ik z(seed_ik) + dense_i,
    summed by seed (each distinct seed's direction made once; with a job's seed pool, at most K of them).

    Devices are weighted by their number of examples, as in FedAvg; directions are restricted
    to the round's block, if any; `clip` bounds the norm of each device's coefficient vector.
    It configures rounds from the job: `devices_per_round` (or a `fraction` of the connected
    devices, at least `min_devices`), client learning rates by `lr_strategy`, and for methods
    that estimate a gradient, waves while the estimate's variance is above the threshold.
    """

    method: Method = field(default_factory=lambda: methods.get("mezo"))
    hparams: dict = field(default_factory=dict)  # the job's task hyperparameters
    options: JobOptions = field(default_factory=JobOptions)
    devices_per_round: int = 1
    min_devices: int = 1
    layout: object = None  # the bundle's adapter layout (fwdfed.bundle.layout): the per-tensor scales' tensors

    @property
    def kind(self) -> str:
        return task_kind(self.hparams)

    @property
    def pool(self) -> PoolOrder | None:
        """The job's seed pool, whose order the round applies its seeds in (docs/protocol.md, Aggregation)."""
        o = self.options
        return None if o.seed_pool is None else pool_order(int(o.seed_pool_key, 16), o.seed_pool)

    # ---- configuring a round ----
    def target(self, connected: int, current: int) -> int:
        if self.options.fraction is None:
            return self.devices_per_round
        return max(current, self.min_devices, math.ceil(self.options.fraction * connected))

    def sample(self, idle: list[str], count: int, rng: random.Random) -> list[str]:
        return rng.sample(sorted(idle), max(0, min(count, len(idle))))

    def configure(self, wave: int, block: Block, devices: list[str], history: Callable[[], History],
                  rng: random.Random) -> dict[str, dict]:
        o = self.options
        eta0 = float(self.hparams[keys.LR])
        losses, last = history() if o.lr_strategy != "frozen" else ({}, {})
        lrs = client_lrs(o.lr_strategy, eta0, o.lr_delta if o.lr_delta is not None else eta0 / 2, devices, losses,
                         last, rng)
        out = {}
        for device_id in devices:
            hparams = {**self.hparams, **o.pool_hparams(), keys.LR: lrs[device_id], keys.WAVE: wave}
            if block is not None:
                hparams |= {keys.BLOCK_START: block[0], keys.BLOCK_END: block[1]}
            out[device_id] = hparams
        return out

    def another_wave(self, updates: list[AcceptedUpdate], dim: int, wave: int,
                     block: Block) -> tuple[bool, float | None]:
        threshold = self.options.variance_threshold
        if not self.method.estimates_gradient or len(updates) < 2:
            return False, None
        variance = estimate_variance(updates, dim, self.kind, float(self.hparams[keys.LR]), block)
        more = threshold is not None and variance > threshold and wave + 1 < self.options.max_waves
        return more, variance

    # ---- aggregating ----
    def clipped(self, u: AcceptedUpdate) -> SeedUpdate:
        clip = self.options.clip
        norm = math.sqrt(math.fsum(c * c for _, c in u.pairs))
        if clip is None or norm <= clip:
            return u.change
        return u.change.with_pairs([(seed, coef * clip / norm) for seed, coef in u.pairs])

    def terms(self, updates: list[AcceptedUpdate]) -> list[tuple[float, SeedUpdate]]:
        """Each update's weight (server_lr * n_i / N, float64) and its change, clipped: what the round sums."""
        total = sum(u.num_examples for u in updates)
        return [(self.options.server_lr * u.num_examples / total, self.clipped(u)) for u in updates]

    def aggregate(self, global_adapter: np.ndarray, updates: list[AcceptedUpdate], block: Block = None) -> np.ndarray:
        if not updates or sum(u.num_examples for u in updates) <= 0:
            return global_adapter.copy()
        # By seed (fwdfed.update.weighted_sum): one direction per distinct seed of the round, at most the
        # job's pool of K (FedKSeed) whatever the number of updates, in the order docs/protocol.md fixes (pool
        # order with a pool); with the scales the round's tasks carried, made again from the same base
        # (JobOptions.round_scales).
        scales = self.options.round_scales(global_adapter, self.layout, block)
        return weighted_sum(global_adapter, self.terms(updates), self.kind, block, scales,
                            self.pool).astype(np.float32)

    def version_sums(self, updates: list[AcceptedUpdate], block: Block = None) -> SeedSums | None:
        """What `aggregate` adds to the adapter, in seed form (the per-seed sums C_s and the shrink S), for a
        device to replay (the downlink in seed form), marked `dense_part` when the round has a dense part too
        (hybrid's head, the backprop baseline): the downlink sends the values that part changed as a span.
        server_lr and clip are in the sums already. None for a version made with per-tensor scales, which goes
        down dense: the history has no place for them (docs/protocol.md, Downlink in seed form)."""
        if self.options.tensor_scale != "none":
            return None
        if not updates or sum(u.num_examples for u in updates) <= 0:
            return SeedSums([], [], 0.0, block)  # the version is its base's values
        by_seed, shrink, dense = round_sums(self.terms(updates), self.pool)
        return SeedSums(list(by_seed), list(by_seed.values()), shrink, block, dense_part=dense is not None)

    def round_metrics(self, number: int) -> dict[str, float]:
        return {}


def device_deltas(updates: list[AcceptedUpdate], dim: int, kind: str, block: Block = None) -> np.ndarray:
    """Each device's seed-form change of the adapter (scale and dense left out), [devices, dim]."""
    zero = np.zeros(dim, dtype=np.float32)
    return np.stack([SeedUpdate(u.pairs).delta(zero, kind, block) for u in updates])


def estimate_variance(updates: list[AcceptedUpdate], dim: int, kind: str, lr: float, block: Block = None) -> float:
    """FwdLLM's check: the variance of the round's mean gradient estimate, averaged over elements.

    Each device's update is -lr times its gradient estimate; the variance of the mean of N
    estimates is their per-element variance over devices divided by N.
    """
    if len(updates) < 2:
        return float("inf")
    estimates = device_deltas(updates, dim, kind, block) / -lr
    if block is not None:
        estimates = estimates[:, block[0] : block[1]]
    return float(estimates.var(axis=0, ddof=1).mean() / len(updates))


STRATEGY = StrategySpec("fedavg", "FedAvg by seed: devices weighted by their examples (the default)", SeedFedAvg)
