"""The seed-form update: a device's change of the adapter, named by seeds.

    w' = scale * w + sum_k coef_k * direction(seed_k) + dense

`scale` is 1 unless MeZO's weight decay shrank the adapter; `dense` is empty but for the
backprop baseline. Devices build one to say what they did. `delta` and `apply` are the one
place this formula is written for one update; `weighted_sum` is the coordinator's for a round
of them, by seed (FedKSeed's aggregation: one direction per distinct seed of the round, so a
job with a seed pool of K costs at most K directions whatever the number of updates).
docs/protocol.md states both for other implementations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fwdfed.directions import RademacherSigns, combine, direction_slice


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


def weighted_sum(w: np.ndarray, terms: list[tuple[float, SeedUpdate]], kind: str,
                 block: tuple[int, int] | None = None) -> np.ndarray:
    """w + sum_i weight_i * delta_i in float64, computed by seed, in this fixed order (docs/protocol.md,
    Aggregation), so that a version recomputed from the stored updates has the same bits:

    1. C_s = sum over the terms in order, and over each one's pairs in order, of weight_i * coef (float64),
       for every distinct seed s, kept in order of first appearance;
    2. from w (float64), add C_s * z_s (z_s the float32 direction, exact in float64, restricted to `block`)
       for each seed in that order;
    3. add S * w, S = sum_i weight_i * (scale_i - 1) (skipped when S is 0);
    4. add D = sum_i weight_i * dense_i (float64, from zero; skipped when no term has a dense part).
    """
    w64 = np.asarray(w, dtype=np.float64)
    by_seed: dict[int, float] = {}
    shrink, dense = 0.0, None
    for weight, update in terms:
        for seed, coef in update.pairs:
            by_seed[int(seed)] = by_seed.get(int(seed), 0.0) + weight * float(coef)
        shrink += weight * (update.scale - 1.0)
        if update.dense is not None:
            dense = np.zeros_like(w64) if dense is None else dense
            dense += weight * update.dense.astype(np.float64)
    start, stop = block or (0, w64.shape[0])
    new = w64.copy()
    if kind == "rademacher":  # C_s * (+-1.0) is +-C_s exactly: the same bits, without the float32 direction
        signs = RademacherSigns(start, stop)
        for seed, coef in by_seed.items():
            new[start:stop] += np.where(signs.negative(seed), -coef, coef)
    else:
        for seed, coef in by_seed.items():
            new[start:stop] += coef * direction_slice(seed, start, stop, kind).astype(np.float64)
    if shrink != 0.0:
        new += shrink * w64
    if dense is not None:
        new += dense
    return new
