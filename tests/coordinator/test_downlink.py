"""The downlink in seed form on the coordinator (docs/protocol.md): which devices get a task's history instead
of the dense adapter, and that the history replays to the task's sha256 (in-process, on a real SQLite store;
connections are stand-ins: the device's side over real sockets is in tests/device_sdk/test_downlink.py)."""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np
import pytest

from coordinator.admission import Limits
from coordinator.job import JobOptions
from coordinator.server import Coordinator, JobConfig, job_from_bundle
from coordinator.store import open_store
from coordinator.strategies import SeedFedAvg
from coordinator.strategies.dp_fedavg import DPSeedFedAvg
from fwdfed import protocol
from fwdfed.update import SeedSums, replay

DIM = 4096  # a dense task: 16 KiB of adapter; a round's history: a few hundred bytes
HPARAMS = {"lr": 1e-3, "eps": 1e-2, "local_steps": 4, "directions": 2, "kind": "rademacher", "weight_decay": 0.1}


class FakeManifest:
    base_model_hash = "h" * 64
    adapter_dim = DIM


class Recorder:
    def __init__(self):
        self.frames: list[bytes] = []

    async def send(self, frame: bytes) -> None:
        self.frames.append(frame)


def coordinator(tmp_path, options: JobOptions | None = None, strategy=None) -> Coordinator:
    options = options or JobOptions()
    config = JobConfig(rounds=5, devices_per_round=2, min_devices=1, round_deadline_s=1, hparams=HPARAMS,
                       options=options)
    tmp_path.mkdir(exist_ok=True)
    store = open_store(tmp_path / "job.db")
    start = np.random.default_rng(0).standard_normal(DIM).astype(np.float32)
    job = store.create_job(job_from_bundle("job", "/bundle", FakeManifest, config), start)
    strategy = strategy or SeedFedAvg(hparams=job.hparams, options=options, devices_per_round=2)
    return Coordinator(store, job, strategy, limits=Limits(require_credentials=False))


async def closed_round(c: Coordinator, number: int, dense: bool = False, block=None) -> None:
    """Round `number` from version number - 1, answered by two devices (one with weight decay's shrink), closed."""
    rng = np.random.default_rng(number)
    rnd = c.store.start_round(c.job.id, number, number - 1, block)
    for device_id in ("a", "b"):
        c.store.touch_device(device_id, 1, None)
    tasks = c.store.add_tasks(rnd.id, 0, {d: dict(c.job.hparams) for d in ("a", "b")})
    for k, task in enumerate(tasks):
        pairs = [(int(s), float(v)) for s, v in zip(rng.integers(0, 2**63, 8), rng.normal(0, 1e-3, 8))]
        part = rng.normal(0, 1e-4, DIM).astype("<f4").tobytes() if dense and k == 0 else None
        assert c.store.add_update(task, pairs, 1.0 - 1e-4 * k, 10 + k, 1.0, 0.9, 1, part)
    assert await c.run_round(rnd)


async def task_to(c: Coordinator, device_id: str, held: tuple[int, str] | None) -> tuple[protocol.Task, int, int]:
    """The task the coordinator sends `device_id` for a new round from the latest version, the device holding
    `held` (None: an older device, whose hello said nothing); and that frame's size against the dense one's."""
    latest = c.store.latest_version(c.job.id).version
    rnd = c.store.start_round(c.job.id, latest + 1, latest)
    c.store.touch_device(device_id, 1, None)
    (task,) = c.store.add_tasks(rnd.id, 0, {device_id: dict(c.job.hparams)})
    c.connections[device_id] = ws = Recorder()
    if held is not None:
        c.held[device_id] = held
    await c._send_task(rnd, task)
    c.store.fail_round(rnd.id, "test")  # the next round opens from the same version
    dense = protocol.Task(**{**protocol.decode(ws.frames[0]).__dict__, "history": None,
                             "adapter": c.store.version(c.job.id, latest).vector})
    return protocol.decode(ws.frames[0]), len(ws.frames[0]), len(dense.to_wire())


def sha(c: Coordinator, version: int) -> str:
    return c.store.version(c.job.id, version).sha256


def vector(c: Coordinator, version: int) -> np.ndarray:
    return np.frombuffer(c.store.version(c.job.id, version).vector, "<f4")


def replayed(task: protocol.Task, start: np.ndarray) -> str:
    steps = [SeedSums(s["seeds"], s["coefs"], s["shrink"], tuple(s["block"]) or None) for s in task.history]
    return hashlib.sha256(replay(start, steps, "rademacher").astype("<f4").tobytes()).hexdigest()


def test_a_device_that_took_part_gets_the_rounds_history_which_replays_to_the_tasks_sha256(tmp_path):
    async def scenario():
        c = coordinator(tmp_path)
        await closed_round(c, 1)
        await closed_round(c, 2, block=(100, 3000))  # a block, and every round a shrink: both in the sums
        task, size, dense_size = await task_to(c, "a", (1, sha(c, 1)))
        assert task.adapter == b"" and [s["version"] for s in task.history] == [2]
        assert len(task.history[0]["seeds"]) == 16 and task.history[0]["block"] == [100, 3000]
        assert size < dense_size / 10 and task.adapter_sha256 == sha(c, 2)
        assert replayed(task, vector(c, 1)) == sha(c, 2)
        assert c.held["a"] == (2, sha(c, 2))  # it holds the task's version from now on
        behind, _, _ = await task_to(c, "a", (0, sha(c, 0)))  # one that missed a round replays both
        assert [s["version"] for s in behind.history] == [1, 2] and replayed(behind, vector(c, 0)) == sha(c, 2)
        current, _, _ = await task_to(c, "a", (2, sha(c, 2)))  # a resent task: nothing to replay
        assert current.history == [] and current.adapter == b""

    asyncio.run(scenario())


@pytest.mark.parametrize("held", [None, (1, "0" * 64), (1, ""), (7, "x")], ids=["older", "other-sha", "none", "ahead"])
def test_a_device_that_holds_no_usable_version_gets_the_dense_adapter(tmp_path, held):
    async def scenario():
        c = coordinator(tmp_path)
        await closed_round(c, 1)
        await closed_round(c, 2)
        task, _, _ = await task_to(c, "a", held)
        assert task.history is None and task.adapter == c.store.version(c.job.id, 2).vector
        assert ("a" in c.held) == (held is not None)  # an older device is never counted as keeping its adapter

    asyncio.run(scenario())


def test_a_version_with_a_dense_part_goes_down_dense_and_histories_start_again_after_it(tmp_path):
    async def scenario():
        c = coordinator(tmp_path)
        await closed_round(c, 1, dense=True)  # the backprop baseline: no per-seed sum
        await closed_round(c, 2)
        crossing, _, _ = await task_to(c, "a", (0, sha(c, 0)))
        assert crossing.history is None and crossing.adapter == c.store.version(c.job.id, 2).vector
        after, _, _ = await task_to(c, "a", (1, sha(c, 1)))
        assert [s["version"] for s in after.history] == [2] and replayed(after, vector(c, 1)) == sha(c, 2)

    asyncio.run(scenario())


def test_server_lr_and_clip_are_in_the_sums_and_dp_noise_goes_down_dense(tmp_path):
    async def scenario():
        c = coordinator(tmp_path / "lr", JobOptions(server_lr=0.5, clip=1e-3))
        await closed_round(c, 1)
        task, _, _ = await task_to(c, "a", (0, sha(c, 0)))
        assert replayed(task, vector(c, 0)) == sha(c, 1)
        options = JobOptions(strategy="dp-fedavg", strategy_options={"dp_clip": 1.0, "dp_noise_multiplier": 0.5})
        dp = coordinator(tmp_path / "dp", options, DPSeedFedAvg(hparams=HPARAMS, options=options, seed=0))
        await closed_round(dp, 1)
        task, _, _ = await task_to(dp, "a", (0, sha(dp, 0)))
        assert task.history is None and task.adapter == dp.store.version(dp.job.id, 1).vector

    asyncio.run(scenario())


def test_sums_that_do_not_replay_to_the_stored_version_go_down_dense(tmp_path, monkeypatch):
    async def scenario():
        c = coordinator(tmp_path)
        await closed_round(c, 1)
        honest = SeedFedAvg.version_sums

        def off_by_a_bit(self, updates, block=None):
            sums = honest(self, updates, block)
            return SeedSums(sums.seeds, [sums.coefs[0] * 1.01, *sums.coefs[1:]], sums.shrink, sums.block)

        monkeypatch.setattr(SeedFedAvg, "version_sums", off_by_a_bit)
        task, _, _ = await task_to(c, "a", (0, sha(c, 0)))
        assert task.history is None and task.adapter == c.store.version(c.job.id, 1).vector

    asyncio.run(scenario())
