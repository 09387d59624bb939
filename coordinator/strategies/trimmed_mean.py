"""Coordinate-wise trimmed mean (Yin et al. 2018): a rule that a few devices cannot drag far.

    w' = w + server_lr * trimmed_mean_j(delta_j)

delta_j is device j's change of the adapter (the mean of its updates if it answered several
waves), made dense on the coordinator and restricted to the round's block. For every value,
the k largest and the k smallest of the m devices' changes are dropped and the rest averaged,
k = floor(trim_fraction * m): up to k devices, whatever they send, move no value outside the
range the others span. Devices count alike, not by their examples (a count is the device's own
word). The version is no per-seed sum, so its tasks carry the dense adapter. Rounds are
configured as SeedFedAvg configures them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coordinator.strategies.base import AcceptedUpdate, Block, Option, StrategySpec, device_change, group_by_device
from coordinator.strategies.fedavg import SeedFedAvg


@dataclass
class TrimmedMean(SeedFedAvg):
    @property
    def trim_fraction(self) -> float:
        return float(self.options.strategy_options["trim_fraction"])

    def aggregate(self, global_adapter: np.ndarray, updates: list[AcceptedUpdate], block: Block = None) -> np.ndarray:
        if not updates:
            return global_adapter.copy()
        w = global_adapter.astype(np.float64)
        clipped = [AcceptedUpdate(u.device_id, u.num_examples, self.clipped(u)) for u in updates]  # --clip first
        changes = np.stack([device_change(w, device_updates, self.kind, block)
                            for device_updates in group_by_device(clipped).values()])
        k = int(self.trim_fraction * len(changes))
        kept = np.sort(changes, axis=0)[k : len(changes) - k]
        return (w + self.options.server_lr * kept.mean(axis=0)).astype(np.float32)

    def version_sums(self, updates: list[AcceptedUpdate], block: Block = None) -> None:
        return None


STRATEGY = StrategySpec(
    "trimmed-mean", "each value's trimmed mean over the devices' changes: robust to a few bad devices",
    TrimmedMean,
    options=(Option("trim_fraction", float, 0.2,
                    "drop this share of the devices' changes at each end of every value, then average",
                    lambda t: isinstance(t, (int, float)) and 0 <= t < 0.5, "must be in [0, 0.5)"),),
)
