"""The seed-form update: a device's change of the adapter, named by seeds.

    w' = scale * w + sum_k coef_k * direction(seed_k) + dense

`scale` is 1 unless MeZO's weight decay shrank the adapter; `dense` is empty but for the
backprop baseline. Devices build one to say what they did; the coordinator rebuilds each
device's change from it and aggregates. `delta` and `apply` are the one place this formula
is written; docs/protocol.md states it for other implementations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fwdfed.directions import combine


@dataclass(frozen=True)
class SeedUpdate:
    pairs: list[tuple[int, float]]  # (seed, coefficient), in the order they were made
    scale: float = 1.0
    dense: np.ndarray | None = None  # float32 [d], or None

    def delta(self, w: np.ndarray, kind: str, block: tuple[int, int] | None = None) -> np.ndarray:
        """w' - w in float64: (scale - 1) w + sum coef * direction(seed) (restricted to `block`) + dense."""
        w64 = np.asarray(w, dtype=np.float64)
        change = combine(self.pairs, w64.shape[0], kind, block)
        if self.scale != 1.0:
            change += (self.scale - 1.0) * w64
        if self.dense is not None:
            change += self.dense.astype(np.float64)
        return change

    def apply(self, w: np.ndarray, kind: str, block: tuple[int, int] | None = None) -> np.ndarray:
        """w' as float32: what the device's adapter became."""
        return (np.asarray(w, dtype=np.float64) + self.delta(w, kind, block)).astype(np.float32)

    def with_pairs(self, pairs: list[tuple[int, float]]) -> "SeedUpdate":
        return SeedUpdate(pairs, self.scale, self.dense)
