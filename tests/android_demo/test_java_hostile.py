"""Hostile input on the Java device's side: a malformed task, a truncated adapter, frames that
break the protocol, a revoked token, an untrusted certificate; and a connection lost before the
ack. Each bad case ends with one clear `error:` line, the device stopping (not retrying what
retrying cannot fix), nothing sent for the bad task and no file half-written; a lost connection
is retried with backoff and the unanswered update sent again, without training twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess

import msgpack
import numpy as np
import pytest

from fwdfed import protocol
from tests.android_demo.scripted_coordinator import ScriptedCoordinator
from tests.android_demo.support import HELPER_COMMAND, decode
from tests.conftest import TINYSTORIES, run_command
from tests.support.fleet import Coordinator, enrol


def manifest_of(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def task_map(bundle, **changes) -> dict:
    """A task the device can train (2 MeZO steps), as a msgpack map, with `changes` applied."""
    m = manifest_of(bundle)
    adapter = np.fromfile(bundle / m["adapter"]["initial"], "<f4").tobytes()
    task = protocol.Task(task_id="t-1", job_id="job", round=1, global_version=0, base_model_hash=m["model"]["hash"],
                         adapter=adapter, adapter_sha256=hashlib.sha256(adapter).hexdigest(), method="mezo",
                         hparams={"lr": 1e-3, "eps": 1e-2, "local_steps": 2, "directions": 1, "kind": "rademacher"},
                         deadline_s=60.0, reference=b"")
    data = msgpack.unpackb(task.to_wire(), raw=False)
    data.update(changes)
    return data


def pack(data) -> bytes:
    return msgpack.packb(data, use_bin_type=True)


def hostile_frames(bundle) -> dict[str, tuple[bytes | str, str]]:
    """name -> (what the coordinator sends after the welcome, words the device's error must hold)."""
    good = task_map(bundle)
    d = manifest_of(bundle)["adapter"]["dim"]
    truncated = good["adapter"][:-1]
    nan = np.frombuffer(good["adapter"], "<f4").copy()
    nan[7] = np.nan
    body = pack(good)
    at = body.index(good["adapter"])
    header = 2 if len(good["adapter"]) < 256 else 3 if len(good["adapter"]) < 65536 else 5  # bin8, bin16, bin32
    return {
        "truncated adapter": (pack(task_map(bundle, adapter=truncated, adapter_sha256=hashlib.sha256(truncated).hexdigest())),
                              f"carries {4 * d - 1} adapter bytes, expected {4 * d}"),
        "adapter not its sha256": (pack(task_map(bundle, adapter_sha256="0" * 64)), "does not match its sha256"),
        "NaN in the adapter": (pack(task_map(bundle, adapter=nan.tobytes(),
                                             adapter_sha256=hashlib.sha256(nan.tobytes()).hexdigest())),
                               "its adapter holds NaN or infinite values"),
        "another base model": (pack(task_map(bundle, base_model_hash="f" * 64)), "is for base model ffffffffffff"),
        "absurd local steps": (pack(task_map(bundle, hparams={**good["hparams"], "local_steps": 10**9})),
                               "unusable hyperparameter: local_steps must be between 1 and 100000"),
        "a method it lacks": (pack(task_map(bundle, method="backprop")), "asks for method 'backprop'"),
        "a negative tensor scale": (pack(task_map(bundle, hparams={**good["hparams"], "tensor_scales": [[0, d, -0.5]]})),
                                    "unusable hyperparameter: tensor_scales: a scale must be a finite number > 0"),
        "tensor scales past the adapter": (
            pack(task_map(bundle, hparams={**good["hparams"], "tensor_scales": [[0, 4, 2.0], [4, d + 1, 0.5]]})),
            f"unusable hyperparameter: tensor_scales: the range ending at {d + 1} passes the adapter's dimension {d}"),
        "malformed tensor scales": (pack(task_map(bundle, hparams={**good["hparams"], "tensor_scales": [[0, d]]})),
                                    "tensor_scales is a list of at most 4096 lists of 3 finite numbers"),
        "an extra field": (pack({**good, "extra": 1}), "the coordinator sent a bad frame: task: unexpected fields"),
        "a text frame": ("hello", "frames must be binary msgpack, not text"),
        "not msgpack": (b"\xc1\x00", "the coordinator sent a bad frame: not valid msgpack"),
        "adapter claims 2 GiB": (body[:at - header] + b"\xc6\x7f\xff\xff\xff" + body[at:at + 16],
                                 "is more than the frame holds"),
        "an error": (protocol.Error(code="wrong_model", message="not this model").to_wire(),
                     "the coordinator refused this device (wrong_model): not this model"),
    }


TASK_CASES = {"truncated adapter", "adapter not its sha256", "NaN in the adapter", "another base model",
              "absurd local steps", "a method it lacks", "a negative tensor scale", "tensor scales past the adapter"}


# What these tests send is what the device must refuse, not a program: the device opens its (good) program
# without trying it in a child first, which would cost each run a helper process (test_java_isolation.py).
NO_PROBE = "--no-isolate-load"


def run_java(java_core, bundle, url, tmp_path, *extra, timeout=120) -> subprocess.CompletedProcess:
    return java_core.run("JvmDevice", "--coordinator", url, "--device-id", "java-1", "--bundle", bundle, "--data",
                         TINYSTORIES, "--shard-index", "1", "--shard-count", "2", "--helper", HELPER_COMMAND,
                         "--record", tmp_path / "frames", "--connect-timeout", "10", NO_PROBE, *extra, check=False,
                         timeout=timeout)


def assert_clear_error(result: subprocess.CompletedProcess, words: str) -> str:
    err = result.stderr.decode()
    assert result.returncode == 1, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and words in errors[0], err[-2000:]
    assert "Exception" not in err and "\tat org." not in err, err[-2000:]  # a message, not a stack trace
    return errors[0]


def test_a_hostile_task_or_frame_stops_the_device_with_a_clear_error_and_nothing_sent(tmp_path, stories_bundle,
                                                                                        java_core):
    coordinators = []  # the one serving the current case is the last
    for name, (frame, words) in hostile_frames(stories_bundle).items():
        async def script(ws, n, frame=frame):
            coordinator = coordinators[-1]
            assert decode(await coordinator.recv(ws)).__class__.__name__ == "Hello"
            await ws.send(protocol.Welcome(job_id="job", device_id="java-1").to_wire())
            await ws.send(frame)
            while True:  # whatever the device sends before it goes is recorded
                await coordinator.recv(ws, timeout=60)

        coordinators.append(ScriptedCoordinator(script))
        coordinator = coordinators[-1]
        record = tmp_path / name.replace(" ", "-")
        try:
            result = run_java(java_core, stories_bundle, coordinator.url, record)
        finally:
            coordinator.close()
        line = assert_clear_error(result, words)
        print(f"{name}: {line}")
        assert not coordinator.errors, coordinator.errors
        sent = [decode(f) for f in coordinator.received]
        if name in TASK_CASES:  # a well-formed task it cannot run: declined on the wire, so that it goes elsewhere
            assert [m.TYPE for m in sent] == ["hello", "decline"], name
            assert sent[1].task_id == "t-1" and sent[1].code == "cannot_run" and words in sent[1].reason, sent[1]
        else:
            assert [m.TYPE for m in sent] == ["hello"], name
        assert coordinator.handshakes == 1, f"{name}: the device must stop, not reconnect"
        files = sorted(p.name for p in (record / "frames").iterdir())
        assert not [f for f in files if "sent-update" in f or f.endswith(".partial")], files


def test_a_lost_connection_is_retried_and_the_unanswered_update_sent_again_without_training_twice(
        tmp_path, stories_bundle, java_core):
    task = pack(task_map(stories_bundle))
    first_update: list[bytes] = []

    async def script(ws, n):
        hello = decode(await coordinator.recv(ws))
        assert hello.device_id == "java-1"
        await ws.send(protocol.Welcome(job_id="job", device_id="java-1").to_wire())
        if n == 0:
            await ws.send(task)
            first_update.append(await coordinator.recv(ws))
            await ws.close(1001)  # gone before the ack
            return
        # Reconnected: the unanswered update comes again at once, the same bytes.
        assert await coordinator.recv(ws) == first_update[0]
        await ws.send(task)  # the coordinator resends the open task: the device has answered it already
        with pytest.raises(TimeoutError):
            await coordinator.recv(ws, timeout=2)
        await ws.send(protocol.Ack(task_id="t-1", accepted=True, reason="").to_wire())
        await ws.send(protocol.Done(job_id="job", reason="finished").to_wire())
        await asyncio.sleep(1)

    # The first reconnection is refused (503, the coordinator is full): the device backs off and tries again.
    coordinator = ScriptedCoordinator(script, refuse=lambda n: n == 1)
    try:
        result = run_java(java_core, stories_bundle, coordinator.url, tmp_path)
    finally:
        coordinator.close()
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, err[-3000:]
    assert not coordinator.errors, coordinator.errors
    assert coordinator.handshakes == 3 and coordinator.connections == 2
    assert "device java-1: 1 updates accepted" in out
    # 4 probe batches before, 2 steps, 4 probe batches after: one training, not two.
    assert "program calls 10," in out, out
    kinds = [decode(f).__class__.__name__ for f in coordinator.received]
    assert kinds == ["Hello", "Update", "Hello", "Update"], kinds


def test_untrusted_certificate_revoked_token_and_revocation_while_connected(tmp_path, stories_bundle, java_core,
                                                                            tls_files):
    cert, key, ca = tls_files
    db, tokens = tmp_path / "job.db", tmp_path / "tokens.json"
    enrol(db, tokens, ["java-1"])
    enrol(db, tmp_path / "old.json", ["java-old"])
    run_command("coordinator", "revoke", "--db", str(db), "--device-id", "java-old", check=True)
    # Two devices per round: the Java device waits, connected, with no task.
    coordinator = Coordinator(db, "--auth", "token", "--cert", str(cert), "--key", str(key), "--bundle",
                              str(stories_bundle), "--rounds", "1", "--devices-per-round", "2", "--local-steps", "2",
                              "--round-deadline", "120")
    try:
        assert coordinator.url.startswith("wss://")
        untrusting = run_java(java_core, stories_bundle, coordinator.url, tmp_path / "a", "--credentials", tokens)
        assert_clear_error(untrusting, "the coordinator's TLS certificate is not trusted")
        revoked = java_core.run("JvmDevice", "--coordinator", coordinator.url, "--device-id", "java-old", "--bundle",
                                stories_bundle, "--data", TINYSTORIES, "--helper", HELPER_COMMAND, "--credentials",
                                tmp_path / "old.json", "--ca-file", ca, NO_PROBE, check=False, timeout=120)
        assert_clear_error(revoked, "the coordinator refused this device's credential")
        # Trusted through the CA file, enrolled: it connects and waits; revoked then, it is cut off.
        device = java_core.popen("JvmDevice", "--coordinator", coordinator.url, "--device-id", "java-1", "--bundle",
                                 stories_bundle, "--data", TINYSTORIES, "--helper", HELPER_COMMAND, "--credentials",
                                 tokens, "--ca-file", ca, NO_PROBE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        try:
            seen = []
            for line in device.stderr:
                seen.append(line)
                if "enrolled in job" in line:
                    break
            assert any("CONNECTED" in s for s in seen), "".join(seen)
            run_command("coordinator", "revoke", "--db", str(db), "--device-id", "java-1", check=True)
            _, rest = device.communicate(timeout=60)
        finally:
            if device.poll() is None:
                device.kill()
        errors = [line for line in rest.splitlines() if line.startswith("error: ")]
        assert device.returncode == 1 and len(errors) == 1 and "(revoked)" in errors[0], rest[-2000:]
    finally:
        coordinator.kill()
    print(untrusting.stderr.decode().strip().splitlines()[-1], revoked.stderr.decode().strip().splitlines()[-1], errors[0],
          sep="\n")
