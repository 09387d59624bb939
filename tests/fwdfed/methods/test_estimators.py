"""Forward-only estimators against ground truth: exact JVP (forward-mode AD) and autograd.

The finite differences come from the real `.pte`; the truths from the eager reference engine.
"""

import numpy as np
import pytest

from fwdfed.directions import direction
from fwdfed.methods.estimate import weighted_mean
from runtime.eager import EagerEngine
from tests.conftest import away_from_init, program_and_batches


@pytest.fixture(scope="module")
def engines(tiny_llama_bundle):
    bundle, program, batches = program_and_batches(tiny_llama_bundle, 2)
    return EagerEngine(bundle), program, batches[0], away_from_init(bundle)


def test_eager_reference_computes_what_the_program_computes(engines):
    eager, program, batch, adapter = engines
    np.testing.assert_allclose(eager.losses(batch, adapter), program.losses(batch, adapter), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_finite_difference_jvp_from_the_program_converges_to_the_exact_jvp(engines, kind):
    eager, program, batch, adapter = engines
    for seed in range(2):
        v = direction(seed, adapter.shape[0], kind)
        _, exact = eager.jvp(batch, adapter, v)
        errors = []
        for h in (1e-2, 5e-3, 2.5e-3):  # 1e-2 is FwdLLM's step
            plus, minus = weighted_mean(program.losses(batch, np.stack([adapter + h * v, adapter - h * v])),
                                        batch.weights)
            errors.append(abs((plus - minus) / (2 * h) - exact))
        # A central difference errs by O(h^2): halving h cuts the error about 4x (float32 noise aside).
        assert errors[1] < errors[0] / 2.5 and errors[2] < errors[1] / 2.5, (seed, errors)
        assert errors[2] < 0.01 * abs(exact) + 2e-3, (seed, errors, exact)


def test_exact_jvp_is_the_gradient_along_the_direction(engines):
    eager, _, batch, adapter = engines
    v = direction(5, adapter.shape[0], "gaussian")
    _, derivative = eager.jvp(batch, adapter, v)
    assert derivative == pytest.approx(float(eager.gradient(batch, adapter) @ v), rel=1e-4, abs=1e-6)


def test_spsa_estimates_average_to_the_true_gradient_within_their_variance():
    """On a quadratic f(w) = 1/2 w'Aw - b'w the central difference is exact, so the SPSA estimate
    (z'g) z with Rademacher z is unbiased with E|mean of N - g|^2 = (sum_i sum_{j!=i} g_j^2) / N."""
    rng = np.random.default_rng(0)
    d, n = 64, 4000
    m = rng.standard_normal((d, d))
    a, b = m @ m.T / d + np.eye(d), rng.standard_normal(d)
    w = rng.standard_normal(d)
    g = a @ w - b

    def f(x):
        return 0.5 * x @ a @ x - b @ x

    eps = 1e-3
    estimates = np.empty((n, d))
    for k in range(n):
        z = direction(k, d).astype(np.float64)
        estimates[k] = (f(w + eps * z) - f(w - eps * z)) / (2 * eps) * z
    error = np.sum((estimates.mean(axis=0) - g) ** 2)
    expected = (d - 1) * np.sum(g**2) / n
    assert error < 1.5 * expected, (error, expected)  # chi-square with ~d degrees of freedom: 1.5x is > 5 sigma
    assert error > 0.5 * expected  # and the spread is really there: the bound is not vacuous
    cosine = estimates.mean(axis=0) @ g / (np.linalg.norm(estimates.mean(axis=0)) * np.linalg.norm(g))
    assert cosine > 0.9
