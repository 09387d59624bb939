"""The Java device against the real coordinator, beside a Python device, on stories260K.

A coordinator process on loopback (temporary database, enrolled tokens), a Python device
(`python -m device_sdk.emulate`) and a Java device (android_demo/core with the `.pte` run by
ExecuTorch in a helper process) train 3 rounds. Then: every update of both devices was
accepted and aggregated exactly once; the held-out loss fell by more than random steps of
the same length; and every update the Java device sent equals the Python device's for the
same task, data and seeds (the Python device replays the Java device's seeds).
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np

from coordinator.job import JobOptions
from coordinator.store import Round, UpdateRow, open_store
from coordinator.strategies import AcceptedUpdate, SeedFedAvg
from tests.android_demo.support import HELPER_COMMAND, assert_same_update, decode, python_device, replay
from tests.conftest import ROOT, TINYSTORIES
from tests.support.checks import assert_beats_chance
from tests.support.fleet import Coordinator, enrol

ROUNDS = 3
HPARAMS = ["--lr", "1e-3", "--eps", "1e-2", "--local-steps", "100"]


def test_java_device_beside_python_device_three_rounds(tmp_path, stories_bundle, java_core):
    db, tokens = tmp_path / "job.db", tmp_path / "tokens.json"
    enrol(db, tokens, ["emu-0", "java-1"])  # the emulator's one device is emu-0; the Java device takes shard 1 of 2
    coordinator = Coordinator(db, "--auth", "token", "--bundle", str(stories_bundle), "--eval-data", str(TINYSTORIES),
                              "--eval-examples", "64", "--rounds", str(ROUNDS), "--devices-per-round", "2",
                              "--round-deadline", "300", *HPARAMS)
    record = tmp_path / "java-frames"
    started = time.monotonic()
    python = subprocess.Popen(
        [sys.executable, "-m", "device_sdk.emulate", "--mem", "1.5GB", "--coordinator", coordinator.url, "--devices",
         "1", "--bundle", str(stories_bundle), "--data", str(TINYSTORIES), "--credentials", str(tokens)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    java = java_core.popen("JvmDevice", "--coordinator", coordinator.url, "--device-id", "java-1", "--bundle",
                           stories_bundle, "--data", TINYSTORIES, "--shard-index", "1", "--shard-count", "2",
                           "--credentials", tokens, "--mem", "1.5GB", "--helper", HELPER_COMMAND, "--record", record,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        code, out, err = coordinator.wait(timeout=600)
        java_out, java_err = java.communicate(timeout=120)
        _, python_err = python.communicate(timeout=120)
    finally:
        coordinator.kill()
        for p in (python, java):
            if p.poll() is None:
                p.kill()
    print(f"job of {ROUNDS} rounds: {time.monotonic() - started:.0f} s")
    assert code == 0, err[-3000:]
    assert java.returncode == 0, java_err[-3000:]
    assert python.returncode == 0, python_err[-3000:]
    assert f"device java-1: {ROUNDS} updates accepted" in java_out, java_out + java_err[-2000:]
    assert f"round {ROUNDS}/{ROUNDS}: 2 updates" in out

    # Every update of both devices accepted and aggregated exactly once: each closed round holds one
    # update of each, nothing was refused, and each global version is exactly the job's aggregation
    # rule applied to the previous version and that round's stored updates.
    store = open_store(db)
    job = store.latest_job()
    assert job.status == "finished"
    assert [r.code for r in store.refusals(job.id)] == []
    with store.session() as s:
        closed = s.query(Round).filter(Round.status == "closed").order_by(Round.number).all()
        assert [r.number for r in closed] == list(range(1, ROUNDS + 1))
        for r in closed:
            devices = sorted(u.device_id for u in s.query(UpdateRow).filter(UpdateRow.round_id == r.id))
            assert devices == ["emu-0", "java-1"], (r.number, devices)
    strategy = SeedFedAvg(hparams=job.hparams, options=JobOptions())
    versions = [np.frombuffer(v.vector, "<f4") for v in store.versions(job.id)]
    assert len(versions) == ROUNDS + 1
    for r, before, after in zip(closed, versions, versions[1:]):
        updates = [AcceptedUpdate.from_row(u) for u in store.updates(r.id)]
        np.testing.assert_array_equal(strategy.aggregate(before, updates), after)

    # The model learned: held-out loss fell by more than random steps of the same length.
    assert_beats_chance(stories_bundle, db, TINYSTORIES, 64)

    # The Java device's updates are the Python device's on the same task, data and seeds.
    frames = sorted(record.iterdir())
    tasks = [f.read_bytes() for f in frames if f.name.endswith("-received-task.msgpack")]
    sent = [decode(f.read_bytes()) for f in frames if f.name.endswith("-sent-update.msgpack")]
    acks = [decode(f.read_bytes()) for f in frames if f.name.endswith("-received-ack.msgpack")]
    assert len(tasks) == len(sent) == len(acks) == ROUNDS and all(a.accepted for a in acks)
    assert not [f for f in frames if f.name.endswith(".partial")], "no frame file half-written"
    stored = {u.task_id: u for r in closed for u in store.updates(r.id) if u.device_id == "java-1"}
    reference = python_device(stories_bundle, TINYSTORIES, "java-1", 1, 2)
    exact = total = 0
    for task_frame, java_update in zip(tasks, sent):
        assert AcceptedUpdate.from_row(stored[java_update.task_id]).pairs == list(zip(java_update.seeds, java_update.coefs))
        exact += assert_same_update(java_update, replay(reference, task_frame))
        total += len(java_update.coefs)
    print(f"Java vs Python device: {exact} of {total} coefficients bit-identical, the rest within 1e-5 relative")
