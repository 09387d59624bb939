"""The hybrid method through a split program: its head reads the program's features, and a federated job of it
(real processes on loopback) beats random steps of the same length."""

from __future__ import annotations

import numpy as np

from coordinator.store import UpdateRow, open_store
from fwdfed.bundle.manifest import load_bundle
from fwdfed.methods.hybrid import head_span, layout_hparams
from tests.conftest import SST2
from tests.support.checks import assert_beats_chance
from tests.support.fleet import run_job


def test_logits_from_the_features_and_the_adapters_head_are_the_programs(split_bundle):
    """What hybrid differentiates is the program's classifier: features @ W^T + b against `predict` (the whole
    program from the tokens), with the features through the whole program and through the top."""
    from runtime.data import encode, read_examples
    from runtime.engine import ProgramEngine
    from runtime.evaluate import load_tokenizer

    bundle = load_bundle(split_bundle)
    m = bundle.manifest
    engine = ProgramEngine.for_bundle(bundle)
    (batch,) = encode(load_tokenizer(bundle), read_examples(SST2)[: m.inputs.batch_size], m.task,
                      m.inputs.batch_size, m.inputs.seq_len)
    w = bundle.initial_adapter() + 0.05 * np.random.default_rng(0).standard_normal(m.adapter_dim).astype(np.float32)
    hparams = layout_hparams(m.layout)
    start, stop = head_span(hparams)
    c, h = hparams["num_classes"], hparams["feature_dim"]
    weight, bias = w[start : start + c * h].reshape(c, h), w[start + c * h : stop]
    expected = engine.logits(batch, w)
    np.testing.assert_allclose(engine.features(batch, w) @ weight.T + bias, expected, rtol=1e-4, atol=1e-5)
    batch.prefix_states = engine.prefix_states(batch)  # as a device holds them: the features through the top
    np.testing.assert_allclose(engine.features(batch, w) @ weight.T + bias, expected, rtol=1e-4, atol=1e-5)


def test_a_hybrid_job_through_the_top_uploads_seeds_and_the_head_and_beats_random_steps(tmp_path, split_bundle):
    db, out = run_job(tmp_path, split_bundle, SST2, rounds=2, devices=2, eval_examples=128, hparams=[
        "--method", "hybrid", "--lr", "1e-4", "--eps", "1e-3", "--local-steps", "150", "--directions", "4",
        "--head-lr", "0.01"])
    assert "round 2/2: 2 updates" in out
    start, stop = head_span(layout_hparams(load_bundle(split_bundle).manifest.layout))
    with open_store(db).session() as s:
        updates = list(s.query(UpdateRow))
    # 150 steps x 4 directions (a step whose losses are all equal records none), and the head's values alone
    assert len(updates) == 4 and all(0 < u.num_pairs <= 600 for u in updates)
    assert {len(u.dense) for u in updates} == {4 * (stop - start)}
    assert_beats_chance(split_bundle, db, SST2, 128)
