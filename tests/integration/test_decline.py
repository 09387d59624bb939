"""A device that cannot run its task declines it on the wire: the task goes to another device at
once (a new task_id), never back to the one that declined it, and the decline is recorded."""

from __future__ import annotations

import asyncio

from coordinator.store import open_store
from fwdfed import protocol
from fwdfed.bundle.manifest import load_bundle
from tests.support.fleet import Coordinator
from tests.support.protocol_client import ProtocolClient


def test_a_declined_task_goes_to_another_device_at_once(tmp_path, tiny_llama_bundle):
    db = tmp_path / "job.db"
    coordinator = Coordinator(db, "--bundle", str(tiny_llama_bundle), "--rounds", "1", "--devices-per-round", "1",
                              "--local-steps", "2", "--round-deadline", "300")
    manifest = load_bundle(tiny_llama_bundle).manifest

    def client(name):
        return ProtocolClient(coordinator.url, name, manifest.base_model_hash, manifest.adapter_dim)

    async def scenario():
        async with client("without-teacher") as declining, client("other") as other:
            task = await declining.recv()
            await declining.send(protocol.Decline(task_id="no-such-task", code="cannot_run", reason="?"))
            ack = await declining.recv()
            assert not ack.accepted and ack.reason.startswith("unknown_task: "), ack
            await declining.send(protocol.Decline(task_id=task.task_id, code="cannot_run", reason="no teacher"))
            assert (await declining.recv()).accepted
            moved = await other.recv(timeout=30)  # long before the round's deadline
            assert isinstance(moved, protocol.Task) and moved.task_id != task.task_id and moved.round == task.round
            await other.send(other.update(moved))
            assert (await other.recv()).accepted
            assert isinstance(await declining.recv(), protocol.Done)  # and no task in between

    try:
        asyncio.run(scenario())
        code, out, err = coordinator.wait(timeout=60)
        assert code == 0 and "round 1/1: 1 updates" in out, err[-2000:]
    finally:
        coordinator.kill()
    store = open_store(db)
    refusals = store.refusals(store.latest_job().id)
    expected = [("without-teacher", "declined", "cannot_run: no teacher")]
    assert [(r.device_id, r.code, r.reason) for r in refusals] == expected
    assert {t.device_id: t.forfeited for t in store.tasks(store.rounds(store.latest_job().id)[0].id)} == {
        "without-teacher": "declined", "other": None}
