"""The batched writer: an answer's outcome comes only from its committed batch, on a real SQLite store (the
failing and the gated commits are that store with its batch made to fail or wait), and the batches' rows on
PostgreSQL as well (its inserts go through COPY)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
from sqlalchemy.exc import OperationalError

from coordinator.group_commit import Answer, GroupCommit, Presence, update_row
from coordinator.server import JobConfig, job_from_bundle
from coordinator.store import Store, open_store
from coordinator.store.queries import key_hash


class FakeManifest:
    base_model_hash = "h" * 64
    adapter_dim = 16


def job_with_tasks(db, devices: list[str]):
    """A job with a round and a task for each of `devices`, in `db` (an SQLite file or a database URL)."""
    store = open_store(db)
    config = JobConfig(rounds=1, devices_per_round=len(devices), min_devices=1, round_deadline_s=60, hparams={})
    job = store.create_job(job_from_bundle("job", "/bundle", FakeManifest, config), np.zeros(16, np.float32))
    rnd = store.start_round(job.id, 1, 0)
    for device_id in devices:
        store.touch_device(device_id, 1, None)
    return store, job, store.add_tasks(rnd.id, 0, {d: {} for d in devices})


def answer(task, credential=None) -> Answer:
    return Answer(task.device_id, credential, update=update_row(task, [(1, 1e-3)], 1.0, 10, 1.0, 0.9, 1, b""))


class GatedStore(Store):
    """The store, its batches held until `gate` opens (a slow disk); `batches` counts them."""

    def __init__(self, engine):
        super().__init__(engine)
        self.gate, self.batches = threading.Event(), 0

    def commit_batch(self, presence, updates, refusals):
        self.gate.wait(10)
        self.batches += 1
        super().commit_batch(presence, updates, refusals)


def test_an_update_is_acked_only_once_its_batch_is_committed_and_a_burst_is_one_batch(tmp_path):
    store, job, tasks = job_with_tasks(tmp_path / "job.db", ["a", "b", "c"])
    gated = GatedStore(store.engine)
    writes = GroupCommit(gated, job.id)

    async def scenario():
        first = writes.submit(answer(tasks[0]))
        await asyncio.sleep(0.2)  # its batch is being committed, held at the gate
        rest = [writes.submit(answer(t)) for t in tasks[1:]]  # come meanwhile: the next batch, together
        assert not first.done() and store.updates(tasks[0].round_id) == []
        gated.gate.set()
        return await asyncio.gather(first, *rest)

    assert asyncio.run(scenario()) == [None, None, None]
    assert [u.device_id for u in store.updates(tasks[0].round_id)] == ["a", "b", "c"]  # in the order submitted
    assert gated.batches == 2


class FailingStore(Store):
    def commit_batch(self, presence, updates, refusals):
        raise OperationalError("INSERT ...", {}, Exception("disk I/O error"))


def test_a_failed_commit_acks_no_update_as_accepted_says_why_and_stores_nothing(tmp_path):
    store, job, (task,) = job_with_tasks(tmp_path / "job.db", ["a"])
    writes = GroupCommit(FailingStore(store.engine), job.id)

    async def scenario():
        return await asyncio.gather(writes.submit(answer(task)),
                                    writes.submit(Answer("a", None, refusal=("wrong_version", "round 2"))),
                                    writes.submit(Presence("b", True, 10)))

    accepted, refused, hello = asyncio.run(scenario())
    assert accepted[0] == "not_stored" and "OperationalError" in accepted[1] and "send it again" in accepted[1]
    assert refused == ("wrong_version", "round 2")  # its own code still: only its record is lost
    assert hello[0] == "not_stored"
    assert store.updates(task.round_id) == [] and store.refusals(job.id) == []
    assert "b" not in {d.id for d in store.devices()}


def test_a_row_the_store_already_holds_fails_only_its_own_update(db_url):
    store, job, tasks = job_with_tasks(db_url, ["a", "b"])
    assert store.add_update(tasks[0], [(2, 1e-3)], 1.0, 10, 1.0, 0.9, 1)  # stored behind the writer's back
    outcomes = GroupCommit(store, job.id).write([answer(tasks[0]), answer(tasks[1])])
    assert outcomes == [("duplicate", "this task already has an accepted update"), None]
    assert [(u.device_id, u.num_pairs) for u in store.updates(tasks[0].round_id)] == [("a", 1), ("b", 1)]


def test_a_batch_refuses_the_updates_of_a_device_revoked_before_it(db_url):
    store, job, tasks = job_with_tasks(db_url, ["a", "b"])
    for device_id in ("a", "b"):
        store.enrol_key(device_id, device_id * 64)
    store.revoke("a")
    outcomes = GroupCommit(store, job.id).write([
        answer(tasks[0], key_hash("a" * 64)), answer(tasks[1], key_hash("b" * 64)),
        Answer("a", key_hash("a" * 64), refusal=("other_job", "job x")),  # names another job: that code comes first
        Answer("a", key_hash("a" * 64), refusal=("foreign", "another device's"))])
    assert [o and o[0] for o in outcomes] == ["revoked", None, "other_job", "revoked"]
    assert [u.device_id for u in store.updates(tasks[0].round_id)] == ["b"]
    assert [r.code for r in store.refusals(job.id)] == ["revoked", "other_job", "revoked"]


def test_a_devices_latest_presence_in_a_batch_wins(db_url):
    store, job, _ = job_with_tasks(db_url, ["a"])
    writes = GroupCommit(store, job.id)
    writes.write([Presence("a", False), Presence("a", True, 7, 1024), Presence("new", True, 3),
                  Presence("left", True, 1), Presence("left", False), Presence("never-seen", False)])
    devices = {d.id: (d.status, d.num_examples, d.mem_budget_bytes) for d in store.devices()}
    assert devices == {"a": ("online", 7, 1024), "new": ("online", 3, None), "left": ("gone", 1, None)}
