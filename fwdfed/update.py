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
from functools import lru_cache

import numpy as np

from fwdfed.directions import RademacherSigns, combine, direction_slice, seed_pool
from fwdfed.tensor_scale import ScaleRanges, expand


@dataclass(frozen=True)
class SeedUpdate:
    pairs: list[tuple[int, float]]  # (seed, coefficient), in the order they were made
    scale: float = 1.0
    dense: np.ndarray | None = None  # float32 [d], or None

    def delta(self, w: np.ndarray, kind: str, block: tuple[int, int] | None = None,
              scales: ScaleRanges | None = None) -> np.ndarray:
        """w' - w in float64: (scale - 1) w + sum coef * direction(seed) (restricted to `block`, times the
        per-tensor `scales`) + dense."""
        w64 = np.asarray(w, dtype=np.float64)
        change = combine(self.pairs, w64.shape[0], kind, block, scales)
        if self.scale != 1.0:
            change += (self.scale - 1.0) * w64
        if self.dense is not None:
            change += self.dense.astype(np.float64)
        return change

    def apply(self, w: np.ndarray, kind: str, block: tuple[int, int] | None = None,
              scales: ScaleRanges | None = None) -> np.ndarray:
        """w' as float32: what the device's adapter became."""
        return (np.asarray(w, dtype=np.float64) + self.delta(w, kind, block, scales)).astype(np.float32)

    def with_pairs(self, pairs: list[tuple[int, float]]) -> "SeedUpdate":
        return SeedUpdate(pairs, self.scale, self.dense)


@dataclass(frozen=True)
class SeedSums:
    """One version's change in seed form, exactly as the coordinator applied it (docs/protocol.md, Aggregation):
    the per-seed sums C_s in the order they were applied, the shrink S, and the round's block (None: all of w);
    and, for a version that also changed values outside them (a dense part: the class-statistics head, a hybrid
    head), the float32 values of the span [span_start, span_start + len(span)) it set. A device that holds the
    previous version replays it (`replay`) to the same bits."""
    seeds: list[int]
    coefs: list[float]  # float64, C_s for seeds[k]
    shrink: float = 0.0
    block: tuple[int, int] | None = None
    span_start: int = 0
    span: np.ndarray | None = None  # float32: the version's own values there, set after the sums
    # The strategy's word that the version has a part beyond these sums (a dense part): the downlink then finds
    # the span of values the sums do not give, and sends it (coordinator.downlink). Not on the wire.
    dense_part: bool = False


class PoolOrder:
    """A job's seed pool (FedKSeed) as the order in which a round applies its seeds (docs/protocol.md,
    Aggregation): pool order, each seed at its first index in the pool, a seed whose sum is 0 left out. So a
    version's sums can go down as K packed float64 values, one per pool index (fwdfed.history), and replay to
    the same bits."""

    def __init__(self, pool: np.ndarray):
        self.seeds = np.asarray(pool, dtype=np.int64)
        self.index: dict[int, int] = {}
        for j, seed in enumerate(self.seeds.tolist()):
            self.index.setdefault(seed, j)

    def __len__(self) -> int:
        return len(self.seeds)

    def order(self, by_seed: dict[int, float]) -> dict[int, float]:
        """`by_seed` in pool order, without the seeds whose sum is 0 (adding 0 * z changes nothing but the sign
        of a zero); ValueError for a seed outside the pool (the coordinator refuses those: outside_pool)."""
        if (outside := next((s for s in by_seed if s not in self.index), None)) is not None:
            raise ValueError(f"seed {outside} is not one of the job's pool of {len(self)}")
        return {s: by_seed[s] for s in sorted(by_seed, key=self.index.__getitem__) if by_seed[s] != 0.0}


@lru_cache(maxsize=4)
def pool_order(key: int, size: int) -> PoolOrder:
    """The pool of this key and size (fwdfed.directions.seed_pool) as a PoolOrder, made once per pool."""
    return PoolOrder(seed_pool(key, size))


def round_sums(terms: list[tuple[float, SeedUpdate]], pool: PoolOrder | None = None
               ) -> tuple[dict[int, float], float, np.ndarray | None]:
    """Steps 1, 3 and 4's sums of `weighted_sum`: C_s by seed (in order of first appearance; with a seed `pool`,
    in pool order without the zero sums: PoolOrder), S, and D (None when no term has a dense part)."""
    by_seed: dict[int, float] = {}
    shrink, dense = 0.0, None
    for weight, update in terms:
        for seed, coef in update.pairs:
            by_seed[int(seed)] = by_seed.get(int(seed), 0.0) + weight * float(coef)
        shrink += weight * (update.scale - 1.0)
        if update.dense is not None:
            dense = np.zeros(update.dense.shape[0], np.float64) if dense is None else dense
            dense += weight * update.dense.astype(np.float64)
    return (by_seed if pool is None else pool.order(by_seed)), shrink, dense


def apply_sums(w: np.ndarray, by_seed: dict[int, float], shrink: float, kind: str,
               block: tuple[int, int] | None = None, dense: np.ndarray | None = None,
               scales: ScaleRanges | None = None) -> np.ndarray:
    """Steps 2 to 4 of `weighted_sum` (float64): the one place both aggregation and a device's replay of a
    version's seed sums compute w', so that the two cannot drift apart by a bit."""
    w64 = np.asarray(w, dtype=np.float64)
    start, stop = block or (0, w64.shape[0])
    new = w64.copy()
    factor = None if scales is None else expand(scales, w64.shape[0])[start:stop]  # float32, exact in float64
    if kind == "rademacher":  # C_s * (+-1.0) is +-C_s exactly: the same bits, without the float32 direction;
        signs = RademacherSigns(start, stop)  # and C_s * float32(+-1 * scale) is (+-C_s) * scale exactly
        for seed, coef in by_seed.items():
            step = np.where(signs.negative(seed), -coef, coef)
            new[start:stop] += step if factor is None else step * factor
    else:
        for seed, coef in by_seed.items():
            z = direction_slice(seed, start, stop, kind)
            new[start:stop] += coef * (z if factor is None else z * factor).astype(np.float64)
    if shrink != 0.0:
        new += shrink * w64
    if dense is not None:
        new += dense
    return new


def replay(w: np.ndarray, history: list[SeedSums], kind: str) -> np.ndarray:
    """The float32 adapter after every version of `history`, in order, from float32 `w`: each version from
    the float32 result of the one before, its sums applied in float64 and rounded to float32 at its end, as the
    coordinator published it, then its span's float32 values set. ValueError for a version that cannot apply
    (a seed twice, a block or a span that does not fit w)."""
    w = np.asarray(w, dtype=np.float32)
    for sums in history:
        by_seed = dict(zip((int(s) for s in sums.seeds), (float(c) for c in sums.coefs)))
        if len(by_seed) != len(sums.seeds):
            raise ValueError("a version's seed sums name a seed twice")
        if sums.block is not None and not 0 <= sums.block[0] < sums.block[1] <= w.shape[0]:
            raise ValueError(f"block {list(sums.block)} does not fit the adapter's {w.shape[0]} values")
        w = apply_sums(w, by_seed, float(sums.shrink), kind, sums.block).astype(np.float32)
        if sums.span is not None:
            stop = sums.span_start + len(sums.span)
            if not 0 <= sums.span_start < stop <= w.shape[0]:
                raise ValueError(f"span [{sums.span_start}, {stop}) does not fit the adapter's {w.shape[0]} values")
            w[sums.span_start : stop] = np.asarray(sums.span, dtype=np.float32)
    return w


def weighted_sum(w: np.ndarray, terms: list[tuple[float, SeedUpdate]], kind: str,
                 block: tuple[int, int] | None = None, scales: ScaleRanges | None = None,
                 pool: PoolOrder | None = None) -> np.ndarray:
    """w + sum_i weight_i * delta_i in float64, computed by seed, in this fixed order (docs/protocol.md,
    Aggregation), so that a version recomputed from the stored updates has the same bits:

    1. C_s = sum over the terms in order, and over each one's pairs in order, of weight_i * coef (float64),
       for every distinct seed s, kept in order of first appearance (with a seed `pool`: in pool order, a seed
       whose C_s is 0 left out: PoolOrder);
    2. from w (float64), add C_s * z_s (z_s the float32 direction, exact in float64, restricted to `block`,
       and with per-tensor `scales` the float32 product z_s * scale: fwdfed.tensor_scale) for each seed in
       that order;
    3. add S * w, S = sum_i weight_i * (scale_i - 1) (skipped when S is 0);
    4. add D = sum_i weight_i * dense_i (float64, from zero; skipped when no term has a dense part).
    """
    by_seed, shrink, dense = round_sums(terms, pool)
    return apply_sums(w, by_seed, shrink, kind, block, dense, scales)
