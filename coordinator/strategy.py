"""The aggregation rule, behind one seam: a new method is a new Strategy class.

The round machinery (coordinator.server) collects accepted updates and hands them here with
the round's global adapter; the strategy returns the next global adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from coordinator.store import AcceptedUpdate
from fwdfed.directions import combine


class Strategy(Protocol):
    def aggregate(self, global_adapter: np.ndarray, updates: list[AcceptedUpdate],
                  block: tuple[int, int] | None = None) -> np.ndarray: ...


@dataclass
class SeedFedAvg:
    """w' = w + server_lr * sum_i (n_i / N) * ((scale_i - 1) w + sum_k coef_ik * direction(seed_ik) + dense_i).

    Each device's update is its seed-form change of the adapter (directions restricted to the
    round's block, if any); devices are weighted by their number of examples, as in FedAvg.
    """

    server_lr: float = 1.0
    kind: str = "rademacher"
    clip: float | None = None  # per-device bound on the norm of its coefficient vector

    def clipped(self, u: AcceptedUpdate) -> list[tuple[int, float]]:
        norm = float(np.sqrt(sum(c * c for _, c in u.pairs)))
        if self.clip is None or norm <= self.clip:
            return u.pairs
        return [(seed, coef * self.clip / norm) for seed, coef in u.pairs]

    def aggregate(self, global_adapter: np.ndarray, updates: list[AcceptedUpdate],
                  block: tuple[int, int] | None = None) -> np.ndarray:
        total = sum(u.num_examples for u in updates)
        if not updates or total <= 0:
            return global_adapter.copy()
        weights = [self.server_lr * u.num_examples / total for u in updates]
        weighted = [(seed, w * coef) for u, w in zip(updates, weights) for seed, coef in self.clipped(u)]
        w64 = global_adapter.astype(np.float64)
        shrink = sum(w * (u.scale - 1.0) for u, w in zip(updates, weights))
        dense = sum((w * u.dense.astype(np.float64) for u, w in zip(updates, weights) if u.dense is not None), 0.0)
        new = w64 + shrink * w64 + combine(weighted, global_adapter.shape[0], self.kind, block) + dense
        return new.astype(np.float32)


def device_deltas(updates: list[AcceptedUpdate], dim: int, kind: str, block=None) -> np.ndarray:
    """Each device's dense change of the adapter (scale ignored), [devices, dim]."""
    return np.stack([combine(u.pairs, dim, kind, block) for u in updates])


def estimate_variance(updates: list[AcceptedUpdate], dim: int, kind: str, lr: float, block=None) -> float:
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
