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
from tests.conftest import TINYSTORIES
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
            # (a round may fail and be retried while `enrol` runs: another task, then the error)
            assert {m.TYPE for m in seen[:-1]} <= {"task"} and seen[-1].code == "revoked", seen
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


def flood(client: ProtocolClient, count: int) -> list:
    """`count` updates for a task nobody holds, sent at once: each is answered (a refused ack) until the rate limit."""
    update = protocol.Update(task_id="no-such-task", job_id="job-1", round=1, global_version=0, seeds=[1], coefs=[0.0],
                             scale=1.0, dense=b"", num_examples=1, loss_before=1.0, loss_after=1.0, peak_rss_bytes=1)
    return [client.send(update) for _ in range(count)]


def test_a_rate_limited_device_does_not_find_its_bucket_refilled_when_it_reconnects(tmp_path, tiny_llama_bundle):
    db = tmp_path / "job.db"
    token = enrol(db, tmp_path / "tokens.json", ["flood"])["flood"]
    coordinator = Coordinator(db, "--auth", "token", "--bundle", str(tiny_llama_bundle), "--rounds", "1",
                              "--devices-per-round", "1", "--local-steps", "2", "--round-deadline", "60")
    manifest = load_bundle(tiny_llama_bundle).manifest

    def client():
        return ProtocolClient(coordinator.url, "flood", manifest.base_model_hash, manifest.adapter_dim, token)

    async def scenario():
        async with client() as first:
            for sending in flood(first, 24):  # the hello and 19 of these fill the burst of 20
                await sending
            seen = await until_closed(first)
        assert seen[-1].TYPE == "error" and seen[-1].code == "rate_limited", seen[-3:]
        answered = 0
        try:  # at once: the bucket is as empty as the refusal left it, however long the close took
            async with client() as again:
                for sending in flood(again, 5):
                    await sending
                while answered < 5 and isinstance(await again.recv(timeout=10), protocol.Ack):
                    answered += 1
        except ConnectionClosed:  # refused after `answered` acks
            pass
        except RuntimeError as e:  # the hello itself is past the rate
            assert "rate_limited" in str(e)
        return answered

    try:
        assert asyncio.run(scenario()) < 5
    finally:
        coordinator.kill()
    assert refusal_codes(db).count("rate_limited") >= 2


def test_a_task_forfeited_for_breaking_the_protocol_or_the_rate_limit_is_not_given_back(tmp_path, tiny_llama_bundle):
    import msgpack

    db = tmp_path / "job.db"
    coordinator = Coordinator(db, "--bundle", str(tiny_llama_bundle), "--rounds", "1", "--devices-per-round", "1",
                              "--local-steps", "2", "--round-deadline", "5", "--max-attempts", "5")
    manifest = load_bundle(tiny_llama_bundle).manifest

    def client():
        return ProtocolClient(coordinator.url, "lone", manifest.base_model_hash, manifest.adapter_dim)

    async def scenario():
        async with client() as device:
            # No permessage-deflate (the client offers it): the size cap holds from a frame's header.
            assert "Sec-WebSocket-Extensions" not in device.ws.response.headers
            task = await device.recv()
            broken = {**msgpack.unpackb(device.update(task).to_wire()), "coefs": [float("inf"), 0.0]}
            await device.ws.send(msgpack.packb(broken))
            seen = await until_closed(device)
        assert seen[-1].code == "bad_message", seen
        forfeited = [task.task_id]
        async with client() as device:  # back at once, and the only device: its task is not given back
            task = await device.recv(timeout=30)
            assert isinstance(task, protocol.Task) and task.task_id not in forfeited
            for sending in flood(device, 24):
                await sending
            seen = await until_closed(device)
        assert seen[-1].code == "rate_limited", seen[-3:]
        forfeited.append(task.task_id)
        async with client() as device:
            task = await device.recv(timeout=30)
            assert isinstance(task, protocol.Task) and task.task_id not in forfeited
            await device.send(device.update(task))
            assert (await device.recv()).accepted
            assert isinstance(await device.recv(), protocol.Done)

    try:
        asyncio.run(scenario())
        code, _, err = coordinator.wait(timeout=60)
        assert code == 0, err[-2000:]
    finally:
        coordinator.kill()
    assert "giving it back" not in err
    store = open_store(db)
    assert [(r.number, r.attempt, r.status) for r in store.rounds(store.latest_job().id)] == [
        (1, 1, "failed"), (1, 2, "failed"), (1, 3, "closed")]


def adapters_are_finite_and_bounded(db, bound: float) -> list[float]:
    """Every published version is finite and moved from the one before by an RMS within `bound`; the RMS moves."""
    import numpy as np

    store = open_store(db)
    versions = [np.frombuffer(v.vector, "<f4").astype(np.float64) for v in store.versions(store.latest_job().id)]
    assert all(np.isfinite(v).all() for v in versions)
    moves = [float(np.sqrt(np.mean((b - a) ** 2))) for a, b in zip(versions, versions[1:])]
    assert all(m <= bound for m in moves), moves
    return moves


def test_one_huge_finite_coefficient_is_refused_by_default_and_the_job_finishes(tmp_path, tiny_llama_bundle):
    db = tmp_path / "job.db"
    coordinator = Coordinator(db, "--bundle", str(tiny_llama_bundle), "--rounds", "3", "--devices-per-round", "1",
                              "--local-steps", "2", "--directions", "1", "--eval-data", str(TINYSTORIES),
                              "--eval-examples", "8", "--round-deadline", "60")
    manifest = load_bundle(tiny_llama_bundle).manifest

    async def scenario():
        async with ProtocolClient(coordinator.url, "rogue", manifest.base_model_hash, manifest.adapter_dim) as device:
            for _ in range(3):
                task = await device.recv()
                for coef in (1e30, 1e39):  # finite: the protocol lets both through, the default bound does not
                    await device.send(device.update(task, seeds=[7], coefs=[coef]))
                    ack = await device.recv()
                    assert not ack.accepted and ack.reason.startswith("norm_bound: "), ack
                await device.send(device.update(task, seeds=[7], coefs=[1e-3]))  # it keeps its task
                assert (await device.recv()).accepted
            assert isinstance(await device.recv(), protocol.Done)

    try:
        asyncio.run(scenario())
        code, out, err = coordinator.wait(timeout=120)
        assert code == 0 and "round 3/3: 1 updates" in out, err[-2000:]
    finally:
        coordinator.kill()
    assert refusal_codes(db).count("norm_bound") == 6
    from coordinator.job import DEFAULT_MAX_UPDATE_RMS

    adapters_are_finite_and_bounded(db, DEFAULT_MAX_UPDATE_RMS)


def test_a_restart_on_the_database_the_old_crash_left_resumes_and_refuses_the_update(tmp_path, tiny_llama_bundle):
    """Before the bound, 1e30 was accepted and stored, and every (re)start of `serve` crashed aggregating it."""
    db = tmp_path / "job.db"
    flags = ("--bundle", str(tiny_llama_bundle), "--rounds", "1", "--devices-per-round", "1", "--local-steps", "2",
             "--eval-data", str(TINYSTORIES), "--eval-examples", "8", "--round-deadline", "60")
    manifest = load_bundle(tiny_llama_bundle).manifest

    async def take_the_task(url):
        async with ProtocolClient(url, "rogue", manifest.base_model_hash, manifest.adapter_dim) as device:
            return await device.recv()

    first = Coordinator(db, *flags)
    try:
        task = asyncio.run(take_the_task(first.url))
    finally:
        first.kill()
    store = open_store(db)  # what the old coordinator stored on accepting it
    assert store.add_update(store.task(task.task_id), [(7, 1e30)], 1.0, 10, 1.0, 0.9, 1)

    again = Coordinator(db, *flags)

    async def honest():
        async with ProtocolClient(again.url, "honest", manifest.base_model_hash, manifest.adapter_dim) as device:
            return await device.answer_until_done(pairs=2)

    try:
        assert asyncio.run(honest()) == 1
        code, out, err = again.wait(timeout=120)
        assert code == 0 and "round 1/1: 1 updates" in out, err[-2000:]
    finally:
        again.kill()
    refusals = open_store(db).refusals(store.latest_job().id)
    assert [(r.device_id, r.code) for r in refusals] == [("rogue", "norm_bound")]
    from coordinator.job import DEFAULT_MAX_UPDATE_RMS

    adapters_are_finite_and_bounded(db, DEFAULT_MAX_UPDATE_RMS)


def test_a_restart_on_a_job_whose_latest_adapter_is_not_finite_says_so_in_one_line(tmp_path, tiny_llama_bundle):
    import numpy as np

    from coordinator.store import AdapterVersion
    from coordinator.store.queries import sha256
    from tests.conftest import run_command

    db = tmp_path / "job.db"
    Coordinator(db, "--bundle", str(tiny_llama_bundle), "--rounds", "2").kill()  # the job, stored
    store = open_store(db)
    job = store.latest_job()
    vector = np.full(job.adapter_dim, np.nan, np.float32).tobytes()  # as no coordinator of today publishes
    with store.session() as s, s.begin():
        s.add(AdapterVersion(job_id=job.id, version=1, vector=vector, sha256=sha256(vector)))
    again = run_command("coordinator", "serve", "--db", str(db), "--port", "0", "--auth", "none", timeout=120)
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-2000:]
    assert f"job {job.id}: adapter version 1 holds non-finite values" in again.stderr.strip().splitlines()[-1]
