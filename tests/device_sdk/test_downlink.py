"""The device's side of the downlink in seed form, over a real websockets coordinator on loopback: it keeps
its adapter, replays each task's history onto it to the task's sha256, and on a corrupted history reconnects
for the dense adapter instead of training on a wrong one; an older device (keep_adapter off) gets dense tasks.
The program is a stand-in (the tests/support fake bundle): `train` answers without running it."""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np
import pytest

from coordinator.admission import Limits
from coordinator.job import JobOptions
from coordinator.server import Coordinator, JobConfig, job_from_bundle, serve_job
from coordinator.store import open_store
from coordinator.strategies import SeedFedAvg
from device_sdk.client import Device, DeviceConfig, HistoryMismatch
from fwdfed import protocol
from fwdfed.bundle.manifest import load_bundle
from fwdfed.directions import pool_key
from fwdfed.methods.estimate import parse_seed_pool
from tests.conftest import TINYSTORIES
from tests.support.fake_bundle import write_fake_bundle

HPARAMS = {"lr": 1e-3, "eps": 1e-2, "local_steps": 2, "directions": 2, "kind": "rademacher"}
ROUNDS = 3


@pytest.fixture
def bundle(tmp_path):
    return write_fake_bundle(tmp_path / "bundle", rank=128)  # d = 1024: a dense task of 4 KiB


def answering(monkeypatch, seen: list, span: tuple[int, int] | None = None) -> None:
    """Device.train without the program: the checks a real task gets, then a seed-form answer: as many pairs as
    the task allows (from its seed pool when it names one), and with `span` a dense change of those values alone."""
    def train(self, task):
        adapter = self.check_task(task)
        seen.append((task.global_version, hashlib.sha256(adapter.astype("<f4").tobytes()).hexdigest()))
        count = task.hparams["local_steps"] * task.hparams["directions"]
        pool = parse_seed_pool(task.hparams)
        seeds = [hash((task.task_id, k)) % 2**63 if pool is None else int(pool[hash((task.task_id, k)) % len(pool)])
                 for k in range(count)]
        dense = b""
        if span is not None:
            change = np.zeros(adapter.shape[0], "<f4")
            change[span[0] : span[1]] = np.linspace(-1e-2, 1e-2, span[1] - span[0])
            dense = change.tobytes()
        return protocol.Update(task_id=task.task_id, job_id=task.job_id, round=task.round,
                               global_version=task.global_version, seeds=seeds,
                               coefs=[(-1) ** k * 1e-3 / (k + 1) for k in range(count)], scale=1.0, dense=dense,
                               num_examples=self.num_examples, loss_before=1.0, loss_after=0.9, peak_rss_bytes=1)

    monkeypatch.setattr(Device, "train", train)


# Each wire form of a version (fwdfed.history), and how the test corrupts it once: a sum off by 1%, a span value.
FORMS = {"arrays": {}, "packed": {"seed_pool": 16, "local_steps": 20}, "span": {"span": (100, 110)}}


def corrupt(step: dict, form: str) -> dict:
    if form == "packed":
        sums = np.frombuffer(step["sums"], "<f8").copy()
        sums[np.flatnonzero(sums)[0]] *= 1.01
        return dict(step, sums=sums.tobytes())
    if form == "span":
        span = np.frombuffer(step["span"], "<f4").copy()
        span[0] += 1e-3
        return dict(step, span=span.tobytes())
    return dict(step, coefs=[step["coefs"][0] * 1.01, *step["coefs"][1:]])


def run_job(tmp_path, bundle, keep_adapter: bool, corrupt_round: int | None = None, form: str = "arrays"):
    """A job of ROUNDS rounds and one device, its versions in `form` (FORMS); returns the tasks the device received
    (their round, whether they had a history, their frames' sizes, the keys of their history's last version), the
    device, the stored versions' sha256s and their metrics by version."""
    store = open_store(tmp_path / "job.db")
    loaded = load_bundle(bundle)
    setting = FORMS[form]
    options = JobOptions() if "seed_pool" not in setting else \
        JobOptions(seed_pool=setting["seed_pool"], seed_pool_key=f"{pool_key('job'):016x}")
    config = JobConfig(rounds=ROUNDS, devices_per_round=1, min_devices=1, round_deadline_s=30,
                       hparams={**HPARAMS, "local_steps": setting.get("local_steps", 2)}, options=options)
    job = store.create_job(job_from_bundle("job", str(bundle), loaded.manifest, config), loaded.initial_adapter())
    coordinator = Coordinator(store, job, SeedFedAvg(hparams=job.hparams, options=JobOptions.from_json(job.options)),
                              limits=Limits(require_credentials=False))
    if corrupt_round is not None:  # that round's history corrupted, once
        history = coordinator.downlink.history

        def corrupted(device_id, version):
            steps = history(device_id, version)
            if steps and version == corrupt_round - 1 and not corrupted.done:
                corrupted.done = True
                steps = [corrupt(steps[0], form), *steps[1:]]
            return steps

        corrupted.done = False
        coordinator.downlink.history = corrupted
    received = []
    replay_of = Device.task_adapter

    def task_adapter(self, task):
        received.append((task.round, task.history is not None, len(task.to_wire()),
                         set(task.history[-1]) if task.history else set()))
        return replay_of(self, task)

    async def scenario():
        ready = asyncio.get_running_loop().create_future()
        serving = asyncio.create_task(serve_job(coordinator, "127.0.0.1", 0, ready=ready.set_result))
        url = await asyncio.wait_for(ready, 10)
        device = Device(DeviceConfig(device_id="keeper", coordinator=url, bundle=str(bundle), data=str(TINYSTORIES),
                                     shard_index=0, shard_count=1, keep_adapter=keep_adapter), load_program=False)
        device.task_adapter = task_adapter.__get__(device)
        assert await asyncio.wait_for(device.run(), 60) == ROUNDS
        assert await asyncio.wait_for(serving, 30)
        return device

    device = asyncio.run(scenario())
    metrics = {}
    for m in store.metrics(job.id):
        metrics.setdefault(m.version, {})[m.name] = m.value
    return received, device, [v.sha256 for v in store.versions(job.id)], metrics


# What the last version of a round's history holds, by form: its sums packed, a span beside the sums.
HOLDS = {"arrays": {"seeds"}, "packed": {"sums"}, "span": {"seeds", "span"}}


def test_a_device_that_keeps_its_adapter_replays_every_round_to_the_stored_versions(tmp_path, bundle, monkeypatch):
    seen = []
    answering(monkeypatch, seen)
    received, device, shas, _ = run_job(tmp_path, bundle, keep_adapter=True)
    dense = 4 * 1024
    assert [(r, h) for r, h, _, _ in received] == [(1, True), (2, True), (3, True)]
    assert all(size < dense / 4 for _, _, size, _ in received)  # 16 pairs of history against 4 KiB of adapter
    assert seen == list(enumerate(shas[:ROUNDS])) and device.resyncs == 0
    assert device.held[0] == ROUNDS - 1


@pytest.mark.parametrize("form", FORMS)
def test_a_corrupted_history_is_detected_and_the_device_trains_on_the_dense_adapter(tmp_path, bundle, monkeypatch,
                                                                                    form):
    """In each form (FORMS): round 2's entry corrupted once; rounds 1 and 3 replay in that form."""
    seen = []
    answering(monkeypatch, seen, FORMS[form].get("span"))
    received, device, shas, metrics = run_job(tmp_path, bundle, keep_adapter=True, corrupt_round=2, form=form)
    # round 2's history did not replay: the device reconnected, got the same task dense, and went on in seed form
    assert [(r, h) for r, h, _, _ in received] == [(1, True), (2, True), (2, False), (3, True)]
    assert HOLDS[form] <= received[1][3] and HOLDS[form] <= received[3][3]  # the form under test, both times
    assert received[3][2] < 4 * 1024 / 4  # round 2's sums (and span) against 4 KiB of adapter
    assert device.resyncs == 1 and seen == list(enumerate(shas[:ROUNDS]))  # it never trained on a wrong adapter
    # what the coordinator recorded for `status` and the benchmarks: every task frame it sent, by round
    assert [(metrics[v]["tasks_sent"], metrics[v]["tasks_in_seed_form"]) for v in (1, 2, 3)] == [(1, 1), (2, 1),
                                                                                                   (1, 1)]
    assert metrics[2]["task_bytes_max"] > 4 * 1024 > 4 * metrics[3]["task_bytes_max"]  # the dense one, and not


def test_an_older_device_gets_dense_tasks(tmp_path, bundle, monkeypatch):
    seen = []
    answering(monkeypatch, seen)
    received, device, shas, _ = run_job(tmp_path, bundle, keep_adapter=False)
    assert [(r, h) for r, h, _, _ in received] == [(1, False), (2, False), (3, False)]
    assert device.hello().held_sha256 is None and b"held_" not in device.hello().to_wire()
    assert seen == list(enumerate(shas[:ROUNDS]))


def test_a_history_that_does_not_start_at_the_held_version_is_a_mismatch_and_the_device_then_holds_none(bundle):
    device = Device(DeviceConfig(device_id="d", coordinator="ws://127.0.0.1:9", bundle=str(bundle),
                                 data=str(TINYSTORIES), shard_index=0, shard_count=1), load_program=False)
    held = device.held[1]
    task = protocol.Task(task_id="t", job_id="j", round=3, global_version=2, base_model_hash="0" * 64, adapter=b"",
                         adapter_sha256=hashlib.sha256(held.tobytes()).hexdigest(), method="mezo", hparams=HPARAMS,
                         deadline_s=1.0, reference=b"",
                         history=[{"version": 2, "seeds": [1], "coefs": [0.0], "shrink": 0.0, "block": []}])
    assert device.hello().held_version == 0 and device.hello().held_sha256 == task.adapter_sha256
    with pytest.raises(HistoryMismatch, match="from version 1, this device holds 0"):
        device.task_adapter(task)
    assert device.held is None and (device.hello().held_version, device.hello().held_sha256) == (0, "")
    np.testing.assert_array_equal(held, np.zeros(1024, np.float32))
