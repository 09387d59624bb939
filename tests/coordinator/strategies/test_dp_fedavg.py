from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator.job import JobOptions
from coordinator.strategies import AcceptedUpdate, SeedFedAvg
from coordinator.strategies.dp_fedavg import DPSeedFedAvg, gaussian_epsilon

NO_NOISE = 1e-30  # with NO_CLIP, a noise std of 1e-18: below float32 resolution
NO_CLIP = 1e12


def dp_strategy(clip, noise_multiplier, kind: str = "rademacher", server_lr: float = 1.0, seed=None) -> DPSeedFedAvg:
    options = JobOptions(server_lr=server_lr, strategy="dp-fedavg",
                         strategy_options={"dp_clip": clip, "dp_noise_multiplier": noise_multiplier})
    return DPSeedFedAvg(hparams={"kind": kind}, options=options, seed=seed)


def adapter(dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def random_updates(dim: int, devices: int, seed: int = 1, scale: bool = True, dense: bool = True,
                   waves: int = 1) -> list[AcceptedUpdate]:
    """`waves` updates from each of `devices` devices, each with a few seed-form pairs."""
    rng = np.random.default_rng(seed)
    return [AcceptedUpdate.of(f"dev{i}", [(int(rng.integers(1 << 62)), float(rng.normal())) for _ in range(3)], 7,
                           scale=float(rng.uniform(0.9, 1.0)) if scale else 1.0,
                           dense=(0.1 * rng.standard_normal(dim)).astype(np.float32) if dense else None)
            for _ in range(waves) for i in range(devices)]


def change_norm(new: np.ndarray, old: np.ndarray) -> float:
    return float(np.linalg.norm(new.astype(np.float64) - old.astype(np.float64)))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("block, extras", [(None, True), ((10, 40), False)])
def test_without_noise_or_clip_it_is_seedfedavg_with_equal_counts(kind, block, extras):
    # SeedFedAvg applies a shrink or dense part outside the block; the DP strategy drops it there.
    w, updates = adapter(64), random_updates(64, 4, scale=extras, dense=extras)
    dp = dp_strategy(clip=NO_CLIP, noise_multiplier=NO_NOISE, kind=kind, server_lr=0.5, seed=0)
    expected = SeedFedAvg(hparams={"kind": kind}, options=JobOptions(server_lr=0.5)).aggregate(w, updates, block)
    got = dp.aggregate(w, updates, block)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert change_norm(got, w) > 0.1  # the comparison is not between two unchanged adapters


def test_example_counts_do_not_weigh():
    w, updates = adapter(32), random_updates(32, 3)
    skewed = [AcceptedUpdate(u.device_id, n, u.change) for u, n in zip(updates, (1, 1000, 5))]
    dp = dp_strategy(clip=NO_CLIP, noise_multiplier=NO_NOISE, seed=0)
    np.testing.assert_allclose(dp.aggregate(w, skewed), SeedFedAvg().aggregate(w, updates), rtol=1e-6, atol=1e-6)


def test_every_device_answering_every_wave_is_seedfedavg():
    w, updates = adapter(32), random_updates(32, 3, waves=2)
    dp = dp_strategy(clip=NO_CLIP, noise_multiplier=NO_NOISE, seed=0)
    np.testing.assert_allclose(dp.aggregate(w, updates), SeedFedAvg().aggregate(w, updates), rtol=1e-6, atol=1e-6)


def huge(device_id: str) -> AcceptedUpdate:
    return AcceptedUpdate.of(device_id, [(s, 1e6) for s in range(5)], 1, scale=3.0, dense=np.full(64, 1e4, np.float32))


def silent(device_id: str) -> AcceptedUpdate:
    return AcceptedUpdate.of(device_id, [], 1)


def test_one_huge_device_moves_the_adapter_by_clip_over_m():
    w = adapter(64)
    dp = dp_strategy(clip=2.0, noise_multiplier=NO_NOISE, server_lr=0.5, seed=0)
    moved = change_norm(dp.aggregate(w, [huge("a"), silent("b"), silent("c"), silent("d")]), w)
    assert moved == pytest.approx(0.5 * 2.0 / 4, rel=1e-5)


def test_a_device_with_several_waves_is_clipped_once():
    # Clipping each update would let "a" move the adapter by 3 C / 5 instead of C / 3.
    w = adapter(64)
    dp = dp_strategy(clip=1.0, noise_multiplier=NO_NOISE, seed=0)
    moved = change_norm(dp.aggregate(w, [huge("a"), huge("a"), huge("a"), silent("b"), silent("c")]), w)
    assert moved == pytest.approx(1.0 / 3, rel=1e-5)


def test_zeroing_one_device_moves_the_aggregate_by_at_most_clip_over_m():
    w, others = adapter(64), random_updates(64, 3)
    dp = dp_strategy(clip=0.5, noise_multiplier=NO_NOISE, server_lr=0.8, seed=0)
    with_it = dp.aggregate(w, [huge("x"), *others])
    without_it = dp.aggregate(w, [silent("x"), *others])
    assert change_norm(with_it, without_it) == pytest.approx(0.8 * 0.5 / 4, rel=1e-4)


def test_small_changes_are_not_clipped():
    w, updates = adapter(64), random_updates(64, 2)
    dp = dp_strategy(clip=NO_CLIP, noise_multiplier=NO_NOISE, seed=0)
    tight = dp_strategy(clip=1e3, noise_multiplier=NO_NOISE, seed=0)
    np.testing.assert_array_equal(tight.aggregate(w, updates), dp.aggregate(w, updates))


def noise_of(w: np.ndarray, updates: list[AcceptedUpdate], block=None, **config) -> np.ndarray:
    """The noise the DP strategy added: its result minus the same aggregation without noise."""
    noisy = dp_strategy(**config, seed=3).aggregate(w, updates, block).astype(np.float64)
    clean = dp_strategy(**{**config, "noise_multiplier": NO_NOISE}, seed=3).aggregate(w, updates, block)
    return noisy - clean.astype(np.float64)


def test_the_noise_has_std_sigma_clip_over_m():
    dim, config = 200_000, dict(clip=0.3, noise_multiplier=0.7, server_lr=0.5)
    updates = random_updates(dim, 3)
    noise = noise_of(adapter(dim), updates, **config) / 0.5
    assert noise.std() == pytest.approx(0.7 * 0.3 / 3, rel=0.02)
    assert abs(noise.mean()) < 5 * noise.std() / math.sqrt(dim)


def test_with_a_block_only_the_block_changes_and_is_noised():
    dim, block = 200_000, (50_000, 150_000)
    w = adapter(dim)
    updates = random_updates(dim, 4)  # with a shrink and a dense part outside the block too
    new = dp_strategy(clip=1.0, noise_multiplier=1.5, seed=3).aggregate(w, updates, block)
    np.testing.assert_array_equal(new[: block[0]], w[: block[0]])
    np.testing.assert_array_equal(new[block[1] :], w[block[1] :])
    noise = noise_of(w, updates, block, clip=1.0, noise_multiplier=1.5)
    assert noise[block[0] : block[1]].std() == pytest.approx(1.5 * 1.0 / 4, rel=0.02)


def test_the_noise_is_reproducible_from_a_seed_and_unpredictable_without_one():
    w, updates = adapter(64), random_updates(64, 2)
    config = dict(clip=1.0, noise_multiplier=1.0)
    seeded = [dp_strategy(**config, seed=5).aggregate(w, updates) for _ in range(2)]
    np.testing.assert_array_equal(seeded[0], seeded[1])
    unseeded = [dp_strategy(**config).aggregate(w, updates) for _ in range(2)]
    assert not np.array_equal(unseeded[0], unseeded[1])


def test_no_updates_give_an_unchanged_copy():
    w = adapter(16)
    new = dp_strategy(clip=1.0, noise_multiplier=1.0, seed=0).aggregate(w, [])
    np.testing.assert_array_equal(new, w)
    assert new is not w


@pytest.mark.parametrize("config", [dict(clip=0.0, noise_multiplier=1.0), dict(clip=-1.0, noise_multiplier=1.0),
                                    dict(clip=math.nan, noise_multiplier=1.0), dict(clip=1.0, noise_multiplier=0.0),
                                    dict(clip=1.0, noise_multiplier=math.inf),
                                    dict(clip=1.0, noise_multiplier=1.0, kind="uniform")])
def test_bad_configurations_are_refused(config):
    with pytest.raises(ValueError):
        dp_strategy(**config)


def grid_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """Brute force: min over a fine log grid of alpha > 1 of rounds * alpha / (2 sigma^2) + log(1/delta) / (alpha - 1)."""
    alpha = 1.0 + np.geomspace(1e-6, 1e6, 2_000_001)
    return float(np.min(rounds * alpha / (2 * sigma**2) + math.log(1 / delta) / (alpha - 1)))


@pytest.mark.parametrize("sigma, rounds, delta", [(0.5, 10, 1e-5), (1.0, 100, 1e-5), (4.0, 1, 1e-3), (2.0, 1000, 1e-8)])
def test_the_closed_form_is_the_grid_minimum(sigma, rounds, delta):
    closed, grid = gaussian_epsilon(sigma, rounds, delta), grid_epsilon(sigma, rounds, delta)
    assert closed <= grid * (1 + 1e-12)  # nothing on the grid beats the closed form...
    assert closed == pytest.approx(grid, rel=1e-6)  # ...and the grid comes as close as it allows


def test_a_known_value():
    # sigma 1, 100 rounds, delta 1e-5: 100 / 2 + sqrt(2 * 100 * ln(1e5)) = 50 + 47.98526
    assert gaussian_epsilon(1.0, 100, 1e-5) == pytest.approx(97.9852591, rel=1e-8)
    assert gaussian_epsilon(1.0, 100, 1e-5) == pytest.approx(grid_epsilon(1.0, 100, 1e-5), rel=1e-6)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    by_rounds = [gaussian_epsilon(1.0, t, 1e-5) for t in (0, 1, 10, 100, 1000)]
    assert by_rounds[0] == 0.0 and by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 5
    by_sigma = [gaussian_epsilon(s, 50, 1e-5) for s in (0.5, 1.0, 2.0, 4.0)]
    assert by_sigma == sorted(by_sigma, reverse=True) and len(set(by_sigma)) == 4
    assert gaussian_epsilon(1.0, 50, 1e-8) > gaussian_epsilon(1.0, 50, 1e-3)


@pytest.mark.parametrize("sigma, rounds, delta", [(0.0, 10, 1e-5), (-1.0, 10, 1e-5), (math.nan, 10, 1e-5),
                                                  (1.0, -1, 1e-5), (1.0, 2.5, 1e-5), (1.0, True, 1e-5),
                                                  (1.0, 10, 0.0), (1.0, 10, 1.0), (1.0, 10, math.nan)])
def test_bad_accounting_arguments_are_refused(sigma, rounds, delta):
    with pytest.raises(ValueError):
        gaussian_epsilon(sigma, rounds, delta)
