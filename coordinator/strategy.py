"""The aggregation rule, behind one seam: a new method is a new Strategy class.

The round machinery (coordinator.server) collects accepted updates and hands them here with
the round's global adapter; the strategy returns the next global adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from coordinator.store import AcceptedUpdate
from device_sdk.directions import combine


class Strategy(Protocol):
    def aggregate(self, global_adapter: np.ndarray, updates: list[AcceptedUpdate]) -> np.ndarray: ...


@dataclass
class SeedFedAvg:
    """w' = w + server_lr * sum_i (n_i / N) * sum_k coef_ik * direction(seed_ik).

    Each device's update is the sum of its (seed, coefficient) pairs; devices are weighted by
    their number of examples, as in FedAvg.
    """

    server_lr: float = 1.0
    kind: str = "rademacher"

    def aggregate(self, global_adapter: np.ndarray, updates: list[AcceptedUpdate]) -> np.ndarray:
        total = sum(u.num_examples for u in updates)
        if not updates or total <= 0:
            return global_adapter.copy()
        weighted = [(seed, self.server_lr * coef * u.num_examples / total) for u in updates for seed, coef in u.pairs]
        delta = combine(weighted, global_adapter.shape[0], self.kind)
        return (global_adapter.astype(np.float64) + delta).astype(np.float32)
