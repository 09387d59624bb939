"""The round machinery's decisions, in-process on a real SQLite store (connections are stand-ins:
the behaviour over real sockets is in tests/integration)."""

from __future__ import annotations

import asyncio

import numpy as np
from websockets.datastructures import Headers
from websockets.http11 import Request

from coordinator.job import JobOptions, resumed_options
from coordinator.server import Coordinator, JobConfig, Limits, bearer_token, job_from_bundle
from coordinator.store import open_store
from coordinator.strategy import SeedFedAvg
from fwdfed import protocol


class FakeManifest:
    base_model_hash = "h" * 64
    adapter_dim = 16


class SlowlyClosingConnection:
    """A connection whose close handshake does not finish (a peer that stopped reading)."""

    def __init__(self):
        self.sent, self.closing = [], asyncio.Event()

    async def send(self, frame: bytes) -> None:
        self.sent.append(protocol.decode(frame))

    async def close(self, code: int, reason: str) -> None:
        self.closing.set()
        await asyncio.sleep(3600)


def coordinator(tmp_path, devices_per_round: int = 1) -> Coordinator:
    store = open_store(tmp_path / "job.db")
    config = JobConfig(rounds=1, devices_per_round=devices_per_round, min_devices=1, round_deadline_s=60,
                       hparams={"lr": 1e-3, "eps": 1e-2, "local_steps": 2, "directions": 1, "kind": "rademacher"})
    job = store.create_job(job_from_bundle("job", "/bundle", FakeManifest, config), np.zeros(16, np.float32))
    strategy = SeedFedAvg(hparams=job.hparams, devices_per_round=devices_per_round)
    return Coordinator(store, job, strategy, limits=Limits(require_credentials=False))


def test_a_device_being_refused_is_sent_no_task_while_its_connection_closes(tmp_path):
    """A device answered rate_limited (or any refusal) is gone at once: the round's task must not be
    handed to it in the seconds its close takes, where it would wait for --device-timeout."""
    async def scenario():
        c = coordinator(tmp_path)
        c.store.touch_device("flood", 1, None)
        ws = SlowlyClosingConnection()
        c.connections["flood"] = ws
        rnd = c.store.start_round(c.job.id, 1, 0)
        refusing = asyncio.create_task(c._refuse(ws, "rate_limited", "too many messages", "flood"))
        await asyncio.wait_for(ws.closing.wait(), 5)
        await c._dispatch(rnd)
        refusing.cancel()
        return c.store.tasks(rnd.id), [m.TYPE for m in ws.sent]

    tasks, sent = asyncio.run(scenario())
    assert tasks == [] and sent == ["error"]


def test_an_abandoned_task_goes_back_to_its_device_when_no_other_took_it_over(tmp_path):
    async def scenario():
        c = coordinator(tmp_path)
        c.store.touch_device("away", 1, None)
        rnd = c.store.start_round(c.job.id, 1, 0)
        (task,) = c.store.add_tasks(rnd.id, 0, {"away": dict(c.job.hparams)})
        c.store.abandon_task(task.id)  # it was away past --device-timeout, and no device was idle
        ws = SlowlyClosingConnection()
        c.connections["away"] = ws  # it is back
        await c._resend_open_task("away")
        return ws.sent, c.store.task(task.id)

    sent, task = asyncio.run(scenario())
    assert [m.TYPE for m in sent] == ["task"] and sent[0].task_id == task.id and task.abandoned_at is None


def test_a_task_forfeited_for_breaking_the_protocol_is_not_given_back(tmp_path):
    """Unlike a task lost by being away: the device is back, no other is idle, and still it gets nothing."""
    async def scenario():
        c = coordinator(tmp_path)
        c.store.touch_device("rude", 1, None)
        rnd = c.store.start_round(c.job.id, 1, 0)
        (task,) = c.store.add_tasks(rnd.id, 0, {"rude": dict(c.job.hparams)})
        c._forfeit("rude", "bad_message")
        ws = SlowlyClosingConnection()
        c.connections["rude"] = ws  # it reconnected at once
        await c._resend_open_task("rude")
        await c._dispatch(rnd)
        return ws.sent, c.store.task(task.id)

    sent, task = asyncio.run(scenario())
    assert sent == [] and task.abandoned_at is not None and task.forfeited == "bad_message"


def test_the_bearer_scheme_is_read_in_any_case():
    def request(value):
        return Request("/", Headers({"Authorization": value}))

    assert bearer_token(request("Bearer abc")) == "abc"
    assert bearer_token(request("bearer abc")) == "abc"
    assert bearer_token(request("BEARER  abc ")) == "abc"
    assert bearer_token(request("Basic abc")) is None
    assert bearer_token(request("Bearer ")) is None


def test_a_resumed_job_keeps_its_stored_options_and_fills_only_what_an_older_job_lacks():
    stored = JobOptions(server_lr=0.5, clip=0.1).to_json()
    options, warnings = resumed_options(stored, {"server_lr": 2.0, "clip": None})
    assert options.server_lr == 0.5 and options.clip == 0.1
    assert warnings == ["ignoring --server-lr 2: job was created with 0.5"]
    older = {k: v for k, v in stored.items() if k not in ("server_lr", "clip")}
    options, warnings = resumed_options(older, {"server_lr": 2.0, "clip": None})
    assert options.server_lr == 2.0 and options.clip is None and warnings == []
