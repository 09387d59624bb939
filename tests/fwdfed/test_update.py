"""The seed-form update: w' = scale * w + sum coef * direction(seed) + dense, written once."""

import numpy as np

from fwdfed.directions import direction
from fwdfed.update import SeedUpdate


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
