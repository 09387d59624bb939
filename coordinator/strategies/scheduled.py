"""A round whose method the coordinator schedules itself, through the Strategy seam like any other.

Round 1 of a `--head-init lda` job gathers class statistics (fwdfed.methods.class_stats): every
task carries that method's hyperparameters, the answers are dense statistics, not changes of the
adapter, and the method itself turns them into the next adapter (`Method.coordinator_aggregate`,
with the adapter's layout). Devices are counted and sampled as the job's strategy counts them; the
version goes down as the span of values it changed (the head: docs/protocol.md, Downlink in seed form).
It is no rule a job chooses (no `STRATEGY`): the round engine uses it for the rounds
`coordinator.job.round_method_name` gives to another method than the job's.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from coordinator.strategies.base import AcceptedUpdate, Block, History, Strategy
from fwdfed import task_keys as keys
from fwdfed.methods import Method
from fwdfed.update import SeedSums


@dataclass
class ScheduledRound:
    method: Method  # one with coordinator_aggregate
    hparams: dict  # its task hyperparameters
    layout: object  # the bundle's AdapterLayout: where the method writes what it computes
    job_strategy: Strategy

    def target(self, connected: int, current: int) -> int:
        return self.job_strategy.target(connected, current)

    def sample(self, idle: list[str], count: int, rng: random.Random) -> list[str]:
        return self.job_strategy.sample(idle, count, rng)

    def configure(self, wave: int, block: Block, devices: list[str], history: Callable[[], History],
                  rng: random.Random) -> dict[str, dict]:
        return {device_id: {**self.hparams, keys.WAVE: wave} for device_id in devices}

    def another_wave(self, updates: list[AcceptedUpdate], dim: int, wave: int,
                     block: Block) -> tuple[bool, float | None]:
        return False, None

    def aggregate(self, global_adapter: np.ndarray, updates: list[AcceptedUpdate], block: Block = None) -> np.ndarray:
        return self.method.coordinator_aggregate(global_adapter, [u.change.dense for u in updates], self.hparams,
                                                 self.layout)

    def version_sums(self, updates: list[AcceptedUpdate], block: Block = None) -> SeedSums:
        """No seeds: the method rewrote part of the adapter (the class statistics' head), which the downlink sends
        as the span of values it changed."""
        return SeedSums([], [], 0.0, None, dense_part=True)

    def round_metrics(self, number: int) -> dict[str, float]:
        return self.job_strategy.round_metrics(number)  # a privacy budget counts every round
