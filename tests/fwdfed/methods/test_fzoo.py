"""FZOO: one-sided steps divided by the spread of the perturbed losses."""

import numpy as np
import pytest

from fwdfed import methods
from fwdfed.batch import Batch
from fwdfed.directions import direction
from fwdfed.methods.fzoo import Fzoo, FzooConfig, normalised_coefficients
from tests.fwdfed.methods.test_registry import Quadratic


def test_fzoo_is_registered_with_its_pass_count():
    method = methods.get("fzoo")
    assert method.default_directions == 8
    # n directions and the shared L(w): n + 1 passes a step, as its update's n pairs say
    assert method.forward_passes(16, {"local_steps": 2, "directions": 8}) == 16 + 2


def test_fewer_than_two_directions_are_refused():
    with pytest.raises(ValueError, match="at least 2 directions"):
        FzooConfig(directions=1)


def test_coefficients_are_the_differences_divided_by_their_spread():
    losses = np.array([1.0, 1.5, 0.5, 1.25, 0.75])
    coefs = normalised_coefficients(losses, lr=0.1)
    sigma = np.std([1.5, 0.5, 1.25, 0.75])
    np.testing.assert_allclose(coefs, -0.1 * np.array([0.5, -0.5, 0.25, -0.25]) / (sigma * 4))
    # the step does not depend on how steep the loss is: scaling the losses leaves it as it is
    np.testing.assert_allclose(normalised_coefficients(1000 * losses, lr=0.1), coefs)
    assert normalised_coefficients(np.ones(5), lr=0.1) is None  # no spread: no step
    assert normalised_coefficients(np.array([1.0, np.nan, 2.0]), lr=0.1) is None


def test_fzoo_steps_downhill_at_any_scale_of_the_loss_and_its_pairs_replay_its_adapter():
    d = 40
    batch = Batch(None, None, None, np.ones(2, np.float32))
    for steepness in (1.0, 1e4):  # MeZO's step grows with the loss's scale; FZOO's does not
        engine = Quadratic(np.ones(d))
        engine_losses = engine.losses
        engine.losses = lambda b, a, f=engine_losses, k=steepness: k * f(b, a)
        start = np.zeros(d, np.float32)
        optimizer = Fzoo(engine, start, FzooConfig(lr=0.02, eps=1e-3, directions=8), np.random.default_rng(0))
        run = optimizer.train([batch], steps=300)
        before, after = engine.losses(batch, start)[0, 0], engine.losses(batch, optimizer.adapter)[0, 0]
        assert after < 0.2 * before
        assert len(run.pairs) == 300 * 8
        np.testing.assert_allclose(run.update.apply(start, "rademacher"), optimizer.adapter, atol=1e-4)


def test_one_step_moves_along_the_drawn_directions_by_the_normalised_coefficients():
    d = 10
    engine, batch = Quadratic(np.arange(d, dtype=np.float64)), Batch(None, None, None, np.ones(1, np.float32))
    start = np.zeros(d, np.float32)
    config = FzooConfig(lr=0.1, eps=1e-2, directions=3)
    optimizer = Fzoo(engine, start, config, np.random.default_rng(5))
    run = optimizer.train([batch], steps=1)
    seeds = [s for s, _ in run.pairs]
    z = np.stack([direction(s, d) for s in seeds])
    losses = engine.losses(batch, np.concatenate([start[None], start + config.eps * z]))[:, 0]
    np.testing.assert_allclose([c for _, c in run.pairs], normalised_coefficients(losses, config.lr), rtol=1e-6)
