"""A dense part that covers one span of the adapter (hybrid's head): its length checked, placed there and
aggregated in the documented order, so that a version recomputed from the stored updates has the same bits."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from coordinator.__main__ import parse_args
from coordinator.admission import Limits
from coordinator.serve_args import job_hparams, job_options, round_blocks
from coordinator.server import Coordinator, JobConfig, job_from_bundle
from coordinator.store import open_store
from coordinator.strategies import AcceptedUpdate, SeedFedAvg
from fwdfed import methods, protocol
from fwdfed.bundle.layout import AdapterLayout
from fwdfed.errors import UserError
from fwdfed.update import SeedUpdate, weighted_sum

D, BODY = 16, 10  # the head: 2 classes x 2 features + 2 biases = 6 values at [10, 16)
HEAD = {"num_classes": 2, "feature_dim": 2, "head_start": BODY, "block_start": 0, "block_end": BODY}


class FakeManifest:
    base_model_hash = "h" * 64
    adapter_dim = D


def hybrid_coordinator(tmp_path, start: np.ndarray) -> Coordinator:
    store = open_store(tmp_path / "job.db")
    config = JobConfig(rounds=1, devices_per_round=2, min_devices=1, round_deadline_s=1, method="hybrid",
                       hparams={"lr": 1e-3, "eps": 1e-3, "local_steps": 2, "directions": 2, "kind": "rademacher",
                                "head_lr": 1e-2, **HEAD})
    job = store.create_job(job_from_bundle("job", "/bundle", FakeManifest, config), start)
    strategy = SeedFedAvg(method=methods.get("hybrid"), hparams=job.hparams, devices_per_round=2)
    return Coordinator(store, job, strategy, limits=Limits(require_credentials=False), blocks=[(0, BODY)])


def test_a_dense_part_of_the_heads_length_alone_is_accepted(tmp_path):
    c = hybrid_coordinator(tmp_path, np.zeros(D, np.float32))
    rnd = c.store.start_round(c.job.id, 1, 0, (0, BODY))
    c.store.touch_device("d", 1, None)
    (task,) = c.store.add_tasks(rnd.id, 0, {"d": dict(c.job.hparams, block_start=0, block_end=BODY)})
    c._hold(rnd)
    base = dict(task_id=task.id, job_id=c.job.id, round=1, global_version=0, seeds=[1, 2], coefs=[1e-3, -1e-3],
                scale=1.0, num_examples=10, loss_before=1.0, loss_after=0.9, peak_rss_bytes=1)

    async def scenario():
        for wrong in (D, 5, 7):  # the whole adapter, or not the head's 6 values: refused with the length it needs
            ack = await c._accept("d", protocol.Update(**base, dense=np.zeros(wrong, "<f4").tobytes()))
            assert not ack.accepted and ack.reason.startswith("wrong_dimension: ") and "has 6 float32" in ack.reason
        huge = np.full(6, 1e3, "<f4")  # the bound measures the change per value of the whole adapter
        assert (await c._accept("d", protocol.Update(**base, dense=huge.tobytes()))).reason.startswith("norm_bound: ")
        assert (await c._accept("d", protocol.Update(**base, dense=np.full(6, 0.5, "<f4").tobytes()))).accepted

    asyncio.run(scenario())


def test_the_round_adds_each_head_at_its_span_and_recomputes_to_the_same_bits(tmp_path):
    rng = np.random.default_rng(0)
    start = rng.standard_normal(D).astype(np.float32)
    c = hybrid_coordinator(tmp_path, start)
    rnd = c.store.start_round(c.job.id, 1, 0, (0, BODY))
    answers = {"a": ([(11, 2e-3), (12, -1e-3)], 30, rng.standard_normal(6).astype("<f4") * 1e-2),
               "b": ([(11, 1e-3), (13, 4e-3)], 10, rng.standard_normal(6).astype("<f4") * 1e-2)}
    for device_id in answers:
        c.store.touch_device(device_id, 1, None)
    for task in c.store.add_tasks(rnd.id, 0, {d: dict(c.job.hparams) for d in answers}):
        pairs, examples, head = answers[task.device_id]
        assert c.store.add_update(task, pairs, 1.0, examples, 1.0, 0.9, 1, head.tobytes())
    assert asyncio.run(c.run_round(rnd))
    published = np.frombuffer(c.store.latest_version(c.job.id).vector, "<f4")
    # By hand: the seeds restricted to the body, then D = sum of weight x head, at the head's span, in float64.
    seeds_only = weighted_sum(start, [(n / 40, SeedUpdate(p)) for p, n, _ in answers.values()], "rademacher",
                              (0, BODY))
    heads = sum(n / 40 * h.astype(np.float64) for _, n, h in answers.values())
    expected = seeds_only.copy()
    expected[BODY:] += heads
    assert np.array_equal(published, expected.astype(np.float32))
    assert np.array_equal(published[:BODY], seeds_only[:BODY].astype(np.float32))  # the heads touch nothing else
    # A restarted coordinator recomputes the version from the stored updates: the same bits.
    rows = c.store.updates(rnd.id)
    again = c.strategy.aggregate(start, [c._accepted(rnd, row) for row in rows], (0, BODY))
    assert np.array_equal(again, published)
    # A version with dense parts: its seed sums, marked as having a dense part (the downlink sends the head's span).
    sums = c.strategy.version_sums([c._accepted(rnd, row) for row in rows], (0, BODY))
    assert sums.dense_part and sums.seeds == [11, 12, 13] and sums.block == (0, BODY)


def test_a_stored_update_without_a_span_reads_as_it_was_sent():
    row = type("Row", (), dict(device_id="d", num_examples=1, pairs=b"\x90", scale=1.0,
                               dense=np.ones(6, "<f4").tobytes()))
    assert AcceptedUpdate.from_row(row).change.dense.shape == (6,)
    placed = AcceptedUpdate.from_row(row, (BODY, D), D).change.dense
    assert placed.shape == (D,) and not placed[:BODY].any() and (placed[BODY:] == 1).all()


def test_a_hybrid_jobs_hparams_carry_the_head_and_its_rounds_perturb_the_body_alone():
    layout = AdapterLayout.from_shapes([("lora_A.weight", (2, 5)), ("classifier.modules_to_save.default.weight", (2, 2)),
                                        ("classifier.modules_to_save.default.bias", (2,))])
    args = parse_args(["serve", "--db", "x.db", "--bundle", "b", "--method", "hybrid", "--head-lr", "0.2"])
    hparams = job_hparams(args, layout)
    assert {k: hparams[k] for k in (*HEAD, "head_lr")} == {**HEAD, "head_lr": 0.2}
    assert round_blocks(layout, job_options(args), hparams) == [(0, BODY)]


def test_a_hybrid_job_refuses_other_blocks_and_a_layout_without_a_head_at_its_end(capsys):
    with pytest.raises(SystemExit):
        parse_args(["serve", "--db", "x.db", "--bundle", "b", "--method", "hybrid", "--blocks", "2"])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: --method hybrid perturbs the adapter without its head, one block: not with --blocks or --perturb-only")
    args = parse_args(["serve", "--db", "x.db", "--bundle", "b", "--method", "hybrid"])
    head_first = AdapterLayout.from_shapes([("classifier.modules_to_save.default.weight", (2, 2)),
                                            ("classifier.modules_to_save.default.bias", (2,)), ("lora_A.weight", (2, 5))])
    with pytest.raises(UserError, match="--method hybrid: hybrid needs the classifier's weight then bias"):
        job_hparams(args, head_first)
