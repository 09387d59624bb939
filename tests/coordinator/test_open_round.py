"""The open round held in memory: what a restarted coordinator would read from the store, and no update
stored behind the round's back while it aggregates (in-process on a real SQLite store; connections are
stand-ins that keep the frames sent)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from coordinator.admission import Limits
from coordinator.open_round import OpenRound
from coordinator.server import Coordinator, JobConfig, job_from_bundle
from coordinator.store import open_store
from coordinator.strategies import AcceptedUpdate, SeedFedAvg
from fwdfed import protocol


class FakeManifest:
    base_model_hash = "h" * 64
    adapter_dim = 16


class Recorder:
    def __init__(self):
        self.sent: list[protocol.Message] = []

    async def send(self, frame: bytes) -> None:
        self.sent.append(protocol.decode(frame))


def coordinator(tmp_path, devices: list[str], deadline_s: float = 60, evaluate=None) -> Coordinator:
    store = open_store(tmp_path / "job.db")
    config = JobConfig(rounds=1, devices_per_round=len(devices), min_devices=1, round_deadline_s=deadline_s,
                       hparams={"lr": 1e-3, "eps": 1e-2, "local_steps": 2, "directions": 1, "kind": "rademacher"})
    job = store.create_job(job_from_bundle("job", "/bundle", FakeManifest, config), np.zeros(16, np.float32))
    c = Coordinator(store, job, SeedFedAvg(hparams=job.hparams, devices_per_round=len(devices)), evaluate=evaluate,
                    limits=Limits(require_credentials=False), device_timeout_s=0.0)
    for device_id in devices:
        store.touch_device(device_id, 1, None)
        c.connections[device_id] = Recorder()
    return c


def update_for(c: Coordinator, device_id: str, seed: int) -> protocol.Update:
    task = next(m for m in c.connections[device_id].sent if isinstance(m, protocol.Task))
    return protocol.Update(task_id=task.task_id, job_id=c.job.id, round=task.round, global_version=task.global_version,
                           seeds=[seed], coefs=[1e-3], scale=1.0, dense=b"", num_examples=10, loss_before=1.0,
                           loss_after=0.9, peak_rss_bytes=1)


def test_the_round_held_in_memory_is_the_one_a_restarted_coordinator_reads_from_the_store(tmp_path):
    c = coordinator(tmp_path, ["a", "b", "c", "d"])

    async def scenario():
        rnd = c.store.start_round(c.job.id, 1, 0)
        await c._dispatch(rnd)
        assert (await c._accept("a", update_for(c, "a", 1))).accepted
        c._forfeit("b", "bad_message")
        del c.connections["c"]
        c.gone_since["c"] = time.time() - 1  # away past --device-timeout (0 s here)
        c._abandon_away(c.open)
        c.connections["e"] = Recorder()  # the wave is short of live tasks: a newcomer takes one
        c.store.touch_device("e", 1, None)
        await c._dispatch(rnd)
        return c.open

    held = asyncio.run(scenario())
    loaded = OpenRound.load(c.store, held.rnd)

    def view(state: OpenRound):
        tasks = {t.id: (t.device_id, t.wave, t.abandoned_at is None, t.forfeited, t.sent_at, t.hparams)
                 for t in state.tasks.values()}
        return tasks, state.answered, state.live, state.unanswered, state.assigned

    assert view(loaded) == view(held)
    devices = {t.device_id: (t.abandoned_at is None, t.forfeited) for t in held.tasks.values()}
    assert devices == {"a": (True, None), "b": (False, "bad_message"), "c": (False, None), "d": (True, None),
                       "e": (True, None)}
    assert {held.tasks[t].device_id for t in held.unanswered} == {"d", "e"}


def test_an_update_that_comes_while_its_round_aggregates_waits_and_is_late_when_the_round_closes(tmp_path):
    """Without waiting, it would be stored in a round whose version was computed without it: a restarted
    coordinator recomputing the version from the stored updates would not find the published one."""
    evaluating, release = threading.Event(), threading.Event()

    def evaluate(w):
        evaluating.set()
        release.wait(10)
        return {"heldout_loss": 1.0}

    c = coordinator(tmp_path, ["a", "b"], deadline_s=0.5, evaluate=evaluate)

    async def scenario():
        rnd = c.store.start_round(c.job.id, 1, 0)
        await c._dispatch(rnd)
        assert (await c._accept("a", update_for(c, "a", 1))).accepted
        closing = asyncio.create_task(c.run_round(rnd))  # b does not answer before the deadline
        while not evaluating.is_set():
            await asyncio.sleep(0.05)
        late = asyncio.create_task(c._accept("b", update_for(c, "b", 2)))
        await asyncio.sleep(0.3)
        assert not late.done()  # it waits for the round's outcome
        release.set()
        assert await closing
        return (await late), rnd

    ack, rnd = asyncio.run(scenario())
    assert not ack.accepted and ack.reason.startswith("late: ")
    rows = c.store.updates(rnd.id)
    assert [u.device_id for u in rows] == ["a"]
    recomputed = c.strategy.aggregate(np.zeros(16, np.float32), [AcceptedUpdate.from_row(u) for u in rows])
    assert np.array_equal(np.frombuffer(c.store.latest_version(c.job.id).vector, "<f4"), recomputed)
