"""The downlink in seed form on the coordinator (docs/protocol.md): which devices get a task's history instead
of the dense adapter, and that the history replays to the task's sha256 (in-process, on a real SQLite store;
connections are stand-ins: the device's side over real sockets is in tests/device_sdk/test_downlink.py)."""

from __future__ import annotations

import asyncio
import hashlib
import random

import msgpack
import numpy as np
import pytest

from coordinator.admission import Limits
from coordinator.job import JobOptions
from coordinator.server import Coordinator, JobConfig, job_from_bundle
from coordinator.store import open_store
from coordinator.strategies import SeedFedAvg
from coordinator.strategies.dp_fedavg import DPSeedFedAvg
from fwdfed import methods, protocol
from fwdfed.bundle.layout import AdapterLayout
from fwdfed.directions import pool_key
from fwdfed.history import entry, entry_sums
from fwdfed.methods.estimate import parse_seed_pool
from fwdfed.update import SeedSums, replay

DIM = 4096  # a dense task: 16 KiB of adapter; a round's history: a few hundred bytes
HPARAMS = {"lr": 1e-3, "eps": 1e-2, "local_steps": 4, "directions": 2, "kind": "rademacher", "weight_decay": 0.1}


class Recorder:
    def __init__(self):
        self.frames: list[bytes] = []

    async def send(self, frame: bytes) -> None:
        self.frames.append(frame)


def coordinator(tmp_path, options: JobOptions | None = None, strategy=None, method: str = "mezo",
                hparams: dict | None = None, layout=None, blocks=None) -> Coordinator:
    options = options or JobOptions()
    config = JobConfig(rounds=5, devices_per_round=2, min_devices=1, round_deadline_s=1, method=method,
                       hparams=hparams or HPARAMS, options=options)
    tmp_path.mkdir(exist_ok=True)
    store = open_store(tmp_path / "job.db")
    manifest = type("Manifest", (), {"base_model_hash": "h" * 64, "adapter_dim": layout.dim if layout else DIM})
    start = np.random.default_rng(0).standard_normal(manifest.adapter_dim).astype(np.float32)
    job = store.create_job(job_from_bundle("job", "/bundle", manifest, config), start)
    strategy = strategy or SeedFedAvg(method=methods.get(method), hparams=job.hparams,
                                      options=JobOptions.from_json(job.options), devices_per_round=2, layout=layout)
    return Coordinator(store, job, strategy, limits=Limits(require_credentials=False), layout=layout, blocks=blocks)


async def closed_round(c: Coordinator, number: int, dense: bool = False, block=None, pairs: int = 8,
                       head: tuple[int, int] | None = None) -> None:
    """Round `number` from version number - 1, answered by two devices (one with weight decay's shrink), closed:
    `pairs` pairs each (from the job's seed pool when it has one), and with `dense` a dense part of the whole
    adapter (the backprop baseline) from one of them, or with `head` a dense part of that span from both (hybrid)."""
    rng = np.random.default_rng(number)
    rnd = c.store.start_round(c.job.id, number, number - 1, block)
    for device_id in ("a", "b"):
        c.store.touch_device(device_id, 1, None)
    tasks = c.store.add_tasks(rnd.id, 0, c.strategy.configure(0, block, ["a", "b"], lambda: ({}, {}),
                                                              random.Random(0)))
    pool = parse_seed_pool(tasks[0].hparams)
    for k, task in enumerate(tasks):
        seeds = rng.choice(pool, pairs) if pool is not None else rng.integers(0, 2**63, pairs)
        pairs_sent = [(int(s), float(v)) for s, v in zip(seeds, rng.normal(0, 1e-3, pairs))]
        part = None
        if dense and k == 0:
            part = rng.normal(0, 1e-4, c.job.adapter_dim).astype("<f4").tobytes()
        elif head is not None:
            part = rng.normal(0, 1e-2, head[1] - head[0]).astype("<f4").tobytes()
        scale = 1.0 - 1e-4 * k if c.job.method == "mezo" else 1.0
        assert c.store.add_update(task, pairs_sent, scale, 10 + k, 1.0, 0.9, 1, part)
    assert await c.run_round(rnd)


async def task_to(c: Coordinator, device_id: str, held: tuple[int, str] | None) -> tuple[protocol.Task, int, int]:
    """The task the coordinator sends `device_id` for a new round from the latest version, the device holding
    `held` (None: an older device, whose hello said nothing); and that frame's size against the dense one's."""
    latest = c.store.latest_version(c.job.id).version
    rnd = c.store.start_round(c.job.id, latest + 1, latest)
    c.store.touch_device(device_id, 1, None)
    (task,) = c.store.add_tasks(rnd.id, 0, c.strategy.configure(0, None, [device_id], lambda: ({}, {}),
                                                                 random.Random(0)))
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
    """The sha256 of `start` with the task's history replayed as a device reads it (fwdfed.history)."""
    steps = [entry_sums(s, parse_seed_pool(task.hparams)) for s in task.history]
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


# A class-statistics head round's version: the head alone changed (fwdfed.methods.class_stats), at the layout's end.
LAYOUT = AdapterLayout.from_shapes([("lora_A", (8, 256)), ("lora_B", (256, 8)), ("classifier.weight", (4, 8)),
                                    ("classifier.bias", (4,))])


def class_statistics(rng: np.random.Generator, classes: int = 4, features: int = 8) -> bytes:
    """A device's answer to a class-stats task: per-class feature sums, counts and the outer-product sum."""
    x, labels = rng.standard_normal((40, features)), rng.integers(0, classes, 40)
    sums = np.stack([x[labels == k].sum(axis=0) for k in range(classes)])
    counts = np.bincount(labels, minlength=classes)
    return np.concatenate([sums.ravel(), counts, (x.T @ x).ravel()]).astype("<f4").tobytes()


def test_the_class_statistics_head_round_goes_down_as_its_heads_span(tmp_path):
    async def scenario():
        c = coordinator(tmp_path, JobOptions(head_init="lda"), layout=LAYOUT)
        rnd = c.store.start_round(c.job.id, 1, 0)
        for device_id in ("a", "b"):
            c.store.touch_device(device_id, 1, None)
        hparams = c.round_strategy(1).configure(0, None, ["a", "b"], lambda: ({}, {}), random.Random(0))
        for k, task in enumerate(c.store.add_tasks(rnd.id, 0, hparams)):
            assert c.store.add_update(task, [], 1.0, 40, 1.0, 1.0, 1, class_statistics(np.random.default_rng(k)))
        assert await c.run_round(rnd)
        head = LAYOUT["classifier.weight"].offset
        assert np.array_equal(vector(c, 1)[:head], vector(c, 0)[:head])  # the head alone changed
        await closed_round(c, 2)
        task, size, dense_size = await task_to(c, "a", (0, sha(c, 0)))
        first, second = task.history
        assert (first["seeds"], first["span_start"], len(first["span"])) == ([], head, 4 * (LAYOUT.dim - head))
        assert "span" not in second and len(second["seeds"]) == 16
        assert replayed(task, vector(c, 0)) == sha(c, 2) and size < dense_size / 10

    asyncio.run(scenario())


def test_a_hybrid_rounds_version_goes_down_as_its_body_sums_and_its_heads_span(tmp_path):
    body, dim = 4096, 4096 + 6  # the head: 2 classes x 2 features + 2 biases, the adapter's last 6 values
    hparams = {**HPARAMS, "head_lr": 1e-2, "num_classes": 2, "feature_dim": 2, "head_start": body,
               "block_start": 0, "block_end": body}
    hparams.pop("weight_decay")
    layout = AdapterLayout.from_shapes([("lora_A", (8, 512)), ("classifier.weight", (2, 2)), ("classifier.bias", (2,))])
    assert layout.dim == dim

    async def scenario():
        c = coordinator(tmp_path, method="hybrid", hparams=hparams, layout=layout, blocks=[(0, body)])
        await closed_round(c, 1, block=(0, body), head=(body, dim))
        task, size, dense_size = await task_to(c, "a", (0, sha(c, 0)))
        (step,) = task.history
        assert step["block"] == [0, body] and len(step["seeds"]) == 16 and step["span_start"] == body
        assert np.array_equal(np.frombuffer(step["span"], "<f4"), vector(c, 1)[body:])
        assert replayed(task, vector(c, 0)) == sha(c, 1) and size < dense_size / 10

    asyncio.run(scenario())


@pytest.mark.parametrize("size, pairs, form", [(16, 40, "sums"), (4096, 8, "seeds")], ids=["packed", "arrays"])
def test_a_pool_jobs_version_goes_down_in_the_smaller_form_and_replays_in_pool_order(tmp_path, size, pairs, form):
    """80 draws from a pool of 16: every pool seed, 8 bytes each packed against about 19 as seed and sum; 16 draws
    from 4,096: the arrays, whose seeds are in pool order (the order the round applied them in)."""
    async def scenario():
        c = coordinator(tmp_path, JobOptions(seed_pool=size, seed_pool_key=f"{pool_key('job'):016x}"),
                        hparams={**HPARAMS, "local_steps": 20})
        await closed_round(c, 1, pairs=pairs)
        task, frame, dense_size = await task_to(c, "a", (0, sha(c, 0)))
        (step,) = task.history
        assert form in step and replayed(task, vector(c, 0)) == sha(c, 1) and frame < dense_size / 10
        pool = parse_seed_pool(task.hparams).tolist()
        if form == "sums":
            assert len(step["sums"]) == 8 * size and np.count_nonzero(np.frombuffer(step["sums"], "<f8")) == size
        else:
            assert [pool.index(s) for s in step["seeds"]] == sorted(pool.index(s) for s in step["seeds"])
            assert len(step["seeds"]) == 16
        sums = entry_sums(step, parse_seed_pool(task.hparams))
        arrays, packed = entry(1, sums), {**{k: step[k] for k in ("version", "shrink", "block")},
                                          "sums": np.zeros(size, "<f8").tobytes()}
        assert len(msgpack.packb(step)) == min(len(msgpack.packb(arrays)), len(msgpack.packb(packed)))

    asyncio.run(scenario())
