"""The forward-only methods over the real pipeline: coordinator process, device processes, .pte."""

from __future__ import annotations

import pytest

from coordinator.store import Metric, Round, Task, UpdateRow, open_store
from tests.conftest import TINYSTORIES
from tests.support.checks import assert_beats_chance
from tests.support.fleet import run_job

# The same budget of forward passes per device per round as MeZO's run in test_federated.py (100
# steps of one direction, two passes each): fwdgrad 25 batches x 4 directions x 2 passes; onesided
# (the one-file method of docs/methods.md) 100 steps of one direction, w and w + eps z in one call.
METHODS = {
    "fwdgrad": ["--method", "fwdgrad", "--lr", "0.1", "--eps", "1e-2", "--local-steps", "25", "--directions", "4"],
    "onesided": ["--method", "onesided", "--lr", "1e-3", "--eps", "1e-2", "--local-steps", "100", "--directions", "1"],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_lowers_heldout_loss_within_the_same_forward_budget(tmp_path, stories_bundle, method):
    # 2 devices, 2 rounds: each method's gain is still over 3 times the chance bar (docs/BENCHMARKS.md
    # compares the methods on longer runs).
    db, _ = run_job(tmp_path, stories_bundle, TINYSTORIES, rounds=2, devices=2, hparams=METHODS[method],
                    eval_examples=64)
    result = assert_beats_chance(stories_bundle, db, TINYSTORIES, 64)
    with open_store(db).session() as s:
        pairs = [u.num_pairs for u in s.query(UpdateRow)]
    assert pairs == [100] * 4  # 4 updates of 100 directions: 200 forward passes each
    print(method, result)


def test_fwdgrad_variance_waves_block_cyclic_and_client_lrs(tmp_path, tiny_llama_bundle):
    db, out = run_job(tmp_path, tiny_llama_bundle, TINYSTORIES, rounds=2, devices=2, eval_examples=16, hparams=[
        "--method", "fwdgrad", "--lr", "0.05", "--local-steps", "2", "--directions", "2", "--candidates", "3",
        "--variance-threshold", "1e-12", "--max-waves", "2", "--blocks", "2", "--lr-strategy", "round-wise"])
    store = open_store(db)
    with store.session() as s:
        rounds = s.query(Round).filter(Round.status == "closed").order_by(Round.number).all()
        assert [r.wave for r in rounds] == [1, 1]  # the variance was always above threshold: a second wave each
        assert (rounds[0].block_start, rounds[1].block_end) == (0, rounds[1].block_end)
        assert rounds[0].block_end == rounds[1].block_start  # cycling through two blocks
        for r in rounds:
            assert s.query(UpdateRow).filter(UpdateRow.round_id == r.id).count() == 4  # 2 devices x 2 waves
        waves = [m.value for m in s.query(Metric).filter(Metric.name == "waves")]
        assert waves == [2.0, 2.0]
        first, second = ([t.hparams["lr"] for t in s.query(Task).filter(Task.round_id == r.id, Task.wave == 0)]
                         for r in rounds)
        assert set(first) == {0.05}  # no history yet
        assert len(set(second)) == 2 and max(second) == pytest.approx(0.075)  # round-wise: eta0 +- delta


def test_perturb_only_moves_the_named_tensors_and_nothing_else(tmp_path, tiny_llama_bundle):
    import numpy as np

    from fwdfed.bundle.manifest import load_bundle

    db, out = run_job(tmp_path, tiny_llama_bundle, TINYSTORIES, rounds=1, devices=2, eval_examples=16, hparams=[
        "--method", "mezo", "--lr", "1e-2", "--local-steps", "3", "--perturb-only", "layers.0."])
    start, end = load_bundle(tiny_llama_bundle).manifest.layout.span("layers.0.")
    assert 0 < end - start < load_bundle(tiny_llama_bundle).manifest.adapter_dim
    store = open_store(db)
    with store.session() as s:
        assert [(r.block_start, r.block_end) for r in s.query(Round)] == [(start, end)]
    first, last = (np.frombuffer(v.vector, "<f4") for v in (store.versions(store.latest_job().id)[i] for i in (0, -1)))
    moved = np.flatnonzero(first != last)
    assert moved.size and start <= moved.min() and moved.max() < end


def test_backprop_baseline_sends_dense_updates_through_the_same_rounds(tmp_path, tiny_llama_bundle):
    """Dense AdamW updates from eager PyTorch, sampled by fraction: all connected devices (at
    least two, so that a round cannot close before the slower device has connected)."""
    db, out = run_job(tmp_path, tiny_llama_bundle, TINYSTORIES, rounds=2, devices=2, eval_examples=16, hparams=[
        "--method", "backprop", "--lr", "1e-2", "--local-steps", "5", "--fraction", "1.0", "--min-devices", "2"])
    store = open_store(db)
    with store.session() as s:
        updates = s.query(UpdateRow).all()
        assert len(updates) == 4 and all(u.num_pairs == 0 and u.dense is not None for u in updates)
        assert all(u.loss_after < u.loss_before for u in updates)  # AdamW on the probe batches
        assert [r.target for r in s.query(Round).order_by(Round.number)] == [2, 2]
    versions = store.versions(store.latest_job().id)
    assert len(versions) == 3 and versions[0].vector != versions[-1].vector


def test_head_init_sets_the_classifier_from_the_devices_class_statistics(tmp_path, distilbert_bundle):
    """--head-init lda: round 1's updates carry class statistics computed through the program's features
    method; version 1 is exactly their LDA head written into the classifier (nothing else moves); the
    job's method trains in round 2."""
    import numpy as np

    from coordinator.strategies import AcceptedUpdate
    from fwdfed.bundle.manifest import load_bundle
    from fwdfed.methods.class_stats import aggregate, classifier_tensors, round_hparams
    from tests.conftest import SST2

    bundle = distilbert_bundle
    db, out = run_job(tmp_path, bundle, SST2, rounds=1, devices=2, eval_examples=64, hparams=[
        "--head-init", "lda", "--lr", "1e-6", "--local-steps", "2", "--lda-shrinkage", "0.2"])
    layout = load_bundle(bundle).manifest.layout
    store = open_store(db)
    job = store.latest_job()
    with store.session() as s:
        rounds = s.query(Round).filter(Round.status == "closed").order_by(Round.number).all()
        tasks = {r.number: s.query(Task).filter(Task.round_id == r.id).all() for r in rounds}
    assert [r.number for r in rounds] == [1, 2] and job.rounds == 2
    hparams = round_hparams(layout, 0.2)
    assert all(t.hparams["num_classes"] == 2 and t.hparams["shrinkage"] == 0.2 for t in tasks[1])
    updates = [AcceptedUpdate.from_row(u) for u in store.updates(rounds[0].id)]
    assert len(updates) == 2 and all(u.pairs == [] and u.change.dense.size == 2 * 64 + 2 + 64 * 64 for u in updates)
    v0, v1, v2 = (np.frombuffer(v.vector, "<f4") for v in store.versions(job.id))
    np.testing.assert_array_equal(aggregate(v0, [u.change.dense for u in updates], hparams, layout), v1)
    weight, bias = classifier_tensors(layout)
    changed = np.flatnonzero(v1 != v0)
    assert changed.min() >= min(weight.offset, bias.offset) and changed.max() < max(weight.end, bias.end)
    assert all(u.num_pairs == 2 for u in store.updates(rounds[1].id)) and not np.array_equal(v1, v2)
