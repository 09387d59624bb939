"""benchmarks.fleet's accounting of a job's time, on a real SQLite store whose times are set by hand, and its
flags' one-line errors. (The job itself is a benchmark: docs/BENCHMARKS.md.)"""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import update

from benchmarks.fleet import fleet_rounds, parse_args
from coordinator.server import JobConfig, job_from_bundle
from coordinator.store import Round, Task, UpdateRow, open_store

T0 = 1_000_000.0


class Manifest:
    base_model_hash = "h" * 64
    adapter_dim = 4


def set_times(store, table, key, values: dict) -> None:
    with store.session() as s, s.begin():
        for row_id, fields in values.items():
            s.execute(update(table).where(key == row_id).values(**fields))


def answered(store, job, number: int, sent: float, devices: list[str], received: dict[str, float], closed: float):
    """A closed round whose tasks went to `devices` at `sent` and whose updates came at `received`."""
    rnd = store.start_round(job.id, number, number - 1)
    tasks = store.add_tasks(rnd.id, 0, {d: dict(job.hparams) for d in devices})
    store.mark_sent({t.id: sent for t in tasks})
    for task in tasks:
        if task.device_id in received:
            store.add_update(task, [(1, 1e-3)], 1.0, 8, 1.0, 0.9, 1)
    set_times(store, UpdateRow.__table__, UpdateRow.__table__.c.task_id,
              {t.id: {"received_at": received[t.device_id]} for t in tasks if t.device_id in received})
    store.close_round(rnd, np.zeros(4, np.float32), {"heldout_accuracy": 0.5 + number / 10})
    set_times(store, Round.__table__, Round.__table__.c.id, {rnd.id: {"opened_at": sent - 5, "wave_opened_at": sent,
                                                                      "closed_at": closed}})


def test_simulated_time_runs_from_the_first_task_to_the_last_update_taken_or_the_deadline(tmp_path):
    store = open_store(tmp_path / "job.db")
    config = JobConfig(rounds=2, devices_per_round=2, min_devices=1, round_deadline_s=100.0, hparams={"lr": 1e-3})
    job = store.create_job(job_from_bundle("job", "/bundle", Manifest, config), np.zeros(4, np.float32))
    for device in "abc":
        store.touch_device(device, 8, None)
    # Round 1 takes its 2 updates by T0 + 20 (c's comes late); round 2 has 1 of 2 when its deadline passes at T0 + 160.
    answered(store, job, 1, T0, ["a", "b", "c"], {"a": T0 + 10, "b": T0 + 20}, closed=T0 + 50)
    answered(store, job, 2, T0 + 60, ["a", "b"], {"a": T0 + 70}, closed=T0 + 170)
    devices = [{"device_id": "c", "tasks": [{"round": 1, "outcome": "late"}]},
               {"device_id": "a", "tasks": [{"round": 1, "outcome": "accepted"}, {"round": 2, "outcome": "accepted"}]}]

    first, second = fleet_rounds(tmp_path / "job.db", devices, time_scale=10.0)

    assert (first["closed_by"], first["tasks"], first["updates"], first["late"]) == ("updates", 3, 2, ["c"])
    assert first["simulated_seconds"] == pytest.approx(2.0) and first["wall_seconds"] == pytest.approx(50.0)
    assert (second["closed_by"], second["updates"], second["late"]) == ("deadline", 1, [])
    assert second["simulated_seconds"] == pytest.approx(10.0) and second["collect_seconds"] == pytest.approx(100.0)
    assert second["cumulative_simulated_seconds"] == pytest.approx(12.0)
    assert second["cumulative_wall_seconds"] == pytest.approx(170.0)
    assert [r["heldout_accuracy"] for r in (first, second)] == pytest.approx([0.6, 0.7])


@pytest.mark.parametrize("flags, error", [
    (["--per-round", "0"], "--devices, --per-round, --rounds, --workers and --local-steps must be at least 1"),
    (["--devices", "10", "--per-round", "20"], "--per-round must not exceed --devices"),
    (["--min-devices", "200"], "--min-devices must be between 1 and --per-round"),
    (["--time-scale", "0"], "--time-scale must be a number > 0, got 0.0"),
    (["--deadline", "nan"], "--deadline must be a number > 0, got nan"),
    (["--head-lr", "0.01"], "--head-lr is for a method with an exact head step (hybrid), not fzoo"),
])
def test_bad_values_get_one_clear_error(flags, error, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--out", "o", "--bundle", "b", *flags])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"python -m benchmarks.fleet: error: {error}"
