"""The direction generator: `(seed, d, kind) -> z in R^d`, the same on every device and server.

Specification (docs/directions.md repeats it for other implementations):

    GAMMA = 0x9E3779B97F4A7C15
    mix64(x):  x ^= x >> 30; x *= 0xBF58476D1CE4E5B9
               x ^= x >> 27; x *= 0x94D049BB133111EB
               x ^= x >> 31                                  (all arithmetic mod 2^64)
    word(seed, i) = mix64(seed + (i + 1) * GAMMA)           i = 0, 1, 2, ...

`word(seed, i)` is the i-th output of SplitMix64 seeded with `seed`, but computed from the
counter i alone, so any element can be produced without the ones before it.

- rademacher: z_i = +1.0 if the top bit of word(seed, i) is 0, else -1.0.  Exact everywhere.
- gaussian:   for the pair k = i // 2, u1 = ((word(seed, 2k) >> 11) + 1) * 2^-53 (in (0, 1]),
              u2 = (word(seed, 2k+1) >> 11) * 2^-53, r = sqrt(-2 ln u1), t = 2 pi u2;
              z_2k = r cos t, z_2k+1 = r sin t, computed in float64, rounded to float32.
              Equal across languages up to their libm's last-ulp differences in ln/cos/sin.

Seeds are integers in [0, 2^63), so that they fit a Java long and a msgpack int unchanged.
"""

from __future__ import annotations

import numpy as np

from fwdfed import task_keys as keys

GAMMA = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
SEED_LIMIT = 1 << 63
KINDS = ("rademacher", "gaussian")


def task_kind(hparams: dict) -> str:
    """The kind a task's directions are drawn from: its `kind`, rademacher when it names none."""
    return str(hparams.get(keys.KIND, KINDS[0]))


def _mix64(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * MIX1
    x = (x ^ (x >> np.uint64(27))) * MIX2
    return x ^ (x >> np.uint64(31))


def words(seed: int, start: int, count: int) -> np.ndarray:
    """word(seed, i) for i in [start, start + count), as uint64."""
    check_seed(seed)
    counters = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _mix64(np.uint64(seed) + counters * GAMMA)


def direction(seed: int, dim: int, kind: str = "rademacher") -> np.ndarray:
    """The float32 direction named by `seed` in R^dim."""
    return direction_slice(seed, 0, dim, kind)


def direction_slice(seed: int, start: int, stop: int, kind: str = "rademacher") -> np.ndarray:
    """Elements [start, stop) of every direction named by `seed`, without computing the others."""
    if kind == "rademacher":
        top = words(seed, start, stop - start) >> np.uint64(63)
        return (1.0 - 2.0 * top.astype(np.float32)).astype(np.float32)
    if kind == "gaussian":
        first, last = start // 2, (stop + 1) // 2  # the pairs that hold elements start .. stop-1
        w = words(seed, 2 * first, 2 * (last - first)).reshape(-1, 2) >> np.uint64(11)
        u1 = (w[:, 0].astype(np.float64) + 1.0) * 2.0**-53
        u2 = w[:, 1].astype(np.float64) * 2.0**-53
        r, t = np.sqrt(-2.0 * np.log(u1)), 2.0 * np.pi * u2
        pairs = np.stack([r * np.cos(t), r * np.sin(t)], axis=1).reshape(-1)
        return pairs[start - 2 * first : stop - 2 * first].astype(np.float32)
    raise ValueError(f"unknown direction kind {kind!r}; expected one of {KINDS}")


class RademacherSigns:
    """Elements [start, stop) of many Rademacher directions, one seed after another, in buffers made once:
    the words of `words` computed in place (the counters' (i + 1) * GAMMA kept), for the coordinator's
    per-seed sums. `negative(seed)` is True where the element is -1.0 (bit 63 set); the array is reused."""

    def __init__(self, start: int, stop: int):
        self.steps = np.arange(start + 1, stop + 1, dtype=np.uint64) * GAMMA
        self.x, self.t = np.empty_like(self.steps), np.empty_like(self.steps)
        self.neg = np.empty(self.steps.shape, dtype=bool)

    def negative(self, seed: int) -> np.ndarray:
        check_seed(seed)
        x, t = self.x, self.t
        with np.errstate(over="ignore"):
            np.add(self.steps, np.uint64(seed), out=x)
            for shift, mult in ((30, MIX1), (27, MIX2)):
                np.right_shift(x, np.uint64(shift), out=t)
                x ^= t
                x *= mult
            np.right_shift(x, np.uint64(31), out=t)
            x ^= t
        return np.less(x.view(np.int64), 0, out=self.neg)


def block_direction(seed: int, dim: int, kind: str = "rademacher", block: tuple[int, int] | None = None) -> np.ndarray:
    """The direction restricted to `block` = (start, stop): zero outside it (block-cyclic updates)."""
    if block is None:
        return direction(seed, dim, kind)
    z = np.zeros(dim, dtype=np.float32)
    z[block[0] : block[1]] = direction_slice(seed, block[0], block[1], kind)
    return z


def check_seed(seed: int) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= int(seed) < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")


def combine(pairs: list[tuple[int, float]], dim: int, kind: str = "rademacher",
            block: tuple[int, int] | None = None, scales=None) -> np.ndarray:
    """sum_k coef_k * direction(seed_k) (restricted to `block`, times `scales`: fwdfed.tensor_scale), in float64."""
    from fwdfed.tensor_scale import expand  # which imports nothing of this module's


    by_seed: dict[int, float] = {}
    for seed, coef in pairs:
        by_seed[int(seed)] = by_seed.get(int(seed), 0.0) + float(coef)
    start, stop = block or (0, dim)
    total = np.zeros(dim, dtype=np.float64)
    factor = None if scales is None else expand(scales, dim)[start:stop]
    for seed, coef in by_seed.items():
        z = direction_slice(seed, start, stop, kind)
        total[start:stop] += coef * (z if factor is None else z * factor)
    return total


# FedKSeed's shared seed pool (`coordinator serve --seed-pool K`): every direction of a job is one of K seeds
# the job fixes, so the coordinator aggregates at most K directions a round whatever the number of updates.
MAX_SEED_POOL = 1 << 20
POOL_KEY_PREFIX = b"fwdfed seed pool\x00"


def pool_key(job_id: str) -> int:
    """The key of a job's pool: the first 8 bytes of sha256(POOL_KEY_PREFIX + job id in UTF-8), big-endian,
    shifted right by one (so that it is itself a seed, in [0, 2^63))."""
    import hashlib

    return int.from_bytes(hashlib.sha256(POOL_KEY_PREFIX + job_id.encode()).digest()[:8], "big") >> 1


def seed_pool(key: int, size: int) -> np.ndarray:
    """The pool: seed j = word(key, j) >> 1 for j in [0, size), as int64 (each in [0, 2^63))."""
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or not 1 <= size <= MAX_SEED_POOL:
        raise ValueError(f"a seed pool holds 1 to {MAX_SEED_POOL} seeds, got {size!r}")
    return (words(key, 0, int(size)) >> np.uint64(1)).astype(np.int64)
