"""benchmarks.fleet_compare's comparison of two jobs' stores (real SQLite stores filled by hand), and its flags'
one-line errors. (The two jobs themselves are a benchmark: docs/BENCHMARKS.md.)"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.fleet_compare import compare, parse_args
from coordinator.server import JobConfig, job_from_bundle
from coordinator.store import open_store


class Manifest:
    base_model_hash = "h" * 64
    adapter_dim = 4


def finished_job(db, pairs_by_device: dict[str, list], new_vector: np.ndarray) -> None:
    """A finished job of one round whose updates are these pairs and whose version 1 is `new_vector`."""
    store = open_store(db)
    config = JobConfig(rounds=1, devices_per_round=2, min_devices=1, round_deadline_s=60.0, hparams={"lr": 1e-3})
    job = store.create_job(job_from_bundle("job", "/bundle", Manifest, config), np.zeros(4, np.float32))
    for device in pairs_by_device:
        store.touch_device(device, 8, None)
    rnd = store.start_round(job.id, 1, 0)
    for task in store.add_tasks(rnd.id, 0, {d: dict(job.hparams) for d in pairs_by_device}):
        store.add_update(task, pairs_by_device[task.device_id], 1.0, 8, 1.0, 0.9, 1)
    store.close_round(rnd, new_vector, {})
    store.finish_job(job.id)


def test_the_same_updates_and_versions_are_identical_and_one_coefficient_apart_is_not(tmp_path):
    version = np.array([1, 2, 3, 4], np.float32)
    finished_job(tmp_path / "a.db", {"emu-0": [(1, 1e-3)], "emu-1": [(2, -2e-3)]}, version)
    finished_job(tmp_path / "b.db", {"emu-1": [(2, -2e-3)], "emu-0": [(1, 1e-3)]}, version)  # stored in another order
    finished_job(tmp_path / "c.db", {"emu-0": [(1, 1e-3)], "emu-1": [(2, -2.0000001e-3)]}, version + 1e-6)

    same = compare(tmp_path / "a.db", tmp_path / "b.db")
    assert (same["updates"], same["identical_updates"], same["identical_versions"]) == ([2, 2], 2, 2)
    apart = compare(tmp_path / "a.db", tmp_path / "c.db")
    assert (apart["identical_updates"], apart["identical_versions"]) == (1, 1)
    assert apart["max_version_difference"] == pytest.approx(1e-6, rel=0.1)


def test_bad_flags_are_one_clear_error(capsys):
    for flags in (["--devices", "0"], ["--devices", "10", "--per-round", "20"]):
        with pytest.raises(SystemExit) as e:
            parse_args(["--out", "o", "--bundle", "b", *flags])
        assert e.value.code == 2
        assert "error: --" in capsys.readouterr().err.strip().splitlines()[-1]
