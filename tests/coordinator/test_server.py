"""The round machinery's decisions, in-process on a real SQLite store (connections are stand-ins:
the behaviour over real sockets is in tests/integration)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from websockets.datastructures import Headers
from websockets.http11 import Request

from coordinator.admission import Limits, bearer_token
from coordinator.job import JobOptions, resumed_options
from coordinator.server import Coordinator, JobConfig, job_from_bundle
from coordinator.store import open_store
from coordinator.strategies import AcceptedUpdate, SeedFedAvg
from fwdfed import protocol


class FakeManifest:
    base_model_hash = "h" * 64
    adapter_dim = 16


class SlowlyClosingConnection:
    """A connection whose close handshake does not finish (a peer that stopped reading)."""

    def __init__(self):
        self.sent, self.closing = [], asyncio.Event()

    async def send(self, frame: bytes) -> None:
        self.sent.append(protocol.decode(frame))

    async def close(self, code: int, reason: str) -> None:
        self.closing.set()
        await asyncio.sleep(3600)


def coordinator(tmp_path, devices_per_round: int = 1, deadline_s: float = 60, evaluate=None,
                limits: Limits | None = None, options: JobOptions = JobOptions()) -> Coordinator:
    store = open_store(tmp_path / "job.db")
    config = JobConfig(rounds=1, devices_per_round=devices_per_round, min_devices=1, round_deadline_s=deadline_s,
                       hparams={"lr": 1e-3, "eps": 1e-2, "local_steps": 2, "directions": 1, "kind": "rademacher"},
                       options=options)
    job = store.create_job(job_from_bundle("job", "/bundle", FakeManifest, config), np.zeros(16, np.float32))
    strategy = SeedFedAvg(hparams=job.hparams, options=options, devices_per_round=devices_per_round)
    return Coordinator(store, job, strategy, evaluate=evaluate, limits=limits or Limits(require_credentials=False))


def answered_round(c: Coordinator, pairs_by_device: dict[str, list]):
    """Round 1 with a task per device, each answered with its pairs (the devices then went away)."""
    rnd = c.store.start_round(c.job.id, 1, 0)
    for device_id in pairs_by_device:
        c.store.touch_device(device_id, 1, None)
    tasks = c.store.add_tasks(rnd.id, 0, {d: dict(c.job.hparams) for d in pairs_by_device})
    for task in tasks:
        assert c.store.add_update(task, pairs_by_device[task.device_id], 1.0, 10, 1.0, 0.9, 1)
    return rnd


def outcome(c: Coordinator):
    """The round's published adapter, and the refusals as (device, code)."""
    vector = np.frombuffer(c.store.latest_version(c.job.id).vector, "<f4")
    return vector, [(r.device_id, r.code) for r in c.store.refusals(c.job.id)]


UNBOUNDED = Limits(require_credentials=False, max_update_rms=None)  # what the protocol alone lets through


def test_an_update_that_makes_the_aggregate_non_finite_is_dropped_and_the_round_closes_without_it(tmp_path):
    c = coordinator(tmp_path, devices_per_round=2, deadline_s=1, limits=UNBOUNDED)
    rnd = answered_round(c, {"honest": [(1, 1e-3)], "huge": [(2, 1e39)]})  # 1e39 is finite, but not as float32
    assert asyncio.run(c.run_round(rnd))
    vector, refusals = outcome(c)
    expected = c.strategy.aggregate(np.zeros(16, np.float32), [AcceptedUpdate.of("honest", [(1, 1e-3)], 10)])
    assert np.array_equal(vector, expected) and refusals == [("huge", "non_finite_aggregate")]
    assert [u.device_id for u in c.store.updates(rnd.id)] == ["honest"]
    assert {t.device_id: t.forfeited for t in c.store.tasks(rnd.id)} == {"honest": None, "huge": "non_finite_aggregate"}


def test_an_update_with_which_the_held_out_loss_stops_being_finite_is_dropped(tmp_path):
    def evaluate(w):  # a model that overflows past some size of adapter, as a real one does
        return {"heldout_loss": 2.0 if np.abs(w).max() < 1e3 else float("nan")}

    c = coordinator(tmp_path, devices_per_round=2, deadline_s=1, evaluate=evaluate, limits=UNBOUNDED)
    c.store.add_metrics(c.job.id, 0, evaluate(np.zeros(16)))
    rnd = answered_round(c, {"honest": [(1, 1e-3)], "huge": [(2, 1e30)]})  # finite even as float32
    assert asyncio.run(c.run_round(rnd))
    vector, refusals = outcome(c)
    assert np.abs(vector).max() == np.float32(1e-3) and refusals == [("huge", "diverged")]
    assert [(m.version, m.value) for m in c.store.metrics(c.job.id) if m.name == "heldout_loss"] == [(0, 2.0), (1, 2.0)]


def test_a_held_out_metric_that_was_never_finite_is_recorded_as_refused_not_stored(tmp_path):
    c = coordinator(tmp_path, evaluate=lambda w: {"heldout_loss": float("nan")})
    c.store.add_metrics(c.job.id, 0, {"heldout_loss": float("nan")})  # the store leaves it out, without failing
    rnd = answered_round(c, {"d": [(1, 1e-3)]})
    assert asyncio.run(c.run_round(rnd))  # nothing to blame an update for: the start was not finite either
    assert [r.code for r in c.store.refusals(c.job.id)] == ["non_finite_metric"]
    assert "heldout_loss is nan" in c.store.refusals(c.job.id)[0].reason
    assert {m.name for m in c.store.metrics(c.job.id)} == {"train_loss_before", "train_loss_after", "waves"}


def test_the_default_bound_refuses_a_huge_coefficient_and_a_repeated_seed_counts_once(tmp_path):
    from coordinator.job import DEFAULT_MAX_UPDATE_RMS
    from coordinator.update_checks import update_rms

    c = coordinator(tmp_path, limits=Limits(require_credentials=False))
    hparams, method = dict(c.job.hparams, local_steps=4), c.method
    assert c.checks.poisoning([(7, 1e30)], 1.0, b"", hparams, method)[0] == "norm_bound"
    bound = DEFAULT_MAX_UPDATE_RMS
    # four times one seed is one direction four times as long: 4c, not sqrt(4) c, against the bound
    assert update_rms([(7, bound / 3)] * 4, None) == 4 * bound / 3
    assert c.checks.poisoning([(7, bound / 3)] * 4, 1.0, b"", hparams, method)[0] == "norm_bound"
    assert c.checks.poisoning([(7, bound / 3), (8, bound / 3), (9, bound / 3)], 1.0, b"", hparams, method) is None
    code, reason = c.checks.poisoning([], 0.5, b"", hparams, method)
    assert code == "bad_scale" and "[0.999999, 1.000001]" in reason  # the range it accepts, tolerance included


def test_a_device_being_refused_is_sent_no_task_while_its_connection_closes(tmp_path):
    """A device answered rate_limited (or any refusal) is gone at once: the round's task must not be
    handed to it in the seconds its close takes, where it would wait for --device-timeout."""
    async def scenario():
        c = coordinator(tmp_path)
        c.store.touch_device("flood", 1, None)
        ws = SlowlyClosingConnection()
        c.connections["flood"] = ws
        rnd = c.store.start_round(c.job.id, 1, 0)
        refusing = asyncio.create_task(c._refuse(ws, "rate_limited", "too many messages", "flood"))
        await asyncio.wait_for(ws.closing.wait(), 5)
        await c._dispatch(rnd)
        refusing.cancel()
        return c.store.tasks(rnd.id), [m.TYPE for m in ws.sent]

    tasks, sent = asyncio.run(scenario())
    assert tasks == [] and sent == ["error"]


def test_an_abandoned_task_goes_back_to_its_device_when_no_other_took_it_over(tmp_path):
    async def scenario():
        c = coordinator(tmp_path)
        c.store.touch_device("away", 1, None)
        rnd = c.store.start_round(c.job.id, 1, 0)
        (task,) = c.store.add_tasks(rnd.id, 0, {"away": dict(c.job.hparams)})
        c.store.abandon_task(task.id)  # it was away past --device-timeout, and no device was idle
        c._hold(rnd)  # the round as a restarted coordinator resumes it
        ws = SlowlyClosingConnection()
        c.connections["away"] = ws  # it is back
        await c._resend_open_task("away")
        return ws.sent, c.store.task(task.id)

    sent, task = asyncio.run(scenario())
    assert [m.TYPE for m in sent] == ["task"] and sent[0].task_id == task.id and task.abandoned_at is None


class SlowConnection:
    """A connection whose every send takes `SEND_S` (a large adapter down a slow link), each frame's start noted."""
    SEND_S = 0.2

    def __init__(self):
        self.starts: list[float] = []

    async def send(self, frame: bytes) -> None:
        self.starts.append(time.time())
        await asyncio.sleep(self.SEND_S)


def test_a_tasks_sent_at_is_its_send_not_the_moment_it_was_stored(tmp_path):
    """Tasks are stored in one transaction before the first is sent: each one's sent_at is still its own send,
    and a task resent after a reconnect is dated by the resend."""
    async def scenario():
        c = coordinator(tmp_path, devices_per_round=2)
        for device_id in ("a", "b"):
            c.store.touch_device(device_id, 1, None)
            c.connections[device_id] = SlowConnection()
        rnd = c.store.start_round(c.job.id, 1, 0)
        await c._dispatch(rnd)  # one device's frame, then the other's 0.2 s later
        dispatched = {t.device_id: t.sent_at for t in c.store.tasks(rnd.id)}
        c.connections["a"] = SlowConnection()  # a reconnects
        await c._resend_open_task("a")
        return c.connections, dispatched, {t.device_id: t.sent_at for t in c.store.tasks(rnd.id)}

    connections, dispatched, resent = asyncio.run(scenario())
    assert abs(dispatched["b"] - dispatched["a"]) >= SlowConnection.SEND_S  # stored together, sent 0.2 s apart
    assert dispatched["b"] <= connections["b"].starts[0]
    assert resent["b"] == dispatched["b"] and max(dispatched.values()) + SlowConnection.SEND_S <= resent["a"]
    assert resent["a"] <= connections["a"].starts[0]


def test_a_task_forfeited_for_breaking_the_protocol_is_not_given_back(tmp_path):
    """Unlike a task lost by being away: the device is back, no other is idle, and still it gets nothing."""
    async def scenario():
        c = coordinator(tmp_path)
        c.store.touch_device("rude", 1, None)
        rnd = c.store.start_round(c.job.id, 1, 0)
        (task,) = c.store.add_tasks(rnd.id, 0, {"rude": dict(c.job.hparams)})
        c._hold(rnd)
        c._forfeit("rude", "bad_message")
        ws = SlowlyClosingConnection()
        c.connections["rude"] = ws  # it reconnected at once
        await c._resend_open_task("rude")
        await c._dispatch(rnd)
        return ws.sent, c.store.task(task.id)

    sent, task = asyncio.run(scenario())
    assert sent == [] and task.abandoned_at is not None and task.forfeited == "bad_message"


def test_each_content_refusal_comes_with_its_code_and_the_device_keeps_its_task(tmp_path):
    """The code leading the ack's reason, nothing stored, the task still the device's: its corrected update counts."""
    c = coordinator(tmp_path, limits=Limits(require_credentials=False, max_update_rms=0.5))
    rnd = c.store.start_round(c.job.id, 1, 0)
    base = dict(job_id=c.job.id, round=1, global_version=0, seeds=[1, 2], coefs=[1e-3, -1e-3], scale=1.0, dense=b"",
                num_examples=10, loss_before=1.0, loss_after=0.9, peak_rss_bytes=1)
    poisoned = [  # the task allows local_steps 2 x directions 1 = 2 pairs; d = 16
        ("too_many_pairs", dict(seeds=[1, 2, 3], coefs=[1e-3] * 3)),
        ("bad_scale", dict(scale=0.0)),
        ("wrong_dimension", dict(dense=b"\0" * 12)),
        ("wrong_dimension", dict(dense=b"\0" * 3)),  # not whole float32 values: still a refusal, not a crash
        ("non_finite", dict(dense=b"\xff" * 64)),
        ("norm_bound", dict(coefs=[1.0, 1.0])),
    ]
    c.store.touch_device("d", 1, None)
    (task,) = c.store.add_tasks(rnd.id, 0, {"d": dict(c.job.hparams)})
    c._hold(rnd)

    async def scenario():
        for code, fields in poisoned:  # all on the one task
            ack = await c._accept("d", protocol.Update(task_id=task.id, **{**base, **fields}))
            assert not ack.accepted and ack.reason.startswith(f"{code}: "), (code, ack.reason)
            assert c.store.task(task.id).abandoned_at is None, code
        assert c.store.updates(rnd.id) == []
        assert (await c._accept("d", protocol.Update(task_id=task.id, **base))).accepted

    asyncio.run(scenario())


class RecordingConnection:
    def __init__(self):
        self.sent = []

    async def send(self, frame: bytes) -> None:
        self.sent.append(protocol.decode(frame))


def test_an_over_selected_round_takes_its_first_updates_and_the_others_are_late(tmp_path):
    """--over-select 0.5 of 4 devices a round: 6 tasked, the round closes on the first 4 updates. The fifth comes
    while the round evaluates (stopped collecting, not yet closed): it waits, and is late once the round closes, and
    not stored, as the sixth after it."""
    async def scenario():
        evaluating = asyncio.Event()

        def evaluate(w):
            evaluating.set()
            time.sleep(0.3)
            return {"heldout_loss": 1.0}

        c = coordinator(tmp_path, devices_per_round=4, evaluate=evaluate, options=JobOptions(over_select=0.5))
        names = [f"d{i}" for i in range(8)]
        for name in names:
            c.store.touch_device(name, 1, None)
            c.connections[name] = RecordingConnection()
        rnd = c.store.start_round(c.job.id, 1, 0)
        running = asyncio.create_task(c.run_round(rnd))
        while len(c.store.tasks(rnd.id)) < 6:
            await asyncio.sleep(0.01)
        tasks = c.store.tasks(rnd.id)
        acks = []
        for task in tasks[:4]:
            acks.append(await c._accept(task.device_id, ClientStandIn.update(task, c.job.id)))
            c.changed.set()
        await asyncio.wait_for(evaluating.wait(), 5)
        fifth = asyncio.create_task(c._accept(tasks[4].device_id, ClientStandIn.update(tasks[4], c.job.id)))
        closed = await running
        acks.append(await fifth)
        acks.append(await c._accept(tasks[5].device_id, ClientStandIn.update(tasks[5], c.job.id)))
        return c, rnd, tasks, acks, closed

    c, rnd, tasks, acks, closed = asyncio.run(scenario())
    assert closed and len(tasks) == 6 and len({t.device_id for t in tasks}) == 6
    assert [a.accepted for a in acks] == [True] * 4 + [False] * 2
    assert all(a.reason.startswith("late: ") for a in acks[4:])
    assert sorted(u.device_id for u in c.store.updates(rnd.id)) == sorted(t.device_id for t in tasks[:4])
    assert [(r.device_id, r.code) for r in c.store.refusals(c.job.id)] == [(t.device_id, "late") for t in tasks[4:]]


class ClientStandIn:
    @staticmethod
    def update(task, job_id: str) -> protocol.Update:
        return protocol.Update(task_id=task.id, job_id=job_id, round=1, global_version=0, seeds=[1, 2],
                               coefs=[1e-3, -1e-3], scale=1.0, dense=b"", num_examples=10, loss_before=1.0,
                               loss_after=0.9, peak_rss_bytes=1)


def test_with_min_available_a_round_tasks_nobody_until_that_many_are_connected_and_samples_the_same(tmp_path):
    """--min-available 5, 2 devices a round: with 4 of the 5 connected no task goes out; once the fifth connects,
    the round samples 2 of the 5. Devices that connected in another order give the same sample for the same seed."""
    async def scenario(folder, order):
        folder.mkdir()
        c = coordinator(folder, devices_per_round=2, options=JobOptions(min_available=5))
        rnd = c.store.start_round(c.job.id, 1, 0)
        running = asyncio.create_task(c.run_round(rnd))
        for name in order[:4]:
            c.store.touch_device(name, 1, None)
            c.connections[name] = RecordingConnection()
            c.changed.set()
        await asyncio.sleep(0.5)
        waiting = len(c.store.tasks(rnd.id))
        c.store.touch_device(order[4], 1, None)
        c.connections[order[4]] = RecordingConnection()
        c.changed.set()
        while len(c.store.tasks(rnd.id)) < 2:
            await asyncio.sleep(0.01)
        running.cancel()
        return waiting, sorted(t.device_id for t in c.store.tasks(rnd.id))

    names = [f"d{i}" for i in range(5)]
    waiting, sample = asyncio.run(scenario(tmp_path / "a", names))
    assert waiting == 0 and len(sample) == 2
    assert asyncio.run(scenario(tmp_path / "b", names[::-1]))[1] == sample


def test_min_available_below_the_devices_per_round_is_one_clear_error(capsys):
    from coordinator.__main__ import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["serve", "--db", "x.db", "--bundle", "b", "--devices-per-round", "4", "--min-available", "3"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: --min-available must be at least --devices-per-round")


def test_a_bad_over_selection_is_one_clear_error(capsys):
    from coordinator.__main__ import parse_args

    for value in ("-0.1", "nan", "inf"):
        with pytest.raises(SystemExit) as e:
            parse_args(["serve", "--db", "x.db", "--bundle", "b", "--over-select", value])
        assert e.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
            "error: --over-select must be a number >= 0 (0.3: task 30% more devices than the round takes)")


def test_the_bearer_scheme_is_read_in_any_case():
    def request(value):
        return Request("/", Headers({"Authorization": value}))

    assert bearer_token(request("Bearer abc")) == "abc"
    assert bearer_token(request("bearer abc")) == "abc"
    assert bearer_token(request("BEARER  abc ")) == "abc"
    assert bearer_token(request("Basic abc")) is None
    assert bearer_token(request("Bearer ")) is None


def test_a_resumed_job_keeps_its_stored_options_and_fills_only_what_an_older_job_lacks():
    stored = JobOptions(server_lr=0.5, clip=0.1).to_json()
    options, warnings = resumed_options(stored, {"server_lr": 2.0, "clip": None})
    assert options.server_lr == 0.5 and options.clip == 0.1
    assert warnings == ["ignoring --server-lr 2: job was created with 0.5"]
    older = {k: v for k, v in stored.items() if k not in ("server_lr", "clip")}
    options, warnings = resumed_options(older, {"server_lr": 2.0, "clip": None})
    assert options.server_lr == 2.0 and options.clip is None and warnings == []


def test_a_stored_job_whose_latest_adapter_is_not_finite_or_damaged_is_refused_with_what_is_wrong(tmp_path):
    from coordinator.server import resume_problem
    from coordinator.store import AdapterVersion
    from coordinator.store.queries import sha256

    c = coordinator(tmp_path)
    assert resume_problem(c.store, c.job) is None
    for vector, expected in ((np.full(16, np.inf, np.float32).tobytes(), "holds non-finite values"),
                             (b"\0" * 12, "is damaged")):
        with c.store.session() as s, s.begin():  # as an older coordinator, or a damaged file, left it
            s.merge(AdapterVersion(job_id=c.job.id, version=1, vector=vector, sha256=sha256(vector)))
        assert expected in resume_problem(c.store, c.job)
