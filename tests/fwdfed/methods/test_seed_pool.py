"""FedKSeed's seed pool on the device side: a task that names a pool gets every direction from it."""

import numpy as np
import pytest

from fwdfed import methods
from fwdfed.batch import Batch
from fwdfed.directions import pool_key, seed_pool
from fwdfed.methods.estimate import PoolDraws, draw_seeds, parse_seed_pool
from tests.fwdfed.methods.test_registry import Quadratic

KEY = f"{pool_key('job-1'):016x}"


@pytest.mark.parametrize("name", ["mezo", "onesided", "fzoo", "fwdgrad"])
def test_every_seed_of_a_pooled_task_is_one_of_the_pool(name):
    method, d = methods.get(name), 40
    hparams = {"lr": 1e-2, "eps": 1e-3, "local_steps": 30, "directions": 3, "kind": method.default_kind,
               "seed_pool": 8, "seed_pool_key": KEY} | {h.name: h.default for h in method.hparams}
    pool = parse_seed_pool(hparams)
    engine, batch = Quadratic(np.ones(d)), Batch(None, None, None, np.ones(2, np.float32))
    optimizer = method.make_optimizer(engine, np.zeros(d, np.float32), method.config.from_hparams(hparams),
                                      PoolDraws(np.random.default_rng(0), pool))
    seeds = [s for s, _ in optimizer.train([batch], 30).pairs]
    # fzoo skips a step whose losses do not spread: three draws of one seed, likely enough from 8 seeds
    assert len(seeds) >= 60 and set(seeds) <= {int(s) for s in pool}
    assert len(set(seeds)) > 4  # drawn across the pool, not one seed


def test_the_draws_cover_the_pool_uniformly():
    pool = seed_pool(int(KEY, 16), 16)
    counts = np.unique(draw_seeds(PoolDraws(np.random.default_rng(1), pool), 16_000), return_counts=True)[1]
    assert len(counts) == 16 and counts.min() > 850 and counts.max() < 1150  # 1000 each, sd 31


def test_without_a_pool_seeds_are_free():
    assert parse_seed_pool({"lr": 1e-3}) is None
    seeds = draw_seeds(np.random.default_rng(0), 5)
    assert len(set(seeds)) == 5 and max(seeds) > 2**40


@pytest.mark.parametrize("hparams, message", [
    ({"seed_pool": 8}, "seed_pool_key must be 16 lowercase hex digits"),
    ({"seed_pool_key": KEY}, "seed_pool is missing"),
    ({"seed_pool": 8, "seed_pool_key": KEY.upper()}, "seed_pool_key must be 16 lowercase hex"),
    ({"seed_pool": 8, "seed_pool_key": "f" * 16}, "below 2\\^63"),
    ({"seed_pool": 8, "seed_pool_key": 12345}, "seed_pool_key must be"),
    ({"seed_pool": 0, "seed_pool_key": KEY}, "a seed pool holds 1 to 1048576 seeds, got 0"),
    ({"seed_pool": 2**20 + 1, "seed_pool_key": KEY}, "a seed pool holds 1 to"),
    ({"seed_pool": "many", "seed_pool_key": KEY}, "seed_pool must be an integer"),
])
def test_a_task_with_an_unusable_pool_is_refused_before_training(hparams, message):
    with pytest.raises(ValueError, match=message):
        parse_seed_pool(hparams)
