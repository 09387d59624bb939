"""Faults with real processes over loopback: a device killed mid-round; duplicate, late, foreign
and other-job updates; a round that cannot reach its minimum. The database is checked after."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

from coordinator.store import Round, Task, UpdateRow, open_store
from fwdfed import protocol
from fwdfed.bundle.manifest import load_bundle
from tests.conftest import ROOT, TINYSTORIES, run_command
from tests.support.fleet import Coordinator, emulate
from tests.support.protocol_client import ProtocolClient


def test_a_device_killed_mid_round_loses_its_task_to_another(tmp_path, tiny_llama_bundle):
    db = tmp_path / "job.db"
    coordinator = Coordinator(db, "--bundle", str(tiny_llama_bundle), "--rounds", "1", "--devices-per-round", "1",
                              "--local-steps", "5", "--device-timeout", "2", "--round-deadline", "120")
    ghost = subprocess.Popen([sys.executable, "-m", "tests.support.hanging_device", coordinator.url,
                              str(tiny_llama_bundle), "ghost"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert ghost.stdout.readline().startswith("got task")  # the ghost holds the round's only task
        ghost.kill()  # SIGKILL mid-round: no goodbye
        ghost.wait()
        devices = emulate(coordinator.url, tiny_llama_bundle, TINYSTORIES, 1)
        code, out, err = coordinator.wait(timeout=300)
        assert devices.returncode == 0, devices.stderr[-2000:]
        assert code == 0 and "round 1/1: 1 updates" in out, err[-2000:]
        assert "abandoned, reassigning" in err
    finally:
        ghost.kill()
        coordinator.kill()
    store = open_store(db)
    with store.session() as s:
        tasks = {t.device_id: t for t in s.query(Task)}
        assert tasks["ghost"].abandoned_at is not None and tasks["emu-0"].abandoned_at is None
        assert [u.device_id for u in s.query(UpdateRow)] == ["emu-0"]
    assert {d.id: d.status for d in store.devices()}["ghost"] == "gone"


def test_duplicate_late_foreign_and_other_job_updates_are_refused_and_counted(tmp_path, tiny_llama_bundle):
    db = tmp_path / "job.db"
    manifest = load_bundle(tiny_llama_bundle).manifest
    coordinator = Coordinator(db, "--bundle", str(tiny_llama_bundle), "--rounds", "2", "--devices-per-round", "1",
                              "--round-deadline", "60")

    async def scenario():
        async with ProtocolClient(coordinator.url, "a", manifest.base_model_hash, manifest.adapter_dim) as a:
            first = await a.recv()
            await a.send(a.update(first))
            acks = [await a.recv()]
            await a.send(a.update(first))  # the same task again: a duplicate
            acks.append(await a.recv())
            second = await a.recv()  # round 1 closed with a's update; round 2's task follows
            assert isinstance(second, protocol.Task) and second.round == 2
            await a.send(a.update(first))  # round 1 is closed: late
            acks.append(await a.recv())
            await a.send(a.update(second, job_id="someone-elses-job"))
            acks.append(await a.recv())
            async with ProtocolClient(coordinator.url, "b", manifest.base_model_hash, manifest.adapter_dim) as b:
                await b.send(b.update(second))  # a's task, sent by b
                acks.append(await b.recv())
            bad_dense = a.update(second)
            bad_dense.dense = b"\x00" * 8  # not the adapter's size
            await a.send(bad_dense)
            acks.append(await a.recv())
            await a.send(a.update(second))
            acks.append(await a.recv())
            return acks

    try:
        acks = asyncio.run(scenario())
        code, out, err = coordinator.wait(timeout=120)
    finally:
        coordinator.kill()
    assert code == 0, err[-2000:]
    assert [ack.accepted for ack in acks] == [True, False, False, False, False, False, True]
    assert ["duplicate" in acks[1].reason, "late" in acks[2].reason, "job" in acks[3].reason,
            "another device" in acks[4].reason] == [True] * 4
    store = open_store(db)
    job = store.latest_job()
    assert [r.code for r in store.refusals(job.id)] == ["duplicate", "late", "other_job", "foreign", "wrong_dimension"]
    with store.session() as s:
        assert s.query(UpdateRow).count() == 2  # one per round: nothing doubled, nothing lost
    assert [v.version for v in store.versions(job.id)] == [0, 1, 2]
    status = run_command("coordinator", "status", "--db", str(db), check=True).stdout
    assert "job job-1: finished" in status
    assert "refused: duplicate 1, foreign 1, late 1, other_job 1, wrong_dimension 1" in status
    # round 1, attempt 1, closed into version 1 with 1 update; and both devices listed
    assert re.search(r"^\s+1\s+1 closed\s+1\s+1\s", status, re.M) and "a " in status and "b " in status, status
    no_metrics = run_command("coordinator", "plot", "--db", str(db), "--out", str(tmp_path / "p.png"))
    assert no_metrics.returncode == 2 and "no held-out metrics" in no_metrics.stderr


def test_a_round_that_cannot_reach_its_minimum_fails_with_a_reason_and_is_retried(tmp_path, tiny_llama_bundle):
    db = tmp_path / "job.db"
    manifest = load_bundle(tiny_llama_bundle).manifest
    coordinator = Coordinator(db, "--bundle", str(tiny_llama_bundle), "--rounds", "1", "--devices-per-round", "2",
                              "--round-deadline", "3", "--max-attempts", "2")

    async def lone_device():
        async with ProtocolClient(coordinator.url, "lonely", manifest.base_model_hash, manifest.adapter_dim) as d:
            for _ in range(2):  # one task per attempt
                task = await d.recv()
                await d.send(d.update(task))
                assert (await d.recv()).accepted

    try:
        asyncio.run(lone_device())
        code, out, err = coordinator.wait(timeout=60)
    finally:
        coordinator.kill()
    assert code == 1 and "error: job job-1 stopped: a round failed 2 times in a row" in err
    assert "Traceback" not in err
    store = open_store(db)
    with store.session() as s:
        rounds = s.query(Round).order_by(Round.id).all()
        assert [(r.number, r.attempt, r.status) for r in rounds] == [(1, 1, "failed"), (1, 2, "failed")]
        assert all("1 of the required 2 updates" in r.reason for r in rounds)
    assert [v.version for v in store.versions(store.latest_job().id)] == [0]
