"""The Java device's isolated loading on the JVM (docs/security.md, Isolated loading): its program tried
first in a child process (HelperProbe: loss_helper.py --probe). Given a program that crashes the runtime,
the child dies, the device connects, declines its task (recorded by the coordinator, the task going to
another device), stays up and ends with the job, having said why in one line. A program the runtime
refuses with an error stops the device with that line before it connects, as it always did."""

from __future__ import annotations

import shutil
import socket
import time

from coordinator.store import open_store
from tests.android_demo.support import HELPER_COMMAND
from tests.conftest import TINYSTORIES
from tests.device_sdk.test_hostile_input import corrupt, install_program
from tests.support.crashing import STORIES_CRASHING_INDEX, crashing_program
from tests.support.fleet import Coordinator, emulate

CRASH = "crashed the ExecuTorch runtime in the child process that tried it (killed by SIGSEGV): not loaded"


def test_a_java_device_given_a_crashing_program_declines_its_task_and_stays_up(tmp_path, stories_bundle, java_core):
    bad = shutil.copytree(stories_bundle, tmp_path / "bad")
    install_program(bad, crashing_program(bad, STORIES_CRASHING_INDEX))
    db = tmp_path / "job.db"
    coordinator = Coordinator(db, "--bundle", str(stories_bundle), "--rounds", "1", "--devices-per-round", "1",
                              "--local-steps", "2", "--round-deadline", "300")
    crashing = None
    try:
        # Alone at first, so that the round's task is the crashing device's.
        crashing = java_core.popen("JvmDevice", "--coordinator", coordinator.url, "--device-id", "crash-0", "--bundle",
                                   bad, "--data", TINYSTORIES, "--helper", HELPER_COMMAND, stdout=-1, stderr=-1)
        deadline = time.monotonic() + 180
        while "declined task" not in coordinator.stderr():
            assert time.monotonic() < deadline and crashing.poll() is None, coordinator.stderr()[-2000:]
            time.sleep(0.5)
        assert crashing.poll() is None  # declined, and still up
        honest = emulate(coordinator.url, stories_bundle, TINYSTORIES, 1, "--device-prefix", "good")
        assert honest.returncode == 0, honest.stderr[-2000:]
        code, out, err = coordinator.wait(timeout=120)
        assert code == 0 and "round 1/1: 1 updates" in out, err[-2000:]
        out, stderr = crashing.communicate(timeout=60)  # the job's `done` ends it, as any device
    finally:
        coordinator.kill()
        if crashing is not None and crashing.poll() is None:
            crashing.kill()
    stderr = stderr.decode("utf-8", "replace")  # the runtime's log quotes the corrupt bytes
    assert crashing.returncode == 0, stderr[-3000:]
    assert "Exception" not in stderr and "\tat org." not in stderr, stderr[-3000:]
    assert "crash-0: probe crashed in " in stderr, stderr[-3000:]
    assert sum(CRASH in line and "declining tasks until the bundle is replaced" in line
               for line in stderr.splitlines()) == 1, stderr[-3000:]
    assert "declined: task " in stderr and " recorded" in stderr, stderr[-3000:]
    assert "device crash-0: 0 updates accepted" in out.decode()
    store = open_store(db)
    [refusal] = store.refusals(store.latest_job().id)
    assert (refusal.device_id, refusal.code) == ("crash-0", "declined")
    assert refusal.reason.startswith("cannot_run: task ") and refusal.reason.endswith(f"{bad}/model.pte {CRASH}")


def test_a_program_the_runtime_refuses_stops_the_java_device_with_its_line_before_it_connects(tmp_path,
                                                                                           stories_bundle, java_core):
    bad = shutil.copytree(stories_bundle, tmp_path / "bad")
    install_program(bad, corrupt((bad / "model.pte").read_bytes(), "truncated"))
    with socket.socket() as s:  # a loopback port nobody listens on: the device must not get as far as it
        s.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{s.getsockname()[1]}"
    result = java_core.run("JvmDevice", "--coordinator", url, "--device-id", "java-1", "--bundle", bad, "--data",
                           TINYSTORIES, "--helper", HELPER_COMMAND, "--connect-timeout", "5", check=False, timeout=120)
    err = result.stderr.decode("utf-8", "replace")
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1, err[-2000:]
    assert errors[0].startswith("error: cannot load the ExecuTorch program: "), errors
    assert "Exception" not in err and "connecting" not in err, err[-2000:]
