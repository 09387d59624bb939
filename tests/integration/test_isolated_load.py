"""A device process given a program that crashes the runtime stays up: the forked child that tried the
program dies, the device connects, declines its task (recorded by the coordinator, the task going to
another device) and ends with the job, having said why in one line."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

from coordinator.store import open_store
from tests.conftest import ROOT, TINYSTORIES
from tests.device_sdk.test_hostile_input import install_program
from tests.support.crashing import crashing_program
from tests.support.fleet import Coordinator, emulate

CRASH = "crashed the ExecuTorch runtime in the child process that tried it (killed by SIGSEGV): not loaded"


def test_a_device_given_a_crashing_program_declines_its_task_and_stays_up(tmp_path, tiny_llama_bundle):
    bad = shutil.copytree(tiny_llama_bundle, tmp_path / "bad")
    install_program(bad, crashing_program(bad))
    db = tmp_path / "job.db"
    coordinator = Coordinator(db, "--bundle", str(tiny_llama_bundle), "--rounds", "1", "--devices-per-round", "1",
                              "--local-steps", "2", "--round-deadline", "300")
    crashing = None
    try:
        # Alone at first, so that the round's task is the crashing device's.
        crashing = subprocess.Popen(
            [sys.executable, "-m", "device_sdk.emulate", "--mem", "1.5GB", "--coordinator", coordinator.url,
             "--devices", "1", "--device-prefix", "crash", "--bundle", str(bad), "--data", str(TINYSTORIES)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 180
        while "declined task" not in coordinator.stderr():
            assert time.monotonic() < deadline and crashing.poll() is None, coordinator.stderr()[-2000:]
            time.sleep(0.5)
        assert crashing.poll() is None  # declined, and still up
        honest = emulate(coordinator.url, tiny_llama_bundle, TINYSTORIES, 1, "--device-prefix", "good")
        assert honest.returncode == 0, honest.stderr[-2000:]
        code, out, err = coordinator.wait(timeout=120)
        assert code == 0 and "round 1/1: 1 updates" in out, err[-2000:]
        _, stderr = crashing.communicate(timeout=60)  # the job's `done` ends it, as any device
    finally:
        coordinator.kill()
        if crashing is not None and crashing.poll() is None:
            crashing.kill()
    stderr = stderr.decode("utf-8", "replace")  # the runtime's log quotes the corrupt bytes
    assert crashing.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert sum(CRASH in line and "declining tasks until the bundle is replaced" in line
               for line in stderr.splitlines()) == 1, stderr[-3000:]
    store = open_store(db)
    [refusal] = store.refusals(store.latest_job().id)
    assert (refusal.device_id, refusal.code) == ("crash-0", "declined")
    assert refusal.reason.startswith("cannot_run: task ") and refusal.reason.endswith(f"{bad}/model.pte {CRASH}")
