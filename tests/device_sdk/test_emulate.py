"""The process emulator's workers (device_sdk.emulate.run_processes) in real spawned processes, standing in for
device_sdk.worker.run_devices: what a worker sends comes back whatever its size; the devices of a worker that died are named."""

from __future__ import annotations

import os
from types import SimpleNamespace

from device_sdk.emulate import run_processes


def send_many_records(configs, profiles, timing, sender) -> None:
    """A worker of hundreds of devices: its records far past what a pipe holds (64 KiB on Linux)."""
    sender.send({"node": "local", "pid": os.getpid(), "peak_rss": 1,
                 "devices": [{"device_id": c.device_id, "tasks": [{"round": 1, "outcome": "accepted"}] * 50}
                             for c in configs]})


def die_without_records(configs, profiles, timing, sender) -> None:
    os._exit(3)


def devices(prefix: str, count: int) -> tuple[list, list]:
    return [SimpleNamespace(device_id=f"{prefix}-{i}") for i in range(count)], [None] * count


def test_every_workers_records_come_back_however_large():
    finished, failed = run_processes([devices("a", 500), devices("b", 500)], None, send_many_records)
    assert failed == []
    assert sorted(len(w["devices"]) for w in finished) == [500, 500]


def test_a_worker_that_dies_before_sending_fails_its_devices():
    finished, failed = run_processes([devices("a", 2)], None, die_without_records)
    assert (finished, failed) == ([], ["a-0", "a-1"])
