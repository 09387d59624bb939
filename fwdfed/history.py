"""A task's seed-form history on the wire (docs/protocol.md, Downlink in seed form): one map per version, made by
the coordinator (`entry`, the smaller of its forms) and read back by a device (`entry_sums`), which replays it
(fwdfed.update.replay).

A version's sums go as `seeds` and `coefs` arrays (a msgpack int and a float 64 each, about 19 bytes a seed),
or, in a job with a seed pool of K, as `sums`: K float64 values packed little-endian, one per pool index (8
bytes a pool seed, 0 where the version applies none), whichever makes the smaller map. A version with a part
beyond its sums (a dense part: the class-statistics head, a hybrid head) carries the float32 values of the span
those changed (`span_start`, `span`), set after the sums.
"""

from __future__ import annotations

import msgpack
import numpy as np

from fwdfed.update import PoolOrder, SeedSums

COMMON = frozenset({"version", "shrink", "block"})  # in every entry
ARRAYS = frozenset({"seeds", "coefs"})  # the sums as seeds and their coefficients ...
PACKED = frozenset({"sums"})  # ... or packed by pool index: one of the two
SPAN = frozenset({"span_start", "span"})  # both or neither
FORMS = tuple(COMMON | sums | span for sums in (ARRAYS, PACKED) for span in (frozenset(), SPAN))


def entry(version: int, sums: SeedSums, pool: PoolOrder | None = None) -> dict:
    """The history map of `version` (its sums and span): with the sums packed when the job has a seed `pool`, the
    sums are in its order (`PoolOrder.order`: so they replay the same from either form), and the map is smaller."""
    common = {"version": version, "shrink": float(sums.shrink), "block": [int(b) for b in sums.block or ()]}
    if sums.span is not None:
        common |= {"span_start": int(sums.span_start), "span": np.asarray(sums.span, "<f4").tobytes()}
    arrays = common | {"seeds": [int(s) for s in sums.seeds], "coefs": [float(c) for c in sums.coefs]}
    if pool is None or not in_pool_order(sums, pool):
        return arrays
    packed = np.zeros(len(pool), "<f8")
    packed[[pool.index[int(s)] for s in sums.seeds]] = sums.coefs
    packed_entry = common | {"sums": packed.tobytes()}
    return min((arrays, packed_entry), key=lambda e: len(msgpack.packb(e, use_bin_type=True)))


def in_pool_order(sums: SeedSums, pool: PoolOrder) -> bool:
    """Whether the sums are a pool job's, as it aggregates them: pool seeds in pool order, none of them 0."""
    seeds = [int(s) for s in sums.seeds]
    if len(set(seeds)) != len(seeds) or any(s not in pool.index for s in seeds):
        return False
    return seeds == list(pool.order(dict(zip(seeds, (float(c) for c in sums.coefs)))))


def entry_sums(step: dict, pool: np.ndarray | None) -> SeedSums:
    """A history map (checked as a message by fwdfed.protocol) as the sums it replays: packed `sums` unpacked
    against the task's seed `pool` (None: the task names none). ValueError where they cannot be: packed sums in
    a task without a pool, or not 8·K bytes, or not finite. The block and span are checked by `replay`."""
    if "sums" in step:
        if pool is None:
            raise ValueError("a version's packed sums in a task without a seed pool")
        if len(step["sums"]) != 8 * len(pool):
            raise ValueError(f"a version's packed sums are {len(step['sums'])} bytes, not 8 x the pool's {len(pool)}")
        packed = np.frombuffer(step["sums"], "<f8")
        if not np.all(np.isfinite(packed)):
            raise ValueError("a version's packed sums are not all finite")
        applied = np.flatnonzero(packed != 0.0)
        seeds, coefs = [int(s) for s in np.asarray(pool)[applied]], [float(c) for c in packed[applied]]
    else:
        seeds, coefs = [int(s) for s in step["seeds"]], [float(c) for c in step["coefs"]]
    span = np.frombuffer(step["span"], "<f4").copy() if "span" in step else None
    return SeedSums(seeds, coefs, float(step["shrink"]), tuple(step["block"]) or None,
                    int(step.get("span_start", 0)), span)
