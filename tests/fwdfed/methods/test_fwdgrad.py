"""The forward gradient (FwdLLM) through the real program, checked against autograd."""

import numpy as np
import pytest

from fwdfed.directions import combine, direction
from fwdfed.methods.fwdgrad import ForwardGradient, FwdGradConfig
from runtime.eager import EagerEngine
from tests.conftest import away_from_init, program_and_batches


@pytest.fixture(scope="module")
def setup(tiny_llama_bundle):
    bundle, engine, batches = program_and_batches(tiny_llama_bundle, 4)
    return bundle, engine, batches, away_from_init(bundle)


def test_the_mean_forward_gradient_is_the_true_gradient_within_its_variance(setup):
    """With Gaussian v, sum_k (v_k.g) v_k / K has E = g and E|mean - g|^2 = (|g|^2 + sum g^2) / K = (d+1)|g|^2 / K."""
    bundle, engine, batches, adapter = setup
    truth = EagerEngine(bundle).gradient(batches[0], adapter)
    k = 2000
    optimizer = ForwardGradient(engine, adapter, FwdGradConfig(lr=1.0, eps=1e-3, directions=k), np.random.default_rng(1))
    run = optimizer.train(batches[:1], steps=1)
    estimate = -combine(run.pairs, adapter.shape[0], "gaussian")  # the update is -lr * estimate
    error = np.sum((estimate - truth) ** 2)
    expected = (adapter.shape[0] + 1) * np.sum(truth**2) / k
    assert 0.5 * expected < error < 1.5 * expected, (error, expected)
    assert estimate @ truth > 0


def test_the_device_does_not_move_and_the_update_averages_over_batches(setup):
    _, engine, batches, adapter = setup
    optimizer = ForwardGradient(engine, adapter, FwdGradConfig(lr=0.1, directions=2), np.random.default_rng(2))
    run = optimizer.train(batches, steps=3)
    assert np.array_equal(optimizer.adapter, adapter) and run.scale == 1.0
    assert len(run.pairs) == 6 and len(run.step_losses) == 3


def test_selection_keeps_the_candidates_most_aligned_with_the_reference(setup):
    _, engine, _, adapter = setup
    reference = direction(99, adapter.shape[0], "gaussian")
    config = FwdGradConfig(lr=0.1, directions=3, candidates=10)
    chosen = ForwardGradient(engine, adapter, config, np.random.default_rng(3), reference).select()
    pool = ForwardGradient(engine, adapter, FwdGradConfig(lr=0.1, directions=30), np.random.default_rng(3)).select()
    assert set(chosen) <= set(pool)  # the same rng draws the same pool

    def cosine(seed):
        z = direction(seed, adapter.shape[0], "gaussian")
        return z @ reference / (np.linalg.norm(z) * np.linalg.norm(reference))

    assert sorted(chosen, key=cosine) == sorted(pool, key=cosine)[-3:]
    unselected = ForwardGradient(engine, adapter, config, np.random.default_rng(3), None).select()
    assert len(unselected) == 3
