"""The seed-form update: w' = scale * w + sum coef * direction(seed) + dense, written once."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from fwdfed import protocol
from fwdfed.directions import KINDS, direction, pool_key, seed_pool
from fwdfed.history import entry, entry_sums
from fwdfed.methods.estimate import parse_seed_pool
from fwdfed.update import PoolOrder, SeedSums, SeedUpdate, replay, round_sums, weighted_sum


def test_apply_is_scale_times_w_plus_the_seeded_directions_plus_dense():
    d = 64
    w = np.random.default_rng(0).standard_normal(d).astype(np.float32)
    dense = np.full(d, 0.25, np.float32)
    update = SeedUpdate([(3, 0.5), (9, -0.25), (3, 0.125)], scale=0.9, dense=dense)
    expected = 0.9 * w.astype(np.float64) + 0.625 * direction(3, d) - 0.25 * direction(9, d) + 0.25
    np.testing.assert_allclose(update.apply(w, "rademacher"), expected.astype(np.float32), rtol=0, atol=1e-6)
    np.testing.assert_allclose(update.delta(w, "rademacher"), expected - w, rtol=0, atol=1e-6)


def test_a_block_restricts_the_directions_but_not_the_scale():
    d, block = 32, (8, 16)
    w = np.ones(d, np.float32)
    new = SeedUpdate([(1, 1.0)], scale=0.5).apply(w, "gaussian", block)
    z = direction(1, d, "gaussian")
    np.testing.assert_allclose(new[:8], 0.5)
    np.testing.assert_allclose(new[8:16], 0.5 + z[8:16], rtol=1e-6)
    np.testing.assert_allclose(new[16:], 0.5)


def test_an_empty_update_changes_nothing():
    w = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(SeedUpdate([]).apply(w, "rademacher"), w)


def random_terms(rng, n: int, d: int, pool: int, scale=False, dense=False) -> list[tuple[float, SeedUpdate]]:
    """n weighted updates whose seeds come from `pool` seeds (so they repeat, within and across updates)."""
    return [(float(rng.uniform(0.01, 0.5)),
             SeedUpdate([(int(s), float(c)) for s, c in zip(rng.integers(0, pool, 6), rng.normal(0, 1e-2, 6))],
                        scale=float(rng.uniform(0.95, 1.0)) if scale and i % 2 else 1.0,
                        dense=rng.normal(0, 1e-3, d).astype(np.float32) if dense and i % 3 == 0 else None))
            for i in range(n)]


def documented_order(w, terms, kind, block=None) -> np.ndarray:
    """docs/protocol.md's Aggregation, element by element with Python floats (float64): the reference."""
    from fwdfed.directions import direction_slice

    sums: dict[int, float] = {}
    for weight, u in terms:
        for seed, coef in u.pairs:
            sums[seed] = sums.get(seed, 0.0) + weight * coef
    start, stop = block or (0, len(w))
    out = [float(x) for x in w]
    for seed, total in sums.items():
        z = direction_slice(seed, start, stop, kind)
        for i in range(start, stop):
            out[i] += total * float(z[i - start])
    shrink = 0.0
    for weight, u in terms:
        shrink += weight * (u.scale - 1.0)
    if shrink != 0.0:
        out = [o + shrink * float(x) for o, x in zip(out, w)]
    dense = None
    for weight, u in terms:
        if u.dense is not None:
            dense = [0.0] * len(w) if dense is None else dense
            dense = [a + weight * float(b) for a, b in zip(dense, u.dense)]
    if dense is not None:
        out = [o + x for o, x in zip(out, dense)]
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("block", [None, (5, 23)])
def test_the_per_seed_sum_is_the_documented_order_bit_for_bit_and_the_per_update_sum_to_rounding(kind, block):
    from fwdfed.update import weighted_sum

    rng, d = np.random.default_rng(4), 40
    w = rng.standard_normal(d).astype(np.float32)
    terms = random_terms(rng, 30, d, pool=7, scale=True, dense=True)
    by_seed = weighted_sum(w, terms, kind, block).astype(np.float32)
    assert np.array_equal(by_seed, documented_order(w, terms, kind, block))
    by_update = w.astype(np.float64) + sum(weight * u.delta(w, kind, block) for weight, u in terms)
    np.testing.assert_allclose(by_seed, by_update.astype(np.float32), rtol=0, atol=1e-6)
    assert np.abs(by_seed - w).max() > 1e-3  # the updates did move the adapter


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_the_per_seed_sum_makes_one_direction_per_distinct_seed(monkeypatch, kind):
    import fwdfed.update
    from fwdfed.directions import RademacherSigns
    from fwdfed.update import weighted_sum

    made = []
    slices, signs = fwdfed.update.direction_slice, RademacherSigns.negative
    monkeypatch.setattr(fwdfed.update, "direction_slice", lambda seed, *a: made.append(seed) or slices(seed, *a))
    monkeypatch.setattr(RademacherSigns, "negative", lambda self, seed: made.append(seed) or signs(self, seed))
    terms = random_terms(np.random.default_rng(5), 2_000, 16, pool=32)
    weighted_sum(np.zeros(16, np.float32), terms, kind)
    assert sorted(made) == sorted({s for _, u in terms for s, _ in u.pairs}) and len(made) <= 32


GOLDEN_REPLAY = Path(__file__).resolve().parents[2] / "docs" / "golden" / "replay.json"


def golden_step(entry: dict) -> dict:
    """A version of docs/golden/replay.json as a task's history carries it: its bins from their hex."""
    step = {k: entry[k] for k in ("version", "shrink", "block")}
    if "sums_hex" in entry:
        step["sums"] = bytes.fromhex(entry["sums_hex"])
    else:
        step |= {"seeds": [int(s) for s in entry["seeds"]], "coefs": entry["coefs"]}
    if "span_hex" in entry:
        step |= {"span_start": entry["span_start"], "span": bytes.fromhex(entry["span_hex"])}
    return step


@pytest.mark.parametrize("kind", KINDS)
def test_replay_matches_the_golden_versions_bit_for_bit(kind):
    """Every wire form (fwdfed.history): through the protocol's checks and a task frame, unpacked against the task's
    seed pool, replayed one version at a time."""
    golden = json.loads(GOLDEN_REPLAY.read_text())
    w = np.array([int(b, 16) for b in golden["start_float32_bits"]], np.uint32).view(np.float32)
    assert hashlib.sha256(w.tobytes()).hexdigest() == golden["start_sha256"]
    hparams = {"kind": kind, "seed_pool": golden["seed_pool"], "seed_pool_key": golden["seed_pool_key"]}
    pool = parse_seed_pool(hparams)
    assert [str(s) for s in pool] == golden["pool_seeds"]
    history = [golden_step(entry) for entry in golden["history"]]
    task = protocol.Task(task_id="t", job_id="j", round=6, global_version=5, base_model_hash="h", adapter=b"",
                         adapter_sha256="", method="mezo", hparams=hparams, deadline_s=1.0, reference=b"",
                         history=history)
    assert {"seeds", "sums", "span"} <= {key for step in history for key in step}  # every form is in the file
    for step, expected in zip(protocol.decode(task.to_wire()).history, golden["kinds"][kind], strict=True):
        w = replay(w, [entry_sums(step, pool)], kind)
        assert [f"{b:08x}" for b in w.view(np.uint32)] == expected["float32_bits"]
        assert hashlib.sha256(w.astype("<f4").tobytes()).hexdigest() == expected["sha256"]


def test_a_version_that_cannot_be_unpacked_or_applied_is_refused():
    pool = np.array([11, 12, 13], np.int64)
    packed = {"version": 1, "sums": np.array([0.0, 1e-3, 0.0], "<f8").tobytes(), "shrink": 0.0, "block": []}
    assert entry_sums(packed, pool).seeds == [12]
    for step, pool_given, reason in [(packed, None, "without a seed pool"), (packed, pool[:2], "not 8 x the pool's 2"),
                                     ({**packed, "sums": np.array([np.nan] * 3, "<f8").tobytes()}, pool,
                                      "not all finite")]:
        with pytest.raises(ValueError, match=reason):
            entry_sums(step, pool_given)
    w = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=r"span \[3, 5\) does not fit the adapter's 4 values"):
        replay(w, [SeedSums([], [], span_start=3, span=np.ones(2, np.float32))], "rademacher")
    with pytest.raises(ValueError, match=r"block \[2, 9\] does not fit"):
        replay(w, [SeedSums([1], [1.0], block=(2, 9))], "rademacher")
    with pytest.raises(ValueError, match="twice"):  # a pool that holds one seed twice, both indices summed
        replay(w, [entry_sums({**packed, "sums": np.array([1.0, 0.0, 1.0], "<f8").tobytes()},
                              np.array([11, 12, 11], np.int64))], "rademacher")


@pytest.mark.parametrize("kind", KINDS)
def test_a_pool_round_applies_its_seeds_in_pool_order_and_skips_zero_sums(kind):
    """Pool order, not first appearance (docs/protocol.md, Aggregation): the packed form then replays to the same
    bits; the order matters in float64 (the two orders differ in some bit), and a seed whose sum is 0 is no term."""
    rng, d, size = np.random.default_rng(3), 256, 8
    pool = PoolOrder(seed_pool(pool_key("job"), size))
    w = rng.standard_normal(d).astype(np.float32)
    pairs = [(int(s), float(c)) for s, c in zip(rng.choice(pool.seeds, 6, replace=False), rng.normal(0, 1.0, 6))]
    cancel = int(next(s for s in pool.seeds if s not in dict(pairs)))
    terms = [(0.5, SeedUpdate(pairs + [(cancel, 1e-3)])), (0.5, SeedUpdate([(cancel, -1e-3)]))]
    by_seed, _, _ = round_sums(terms, pool)
    assert list(by_seed) == [s for s in pool.seeds.tolist() if s in dict(pairs)]  # pool order, the 0 sum left out
    published = weighted_sum(w, terms, kind, pool=pool).astype(np.float32)
    packed = entry(1, SeedSums(list(by_seed), list(by_seed.values())), pool)
    assert "sums" in packed or size * 8 > 19 * len(by_seed)
    assert replay(w, [entry_sums(packed, pool.seeds)], kind).tobytes() == published.tobytes()
    # float64 sums are not associative, so the order is the spec's: here the 1.0 is lost in 1e20 in one order only
    wide = [(int(pool.seeds[0]), 1e20), (int(pool.seeds[1]), -1e20), (int(pool.seeds[2]), 1.0)]
    orders = {weighted_sum(w, [(1.0, SeedUpdate(p))], "rademacher").astype(np.float32).tobytes()
              for p in (wide, wide[::-1])}
    assert len(orders) == 2
    with pytest.raises(ValueError, match="not one of the job's pool of 8"):
        round_sums([(1.0, SeedUpdate([(1, 1.0)]))], pool)


@pytest.mark.parametrize("kind, block", [("rademacher", None), ("gaussian", (5, 40))])
def test_replaying_a_rounds_sums_gives_the_aggregates_bits(kind, block):
    """What a device replays is what the coordinator published: the same function, the same order."""
    rng, d = np.random.default_rng(1), 64
    w = rng.standard_normal(d).astype(np.float32)
    terms = [(float(rng.random()), SeedUpdate([(int(s), float(c)) for s, c in zip(rng.integers(0, 6, 3),
                                                                                   rng.normal(0, 1e-2, 3))],
                                              scale=float(1 - rng.random() * 1e-3))) for _ in range(5)]
    published = weighted_sum(w, terms, kind, block).astype(np.float32)
    by_seed, shrink, dense = round_sums(terms)
    assert dense is None and len(by_seed) < 15  # repeated seeds were summed
    replayed = replay(w, [SeedSums(list(by_seed), list(by_seed.values()), shrink, block)], kind)
    assert replayed.tobytes() == published.tobytes()
    corrupted = [c * 1.001 if k == 0 else c for k, c in enumerate(by_seed.values())]
    off = replay(w, [SeedSums(list(by_seed), corrupted, shrink, block)], kind)
    assert off.tobytes() != published.tobytes()  # one coefficient off by 0.1% shows in the bits
    with pytest.raises(ValueError, match="twice"):
        replay(w, [SeedSums([1, 1], [0.5, 0.5])], kind)
