"""MeZO through the real ExecuTorch program of a tiny exported model."""

import numpy as np
import pytest

from fwdfed.directions import combine
from fwdfed.methods.mezo import Mezo, MezoConfig
from tests.conftest import program_and_batches


@pytest.fixture(scope="module")
def setup(tiny_llama_bundle):
    return program_and_batches(tiny_llama_bundle, 16)


def test_batched_and_one_at_a_time_losses_agree(setup):
    bundle, engine, batches = setup
    rng = np.random.default_rng(0)
    adapters = (bundle.initial_adapter() + 0.05 * rng.standard_normal((7, bundle.manifest.adapter_dim))).astype(np.float32)
    batched = engine.losses(batches[0], adapters)  # 7 > max_perturbations 4: two calls
    single = np.concatenate([engine.losses(batches[0], a) for a in adapters])
    assert batched.shape == (7, batches[0].input_ids.shape[0])
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)


def test_replaying_the_uploaded_pairs_rebuilds_the_device_adapter(setup):
    bundle, engine, batches = setup
    start = bundle.initial_adapter()
    mezo = Mezo(engine, start, MezoConfig(lr=1e-3, eps=1e-2, directions=2), np.random.default_rng(1))
    run = mezo.train(batches, steps=20)
    assert len(run.pairs) == 40 and len({s for s, _ in run.pairs}) == 40
    replayed = start.astype(np.float64) + combine(run.pairs, start.shape[0])
    assert not np.allclose(mezo.adapter, start)
    np.testing.assert_allclose(replayed, mezo.adapter, rtol=0, atol=1e-5)


def test_mezo_coefficient_is_the_central_difference(setup):
    bundle, engine, batches = setup
    start = bundle.initial_adapter()
    config = MezoConfig(lr=0.5, eps=1e-2)
    mezo = Mezo(engine, start, config, np.random.default_rng(2))
    run = mezo.train(batches[:1], steps=1)
    (seed, coef), = run.pairs
    from fwdfed.directions import direction

    z = direction(seed, start.shape[0])
    w = batches[0].weights
    plus = (engine.losses(batches[0], start + config.eps * z)[0] * w).sum() / w.sum()
    minus = (engine.losses(batches[0], start - config.eps * z)[0] * w).sum() / w.sum()
    assert coef == pytest.approx(-config.lr * (plus - minus) / (2 * config.eps), rel=1e-4, abs=1e-9)


def test_weight_decay_and_schedule_replay_exactly_through_scale(setup):
    bundle, engine, batches = setup
    start = bundle.initial_adapter()
    config = MezoConfig(lr=1e-2, eps=1e-2, directions=2, weight_decay=0.5, schedule="linear")
    mezo = Mezo(engine, start, config, np.random.default_rng(3))
    run = mezo.train(batches, steps=10)
    expected_scale = np.prod([1 - 1e-2 * (1 - i / 10) * 0.5 for i in range(10)])
    assert run.scale == pytest.approx(expected_scale, rel=1e-9)
    replayed = run.scale * start.astype(np.float64) + combine(run.pairs, start.shape[0])
    np.testing.assert_allclose(replayed, mezo.adapter, rtol=0, atol=1e-5)


def test_a_block_restricts_every_step_to_its_slice(setup):
    bundle, engine, batches = setup
    start = bundle.initial_adapter()
    block = bundle.manifest.layout.blocks(2)[1]
    mezo = Mezo(engine, start, MezoConfig(lr=1e-2, eps=1e-2, block=block), np.random.default_rng(4))
    run = mezo.train(batches, steps=5)
    changed = np.flatnonzero(mezo.adapter != start)
    assert changed.size and changed.min() >= block[0] and changed.max() < block[1]
    replayed = start + combine(run.pairs, start.shape[0], block=block)
    np.testing.assert_allclose(replayed, mezo.adapter, atol=1e-5)
