"""`coordinator status` (coordinator/report.py) on a real SQLite store: each round's task turnaround, from
its tasks' sent_at and its accepted updates' received_at; each device's bytes down and up per round."""

from __future__ import annotations

import asyncio

import numpy as np
from sqlalchemy import update

from coordinator.admission import Limits
from coordinator.report import device_bytes, round_rows, status_text, turnarounds
from coordinator.server import Coordinator, JobConfig, job_from_bundle
from coordinator.store import Task, UpdateRow, open_store
from coordinator.strategies import SeedFedAvg
from fwdfed import protocol


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


class Recorder:
    """A device's connection as the coordinator sees it: the frames sent to it."""

    def __init__(self):
        self.frames: list[bytes] = []

    async def send(self, frame: bytes) -> None:
        self.frames.append(frame)


def test_each_devices_bytes_down_and_up_per_round_are_the_frames_that_went_on_the_wire(tmp_path):
    """Down: every task frame the coordinator sent the device in the round (a resend counted); up: its accepted
    update, re-encoded from what was stored, the size of the frame the device sent."""
    hparams = {"lr": 1e-3, "eps": 1e-2, "local_steps": 4, "directions": 2, "kind": "rademacher"}
    store = open_store(tmp_path / "job.db")
    config = JobConfig(rounds=1, devices_per_round=2, min_devices=1, round_deadline_s=60, hparams=hparams)
    job = store.create_job(job_from_bundle("job", "/b", FakeManifest, config), np.zeros(16, np.float32))
    c = Coordinator(store, job, SeedFedAvg(hparams=job.hparams, devices_per_round=2),
                    limits=Limits(require_credentials=False))
    rnd = store.start_round(job.id, 1, 0)
    sent = {}

    async def scenario():
        for device_id in ("a", "b"):
            store.touch_device(device_id, 10, None)
            c.connections[device_id] = Recorder()
        tasks = store.add_tasks(rnd.id, 0, {d: dict(hparams) for d in ("a", "b")})
        c._hold(rnd)  # the round with its tasks, as a restarted coordinator resumes it
        for task in tasks:
            await c._send_task(rnd, task)
            if task.device_id == "a":
                await c._send_task(rnd, task)  # a resend: both frames went down
            message = protocol.decode(c.connections[task.device_id].frames[0])
            pairs = 3 if task.device_id == "a" else 8
            update = protocol.Update(task_id=task.id, job_id=job.id, round=1, global_version=0,
                                     seeds=[2**62 + k for k in range(pairs)], coefs=[1e-3 / 3] * pairs, scale=1.0,
                                     dense=b"", num_examples=10, loss_before=1.25, loss_after=1.0,
                                     peak_rss_bytes=123_456_789)
            assert message.task_id == task.id and (await c._accept(task.device_id, update)).accepted
            sent[task.device_id] = len(update.to_wire())
        assert await c.run_round(rnd)

    asyncio.run(scenario())
    frames = {d: [len(f) for f in c.connections[d].frames] for d in ("a", "b")}
    assert len(frames["a"]) == 2 and len(frames["b"]) == 1
    assert device_bytes(store, job)[rnd.id] == {d: {"down": sum(frames[d]), "seed_form": False, "up": sent[d]}
                                                for d in ("a", "b")}
    lines = status_text(store, job).splitlines()
    at = lines.index("bytes per round and device, down / up, KiB (* the task carried the seed-form history):")
    assert lines[at + 1] == (f"      1       1  a {sum(frames['a']) / 1024:,.1f} / {sent['a'] / 1024:,.1f}, "
                             f"b {frames['b'][0] / 1024:,.1f} / {sent['b'] / 1024:,.1f}")
