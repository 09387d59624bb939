import json
from pathlib import Path

import numpy as np
import pytest

from fwdfed.directions import combine, direction, words

GOLDEN = json.loads((Path(__file__).resolve().parents[2] / "docs" / "golden" / "directions.json").read_text())
MASK = (1 << 64) - 1


def splitmix64_reference(seed: int, count: int) -> list[int]:
    """SplitMix64 written with Python integers, straight from its published definition."""
    out, state = [], seed
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & MASK
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        out.append(z ^ (z >> 31))
    return out


def test_first_splitmix64_output_is_the_published_constant():
    assert int(words(0, 0, 1)[0]) == 0xE220A8397B1DCDAF


@pytest.mark.parametrize("seed", [int(s) for s in GOLDEN["words"]])
def test_words_match_the_reference_and_the_golden_file(seed):
    ours = [int(w) for w in words(seed, 0, 64)]
    assert ours == splitmix64_reference(seed, 64)
    assert [str(w) for w in ours[:8]] == GOLDEN["words"][str(seed)]


@pytest.mark.parametrize("seed", [int(s) for s in GOLDEN["words"]])
def test_directions_match_golden_vectors(seed):
    rademacher = direction(seed, 256, "rademacher")
    assert "".join("+" if x > 0 else "-" for x in rademacher) == GOLDEN["rademacher_256"][str(seed)]
    bits = [f"{b:08x}" for b in direction(seed, 256, "gaussian").view(np.uint32)]
    assert bits == GOLDEN["gaussian_256_float32_bits"][str(seed)]


def test_long_stream_checksum():
    import hashlib

    seed = "42"
    z = direction(int(seed), 1_000_000, "rademacher").astype(np.int8)
    assert hashlib.sha256(z.tobytes()).hexdigest() == GOLDEN["rademacher_1000000_sha256_of_int8"][seed]


def test_counter_based_any_slice_without_the_prefix():
    assert np.array_equal(words(7, 1000, 50), words(7, 0, 1050)[1000:])


def test_rademacher_is_plus_minus_one_and_balanced():
    z = direction(3, 100_000)
    assert set(np.unique(z)) == {-1.0, 1.0}
    assert abs(z.mean()) < 0.02  # 5 sigma for n = 1e5
    g = direction(3, 100_001, "gaussian")
    assert g.shape == (100_001,) and abs(g.mean()) < 0.02 and abs(g.std() - 1) < 0.02


def test_bad_seed_and_kind_are_refused():
    for seed in (-1, 1 << 63, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            direction(seed, 4)
    with pytest.raises(ValueError, match="kind"):
        direction(1, 4, "uniform")


def test_combine_sums_coefficients_times_directions():
    pairs = [(1, 0.5), (2, -0.25), (1, 0.5)]
    expected = 1.0 * direction(1, 100).astype(np.float64) - 0.25 * direction(2, 100)
    np.testing.assert_allclose(combine(pairs, 100), expected)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("start, stop", [(0, 10), (3, 11), (4, 4), (7, 8), (100, 257)])
def test_any_slice_equals_the_same_slice_of_the_whole(kind, start, stop):
    from fwdfed.directions import block_direction, direction_slice

    whole = direction(11, 300, kind)
    assert np.array_equal(direction_slice(11, start, stop, kind), whole[start:stop])
    masked = block_direction(11, 300, kind, (start, stop))
    assert np.array_equal(masked[start:stop], whole[start:stop]) and not masked[:start].any() and not masked[stop:].any()
    np.testing.assert_allclose(combine([(11, 2.0)], 300, kind, (start, stop)), 2.0 * masked)


@pytest.mark.parametrize("job_id", list(GOLDEN["seed_pool"]))
def test_a_jobs_seed_pool_is_the_golden_one(job_id):
    """docs/directions.md's pool: the key from sha256 of the job id, the seeds SplitMix64's outputs >> 1."""
    import hashlib

    from fwdfed.directions import pool_key, seed_pool

    gold = GOLDEN["seed_pool"][job_id]
    digest = hashlib.sha256(b"fwdfed seed pool\x00" + job_id.encode("utf-8")).digest()
    assert f"{pool_key(job_id):016x}" == gold["key"] == f"{int.from_bytes(digest[:8], 'big') >> 1:016x}"
    key = int(gold["key"], 16)
    assert [str(int(s)) for s in seed_pool(key, 8)] == gold["seeds"]
    assert [w >> 1 for w in splitmix64_reference(key, 8)] == [int(s) for s in gold["seeds"]]
    assert np.array_equal(seed_pool(key, 3), seed_pool(key, 8)[:3])  # a smaller pool is a prefix of a larger


def test_pools_of_two_jobs_differ():
    from fwdfed.directions import pool_key

    assert pool_key("job-1") != pool_key("job-2") and pool_key("job-1") < 2**63


@pytest.mark.parametrize("seed", [int(s) for s in GOLDEN["words"]])
def test_the_coordinators_in_place_signs_are_the_rademacher_directions(seed):
    from fwdfed.directions import RademacherSigns, direction_slice

    signs = RademacherSigns(3, 300)
    for s in (seed, 7, seed):  # the buffers are reused from one seed to the next
        assert np.array_equal(signs.negative(s), direction_slice(s, 3, 300) < 0)
