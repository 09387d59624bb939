"""Server bugs an independent client found (issue 27), each shown with real processes on loopback:
a re-enrolled device's old session, a rate-limited device's bucket, a forfeited task, and one
finite but huge coefficient that used to stop the job for good."""

from __future__ import annotations

import asyncio

import pytest
from websockets.exceptions import ConnectionClosed

from coordinator.store import open_store
from fwdfed import protocol
from fwdfed.bundle.manifest import load_bundle
from tests.support.fleet import Coordinator, enrol
from tests.support.protocol_client import ProtocolClient


def refusal_codes(db) -> list[str]:
    store = open_store(db)
    return [r.code for r in store.refusals(store.latest_job().id)]


async def until_closed(client: ProtocolClient, timeout: float = 10) -> list[protocol.Message]:
    """Every message until the coordinator closes the connection."""
    seen = []
    with pytest.raises(ConnectionClosed):
        while True:
            seen.append(await client.recv(timeout=timeout))
    return seen


def test_re_enrolling_a_device_cuts_off_the_session_of_its_old_token(tmp_path, tiny_llama_bundle):
    db = tmp_path / "job.db"
    old = enrol(db, tmp_path / "old.json", ["phone"])["phone"]
    coordinator = Coordinator(db, "--auth", "token", "--bundle", str(tiny_llama_bundle), "--rounds", "1",
                              "--devices-per-round", "1", "--local-steps", "2", "--round-deadline", "4")
    manifest = load_bundle(tiny_llama_bundle).manifest

    async def scenario():
        async with ProtocolClient(coordinator.url, "phone", manifest.base_model_hash, manifest.adapter_dim,
                                  old) as stale:
            task = await stale.recv()
            assert isinstance(task, protocol.Task)
            new = enrol(db, tmp_path / "new.json", ["phone"])["phone"]
            seen = await until_closed(stale)  # within the coordinator's credential sweep (a second)
            assert [m.TYPE for m in seen] == ["error"] and seen[0].code == "revoked", seen
        async with ProtocolClient(coordinator.url, "phone", manifest.base_model_hash, manifest.adapter_dim,
                                  new) as fresh:
            assert await fresh.answer_until_done(pairs=2) == 1

    try:
        asyncio.run(scenario())
        code, out, err = coordinator.wait(timeout=120)
        assert code == 0 and "round 1/1: 1 updates" in out, err[-2000:]
    finally:
        coordinator.kill()
    assert "revoked" in refusal_codes(db)
