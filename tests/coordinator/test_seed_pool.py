"""FedKSeed's seed pool on the coordinator: the job option, the tasks that name the pool, the refusal
of a seed outside it, and the per-seed aggregation (in-process, on a real SQLite store)."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from coordinator.__main__ import parse_args
from coordinator.admission import Limits
from coordinator.job import JobOptions, resumed_options
from coordinator.serve_args import job_options
from coordinator.server import Coordinator, JobConfig, job_from_bundle
from coordinator.store import open_store
from coordinator.strategies import AcceptedUpdate, SeedFedAvg
from fwdfed import protocol
from fwdfed.directions import pool_key, seed_pool
from fwdfed.update import SeedUpdate

HPARAMS = {"lr": 1e-3, "eps": 1e-2, "local_steps": 2, "directions": 2, "kind": "rademacher"}


class FakeManifest:
    base_model_hash = "h" * 64
    adapter_dim = 16


def pooled_coordinator(tmp_path, size: int = 8) -> Coordinator:
    options = JobOptions(seed_pool=size, seed_pool_key=f"{pool_key('job'):016x}")
    config = JobConfig(rounds=1, devices_per_round=1, min_devices=1, round_deadline_s=60, hparams=HPARAMS,
                       options=options)
    store = open_store(tmp_path / "job.db")
    job = store.create_job(job_from_bundle("job", "/bundle", FakeManifest, config), np.zeros(16, np.float32))
    strategy = SeedFedAvg(hparams=job.hparams, options=JobOptions.from_json(job.options))
    return Coordinator(store, job, strategy, limits=Limits(require_credentials=False))


def test_serve_stores_the_pool_with_the_job_and_a_resumed_job_keeps_it():
    args = parse_args(["serve", "--db", "x.db", "--bundle", "b", "--job-id", "agnews", "--seed-pool", "4096"])
    options = job_options(args)
    assert (options.seed_pool, options.seed_pool_key) == (4096, f"{pool_key('agnews'):016x}")
    stored = options.to_json()
    resumed, warnings = resumed_options(stored, {"server_lr": None, "clip": None, "seed_pool": None})
    assert resumed == options and warnings == []
    resumed, warnings = resumed_options(stored, {"seed_pool": 16})  # a resumed job runs on with its own pool
    assert resumed.seed_pool == 4096 and warnings == ["ignoring --seed-pool 16: job was created with 4096"]
    free = job_options(parse_args(["serve", "--db", "x.db", "--bundle", "b"]))
    assert (free.seed_pool, free.seed_pool_key) == (None, None) and free.pool_hparams() == {}
    _, warnings = resumed_options(free.to_json(), {"seed_pool": 16})
    assert warnings == ["ignoring --seed-pool 16: job was created without it"]


@pytest.mark.parametrize("value", ["0", "-3", str(2**20 + 1)])
def test_a_bad_pool_size_is_one_clear_error(value, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["serve", "--db", "x.db", "--bundle", "b", "--seed-pool", value])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("error: --seed-pool must be between 1 and 1048576")


def test_every_task_of_a_pooled_job_names_the_pool(tmp_path):
    c = pooled_coordinator(tmp_path)
    tasks = c.strategy.configure(0, None, ["a", "b"], lambda: ({}, {}), random.Random(0))
    assert {d: (h["seed_pool"], h["seed_pool_key"]) for d, h in tasks.items()} == {
        "a": (8, f"{pool_key('job'):016x}"), "b": (8, f"{pool_key('job'):016x}")}
    free = SeedFedAvg(hparams=HPARAMS).configure(0, None, ["a"], lambda: ({}, {}), random.Random(0))
    assert "seed_pool" not in free["a"] and "seed_pool_key" not in free["a"]


def test_a_seed_outside_the_pool_is_refused_in_the_tables_order(tmp_path):
    c = pooled_coordinator(tmp_path)
    hparams = c.strategy.configure(0, None, ["a"], lambda: ({}, {}), random.Random(0))["a"]
    pool = [int(s) for s in seed_pool(pool_key("job"), 8)]
    outside = next(s for s in range(100) if s not in pool)
    assert c.checks.poisoning([(pool[0], 1e-3), (pool[7], -1e-3)], 1.0, b"", hparams, c.method) is None
    code, reason = c.checks.poisoning([(pool[0], 1e-3), (outside, 1e-3)], 1.0, b"", hparams, c.method)
    assert code == "outside_pool" and f"seed {outside} " in reason
    # docs/protocol.md's order: too_many_pairs before it, bad_scale after it
    assert c.checks.poisoning([(outside, 1e-3)] * 5, 1.0, b"", hparams, c.method)[0] == "too_many_pairs"
    assert c.checks.poisoning([(outside, 1e-3)], 0.5, b"", hparams, c.method)[0] == "outside_pool"
    assert c.checks.poisoning([(outside, 1e-3)], 1.0, b"", HPARAMS, c.method) is None  # a task without a pool: free


def test_a_pooled_round_aggregates_by_seed_as_the_updates_would_one_by_one(tmp_path):
    """2,000 updates over a pool of 8: eight directions made, the same adapter as update after update
    to rounding, and the same bits when recomputed (the fixed order)."""
    rng, d = np.random.default_rng(0), 16
    pool = seed_pool(pool_key("job"), 8)
    updates = [AcceptedUpdate.of(str(i), [(int(s), float(c)) for s, c in zip(rng.choice(pool, 2),
                                                                             rng.normal(0, 1e-3, 2))],
                                 int(rng.integers(1, 50))) for i in range(2_000)]
    strategy, w = SeedFedAvg(hparams=HPARAMS), rng.standard_normal(d).astype(np.float32)
    new = strategy.aggregate(w, updates)
    total = sum(u.num_examples for u in updates)
    one_by_one = w.astype(np.float64) + sum((u.num_examples / total) * SeedUpdate(u.pairs).delta(w, "rademacher")
                                            for u in updates)
    np.testing.assert_allclose(new, one_by_one.astype(np.float32), rtol=0, atol=1e-6)
    assert np.abs(new - w).max() > 1e-5
    assert np.array_equal(strategy.aggregate(w.copy(), list(updates)), new)


def test_an_update_with_a_seed_outside_the_pool_is_refused_and_the_device_keeps_its_task(tmp_path):
    async def scenario():
        c = pooled_coordinator(tmp_path)
        c.store.touch_device("d", 1, None)
        rnd = c.store.start_round(c.job.id, 1, 0)
        (task,) = c.store.add_tasks(rnd.id, 0, c.strategy.configure(0, None, ["d"], lambda: ({}, {}),
                                                                    random.Random(0)))
        pool = [int(s) for s in seed_pool(int(task.hparams["seed_pool_key"], 16), task.hparams["seed_pool"])]
        outside = next(s for s in range(100) if s not in pool)
        update = protocol.Update(task_id=task.id, job_id=c.job.id, round=1, global_version=0, seeds=[pool[3], outside],
                                 coefs=[1e-3, 1e-3], scale=1.0, dense=b"", num_examples=10, loss_before=1.0,
                                 loss_after=1.0, peak_rss_bytes=1)
        c._hold(rnd)
        return await c._accept("d", update), c.store.task(task.id), c

    ack, task, c = asyncio.run(scenario())
    assert not ack.accepted and ack.reason.startswith("outside_pool: seed ") and task.abandoned_at is None
    assert [r.code for r in c.store.refusals(c.job.id)] == ["outside_pool"] and not c.store.updates(task.round_id)
