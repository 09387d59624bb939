"""`coordinator status` (coordinator/report.py) on a real SQLite store: each round's task turnaround, from
its tasks' sent_at and its accepted updates' received_at."""

from __future__ import annotations

import numpy as np
from sqlalchemy import update

from coordinator.report import round_rows, status_text, turnarounds
from coordinator.server import JobConfig, job_from_bundle
from coordinator.store import Task, UpdateRow, open_store


class FakeManifest:
    base_model_hash = "h" * 64
    adapter_dim = 16


def make_job(store, job_id: str):
    config = JobConfig(rounds=3, devices_per_round=3, min_devices=1, round_deadline_s=60, hparams={"lr": 1e-3})
    return store.create_job(job_from_bundle(job_id, "/b", FakeManifest, config), np.zeros(16, np.float32))


def answered(store, rnd, times: dict[str, tuple[float, float]]) -> dict[str, int]:
    """A task per device, answered; its sent_at and its update's received_at set to `times[device]`.
    Returns each device's update id."""
    tasks = store.add_tasks(rnd.id, 0, {d: {"lr": 1e-3} for d in times})
    ids = {}
    for task in tasks:
        assert store.add_update(task, [(1, 1e-3)], 1.0, 10, 2.0, 1.9, 1)
        sent, received = times[task.device_id]
        with store.session() as s, s.begin():
            s.execute(update(Task).where(Task.id == task.id).values(sent_at=sent))
            s.execute(update(UpdateRow).where(UpdateRow.task_id == task.id).values(received_at=received))
            ids[task.device_id] = s.query(UpdateRow.id).filter(UpdateRow.task_id == task.id).scalar()
    return ids


def test_each_round_reports_the_median_and_largest_turnaround_of_its_accepted_updates(tmp_path):
    store = open_store(tmp_path / "job.db")
    job = make_job(store, "job")
    for device_id in ("a", "b", "c", "d"):
        store.touch_device(device_id, 10, None)
    rnd1 = store.start_round(job.id, 1, 0)
    ids = answered(store, rnd1, {"a": (1000.0, 1001.5), "b": (1000.0, 1004.0), "c": (1000.5, 1010.875),
                                 "d": (1000.0, 1500.0)})
    store.drop_update(ids["d"])  # refused by the aggregate: its 500 s is no accepted update's
    store.close_round(rnd1, np.ones(16, np.float32), {})
    rnd2 = store.start_round(job.id, 2, 1)
    answered(store, rnd2, {"a": (2000.0, 2002.0), "b": (2000.0, 2003.0)})
    store.fail_round(rnd2.id, "too few updates")
    store.start_round(job.id, 2, 1)  # open, nothing answered yet
    other = make_job(store, "other")  # another job's round is not this job's
    answered(store, store.start_round(other.id, 1, 0), {"a": (0.0, 99.0)})

    assert turnarounds(store, job.id) == {rnd1.id: [1.5, 4.0, 10.375], rnd2.id: [2.0, 3.0]}
    assert [row["turnaround"] for row in round_rows(store, job)] == [
        {"median": 4.0, "max": 10.375, "count": 3}, {"median": 2.5, "max": 3.0, "count": 2}, None]
    lines = status_text(store, job).splitlines()
    assert lines[1].endswith("  tasks: KiB max, mean, in seed form  turnaround s: median, max of updates")
    assert [line.split("  -  ")[-1] for line in lines[2:5]] == ["4.0, 10.4 of 3", "2.5, 3.0 of 2 (too few updates)",
                                                                "-"]
