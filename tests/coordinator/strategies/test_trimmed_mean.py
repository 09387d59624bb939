"""The trimmed mean (the one-file strategy of docs/strategies.md): its rule, and a job that runs it."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.job import JobOptions
from coordinator.strategies import AcceptedUpdate
from coordinator.strategies.trimmed_mean import TrimmedMean

DIM = 40


def trimmed(trim_fraction: float, **options) -> TrimmedMean:
    return TrimmedMean(hparams={"kind": "rademacher"},
                       options=JobOptions(strategy="trimmed-mean", strategy_options={"trim_fraction": trim_fraction},
                                          **options))


def dense_update(device: str, change: np.ndarray, examples: int = 10) -> AcceptedUpdate:
    return AcceptedUpdate.of(device, [], examples, dense=change.astype(np.float32))


def changes(devices: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.01, (devices, DIM))


def test_without_trimming_it_is_the_equal_weight_mean_of_the_devices_changes():
    w, deltas = np.zeros(DIM, np.float32), changes(4)
    updates = [dense_update(f"d{i}", d, examples=10 ** i) for i, d in enumerate(deltas)]  # counts do not weigh
    new = trimmed(0.0).aggregate(w, updates)
    np.testing.assert_allclose(new, deltas.astype(np.float32).astype(np.float64).mean(axis=0), atol=1e-7)


def test_a_device_that_sends_anything_moves_no_value_outside_the_honest_range():
    w, honest = np.ones(DIM, np.float32), changes(4)
    poisoned = [(7, 1e6)]  # one huge seed-form step, far past any honest change
    updates = [dense_update(f"d{i}", d) for i, d in enumerate(honest)] + [AcceptedUpdate.of("bad", poisoned, 10)]
    new = trimmed(0.2).aggregate(w, updates).astype(np.float64) - 1.0  # k = floor(0.2 * 5) = 1 a side
    honest32 = honest.astype(np.float32).astype(np.float64)
    assert np.all(new >= honest32.min(axis=0) - 1e-6) and np.all(new <= honest32.max(axis=0) + 1e-6)


def test_three_devices_trimmed_by_a_third_give_each_value_its_median():
    w, deltas = np.zeros(DIM, np.float32), changes(3, seed=1)
    new = trimmed(0.34).aggregate(w, [dense_update(f"d{i}", d) for i, d in enumerate(deltas)])
    np.testing.assert_allclose(new, np.median(deltas.astype(np.float32), axis=0), atol=1e-7)


def test_a_devices_waves_count_once_and_the_block_bounds_the_change():
    w, deltas = np.zeros(DIM, np.float32), changes(3, seed=2)
    waves = [dense_update("d0", deltas[0]), dense_update("d0", deltas[1]), dense_update("d1", deltas[2])]
    new = trimmed(0.0).aggregate(w, waves, block=(5, 15))
    d32 = deltas.astype(np.float32).astype(np.float64)
    expected = ((d32[0] + d32[1]) / 2 + d32[2]) / 2
    np.testing.assert_allclose(new[5:15], expected[5:15], atol=1e-7)
    assert not new[:5].any() and not new[15:].any()


def test_server_lr_scales_the_step_and_the_version_goes_down_dense():
    w, deltas = np.zeros(DIM, np.float32), changes(2, seed=3)
    updates = [dense_update(f"d{i}", d) for i, d in enumerate(deltas)]
    half = trimmed(0.0, server_lr=0.5)
    np.testing.assert_allclose(half.aggregate(w, updates), 0.5 * trimmed(0.0).aggregate(w, updates), atol=1e-7)
    assert half.version_sums(updates) is None


def test_a_job_runs_with_the_trimmed_mean_and_every_version_is_its_round_s_median(tmp_path, tiny_llama_bundle):
    """serve --strategy trimmed-mean end to end: a coordinator process, three emulated devices; each stored
    version is the rule applied to its round's stored updates, and the tasks after round 1 carry the adapter."""
    from coordinator.store import Round, UpdateRow, open_store
    from tests.conftest import TINYSTORIES
    from tests.support.fleet import run_job

    db, out = run_job(tmp_path, tiny_llama_bundle, TINYSTORIES, rounds=2, devices=3, eval_examples=16, hparams=[
        "--method", "mezo", "--lr", "1e-2", "--local-steps", "4", "--strategy", "trimmed-mean",
        "--trim-fraction", "0.34"])
    assert "strategy trimmed-mean (trim_fraction 0.34)" in out
    store = open_store(db)
    job = store.latest_job()
    assert job.options["strategy"] == "trimmed-mean" and job.options["strategy_options"] == {"trim_fraction": 0.34}
    rule = trimmed(0.34)
    versions = [np.frombuffer(v.vector, "<f4") for v in store.versions(job.id)]
    assert len(versions) == 3
    with store.session() as s:
        rounds = s.query(Round).filter(Round.status == "closed").order_by(Round.number).all()
        for r, before, after in zip(rounds, versions, versions[1:]):
            rows = s.query(UpdateRow).filter(UpdateRow.round_id == r.id).all()
            assert len(rows) == 3
            np.testing.assert_array_equal(rule.aggregate(before, [AcceptedUpdate.from_row(u) for u in rows]), after)
    assert not np.array_equal(versions[0], versions[-1])


@pytest.mark.parametrize("fraction", ["0.5", "-0.1", "nan"])
def test_a_trim_fraction_outside_its_range_is_refused_in_one_line(tmp_path, fraction):
    from tests.conftest import run_command

    result = run_command("coordinator", "serve", "--db", str(tmp_path / "j.db"), "--strategy", "trimmed-mean",
                         "--trim-fraction", fraction)
    assert result.returncode == 2 and "--trim-fraction must be in [0, 0.5)" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "j.db").exists()
