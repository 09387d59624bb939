"""The coordinator: an asyncio websockets server that runs a job's rounds.

A round: sample connected devices, persist and send each a task (the global adapter and the
hyperparameters), accept updates until every tasked device answered or the round's deadline
passed, aggregate through the Strategy, store the new global version, evaluate it, go on.
Every step is written to the store first, so a restarted coordinator resumes the open round
with the updates it had already accepted: devices that reconnect get their task again.

The rooms: who may connect (coordinator.admission), what an update may hold
(coordinator.update_checks), the seed-form downlink (coordinator.downlink), the rounds
(coordinator.rounds) and the rule they aggregate by (coordinator.strategies). This module holds
the connections: a device's session from its hello to its last frame, and what it may send.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import ssl
import time
from dataclasses import dataclass, field

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from coordinator.admission import Admission, Limits, RateLimiter
from coordinator.downlink import Downlink
from coordinator.job import JobOptions
from coordinator.rounds import RoundEngine
from coordinator.store import Job, Round, Store
from coordinator.strategies import Strategy
from coordinator.traffic import CountingConnection, Traffic
from coordinator.update_checks import UpdateChecks
from fwdfed import methods, protocol
from fwdfed.directions import task_kind

log = logging.getLogger("coordinator")

HELLO_TIMEOUT_S = 10.0
REVOCATION_CHECK_S = 1.0  # how soon a revoked credential cuts its device off


def max_frame_bytes(job: Job, dense_values: int | None = None) -> int:
    """The largest frame a device needs to send for this job: an update with a dense part (the adapter's
    size, or `dense_values` when a round's method sends more), or with every pair it may send
    (msgpack: at most 9 bytes a seed, 9 a coefficient)."""
    dense = max(job.adapter_dim, dense_values or 0)
    return 4 * dense + 18 * methods.get(job.method).allowed_pairs(job.hparams) + 64 * 1024


@dataclass
class JobConfig:
    rounds: int
    devices_per_round: int
    min_devices: int
    round_deadline_s: float
    hparams: dict
    method: str = "mezo"
    options: JobOptions = field(default_factory=JobOptions)


class Refused(Exception):
    """A connection refused with a code and reason (sent to the device, stored, logged)."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


REVOKED = "this device's credential was revoked, or replaced by enrolling the device again"
# Refusals that cost a device its open task: it broke the protocol or lost its right to take part.
FORFEITING = {"bad_message", "rate_limited", "wrong_device", "wrong_model", "revoked", "timeout", "internal_error"}


class Coordinator(RoundEngine):
    def __init__(self, store: Store, job: Job, strategy: Strategy, evaluate=None, seed: int = 0,
                 max_attempts: int = 3, blocks: list[tuple[int, int]] | None = None, device_timeout_s: float = 30.0,
                 limits: Limits | None = None, layout=None):
        self.store, self.job, self.strategy, self.evaluate = store, job, strategy, evaluate
        self.limits = limits or Limits()
        self.rate = RateLimiter(self.limits.messages_per_s, self.limits.burst)
        self.blocks = blocks  # block-cyclic: round r perturbs blocks[(r - 1) % len(blocks)]
        self.kind = task_kind(job.hparams)
        self.method = methods.get(job.method)
        self.options = JobOptions.from_json(job.options)
        self.layout = layout  # the bundle's adapter layout: a method that writes the adapter itself needs it
        self.max_attempts = max_attempts
        self.connections: dict[str, ServerConnection] = {}
        self.changed = asyncio.Event()  # a device came or went, or an update arrived
        self.rng = random.Random(seed)
        self.device_timeout_s = device_timeout_s  # a tasked device away this long loses its task
        self.gone_since: dict[str, float] = {}
        self.credential_of: dict[str, str] = {}  # connected device -> the token_hash of the credential it used
        self.finished = asyncio.Event()
        self.traffic = Traffic(store)  # bytes up and down per device, for the dashboard
        self.admission = Admission(store, job.id, self.limits)
        self.checks = UpdateChecks(job.adapter_dim, self.limits.max_update_rms)
        # The downlink in seed form: the (version, sha256) each connected device that keeps its adapter holds
        # (from its hello, then every task sent to it).
        self.held: dict[str, tuple[int, str]] = {}
        self.downlink = Downlink(store, job, self.held, self.round_strategy)
        self._scheduled: dict[int, Strategy] = {}  # the rounds a method schedules (RoundEngine.round_strategy)
        self.sealed: int | None = None  # the open round attempt that has stopped collecting (RoundEngine.run_round)
        self._scales: dict[int, tuple | None] = {}  # the open round attempt's per-tensor scales (_round_scales)
        self.task_frames: dict[int, list[tuple[int, bool]]] = {}  # per round attempt: each task's bytes, in seed form

    # ---- connections ----
    async def _receive(self, ws: ServerConnection, device_id: str | None, timeout: float | None = None) -> protocol.Message:
        """The next message, or ProtocolError; a device past its message rate is refused."""
        frame = await (asyncio.wait_for(ws.recv(), timeout) if timeout else ws.recv())
        if device_id is not None and not self.rate.allow(device_id):
            raise Refused("rate_limited",
                          f"more than {self.limits.burst} messages at once or {self.limits.messages_per_s:g} per second")
        return protocol.decode(frame)

    async def handle(self, ws: ServerConnection) -> None:
        device_id = None
        enrolled = getattr(ws, "username", None)  # set by Admission.check when credentials are required
        try:
            try:
                # The hello counts against the credential's rate (reconnecting is no way around it);
                # without credentials, the one frame read before the hello names nobody to limit.
                hello = await self._receive(ws, enrolled, HELLO_TIMEOUT_S)
            except TimeoutError:
                raise Refused("timeout", f"no hello within {HELLO_TIMEOUT_S:g} s") from None
            device_id = self._admit(hello, enrolled)
            self.store.touch_device(device_id, hello.num_examples, hello.mem_budget_bytes)
            self.connections[device_id] = ws
            self.held.pop(device_id, None)
            if hello.held_sha256 is not None:  # it keeps its adapter: its tasks may carry a history instead
                self.held[device_id] = (hello.held_version, hello.held_sha256)
            if enrolled is not None:
                self.credential_of[device_id] = ws.token_hash
            self.gone_since.pop(device_id, None)
            log.info("device %s connected (%d examples)", device_id, hello.num_examples)
            await ws.send(protocol.Welcome(job_id=self.job.id, device_id=device_id).to_wire())
            if self.finished.is_set():
                await ws.send(protocol.Done(job_id=self.job.id, reason="job finished").to_wire())
                return
            await self._resend_open_task(device_id)
            self.changed.set()
            while True:
                message = await self._receive(ws, device_id)
                if isinstance(message, protocol.Update):
                    await ws.send(self._accept(device_id, message).to_wire())
                elif isinstance(message, protocol.Decline):
                    await ws.send(self._decline(device_id, message).to_wire())
                else:
                    raise Refused("bad_message", f"devices may send only updates and declines after hello, "
                                                 f"not {message.TYPE}")
        except protocol.ProtocolError as e:
            await self._refuse(ws, "bad_message", str(e), device_id or enrolled)
        except Refused as e:
            await self._refuse(ws, e.code, e.reason, device_id or enrolled)
        except ConnectionClosed:
            pass
        except Exception:  # a bug: logged with its traceback, and the connection still gets an answer
            log.exception("connection handler failed")
            await self._refuse(ws, "internal_error", "the coordinator failed on this message", device_id)
        finally:
            if device_id is not None:
                self._drop(device_id, ws)

    def _drop(self, device_id: str, ws: ServerConnection) -> None:
        """Forget a device's connection (once): it is away from now on."""
        if self.connections.get(device_id) is not ws:
            return
        self.traffic.settle(device_id, ws)
        del self.connections[device_id]
        self.credential_of.pop(device_id, None)
        self.held.pop(device_id, None)
        self.gone_since[device_id] = time.time()
        self.store.set_device_status(device_id, "gone")
        log.info("device %s disconnected", device_id)
        self.changed.set()

    def _admit(self, hello: protocol.Message, enrolled: str | None) -> str:
        """The device id a first message enrols, or Refused."""
        if not isinstance(hello, protocol.Hello):
            raise Refused("bad_message", f"the first message must be hello, not {hello.TYPE}")
        if enrolled is not None and hello.device_id != enrolled:
            raise Refused("wrong_device", f"the credential is {enrolled}'s, the hello says {hello.device_id}")
        if hello.base_model_hash != self.job.base_model_hash or hello.adapter_dim != self.job.adapter_dim:
            raise Refused("wrong_model", f"this job trains base model {self.job.base_model_hash[:12]} with adapter dim "
                                         f"{self.job.adapter_dim}; the device holds {hello.base_model_hash[:12]} "
                                         f"with dim {hello.adapter_dim}")
        if hello.device_id in self.connections:
            raise Refused("duplicate_device", f"device {hello.device_id} is already connected")
        return hello.device_id

    async def _refuse(self, ws: ServerConnection, code: str, message: str, device_id: str | None = None) -> None:
        self.store.add_refusal(self.job.id, device_id, code, message)
        if device_id is not None:
            # Gone from now on, not once the close completes (which a flooding peer can stretch to
            # close_timeout): no task may be sent to a connection that is being closed.
            self._drop(device_id, ws)
            if code in FORFEITING:
                self._forfeit(device_id, code)
        log.warning("refused a connection (%s): %s", code, message)
        try:
            await ws.send(protocol.Error(code=code, message=message[: protocol.MAX_TEXT]).to_wire())
            await ws.close(1008, code)
        except ConnectionClosed:
            pass
        if code == "rate_limited" and device_id is not None:
            # Closing a flooding peer can take close_timeout: its bucket refills from the end of the close,
            # else reconnecting at once would find it refilled by that wait.
            self.rate.empty(device_id)

    def _forfeit(self, device_id: str, code: str) -> None:
        """A device that broke the protocol loses its open task at once, and for good: otherwise, by
        reconnecting and misbehaving again, it could hold the round's task without ever being away long
        enough, or get it back when it reconnects while no other device is idle."""
        rnd, tasks = self._unanswered_tasks(device_id)
        for task in tasks:
            self.store.forfeit_task(task.id, code)
            log.warning("round %d: %s forfeited task %s (%s), reassigning", rnd.number, device_id, task.id, code)
            self.changed.set()

    def _unanswered_tasks(self, device_id: str) -> tuple[Round | None, list]:
        """The open round, and the device's tasks in it that are neither answered nor abandoned."""
        rnd = self.store.open_round(self.job.id)
        if rnd is None:
            return None, []
        answered = self.store.answered(rnd.id)
        return rnd, [t for t in self.store.tasks(rnd.id, device_id) if t.abandoned_at is None and t.id not in answered]

    async def cut_off_revoked(self) -> None:
        """Close the connection of every device whose credential was revoked (by `coordinator revoke`)."""
        while self.limits.require_credentials:
            await asyncio.sleep(REVOCATION_CHECK_S)
            held = {d: self.credential_of[d] for d in self.connections if d in self.credential_of}
            if not held:
                continue
            for device_id in self.store.superseded(held):
                ws = self.connections.get(device_id)
                if ws is not None:
                    log.warning("device %s: credential revoked or replaced, disconnecting", device_id)
                    await self._refuse(ws, "revoked", REVOKED, device_id)

    # ---- updates ----
    def _accept(self, device_id: str, update: protocol.Update) -> protocol.Ack:
        task = self.store.task(update.task_id)
        refusal = self._refusal(device_id, update, task)
        if refusal is None:
            pairs = list(zip(update.seeds, update.coefs))
            if not self.store.add_update(task, pairs, update.scale, update.num_examples, update.loss_before,
                                         update.loss_after, update.peak_rss_bytes, update.dense):
                refusal = ("duplicate", "this task already has an accepted update")
        if refusal is not None:
            code, reason = refusal
            self.store.add_refusal(self.job.id, device_id, code, reason)
            log.warning("refused update %s from %s (%s): %s", update.task_id, device_id, code, reason)
            # The code leads the reason (docs/protocol.md): a device can act on it without parsing words.
            return protocol.Ack(task_id=update.task_id, accepted=False, reason=f"{code}: {reason}"[: protocol.MAX_TEXT])
        log.info("accepted update %s from %s: %d pairs, %d examples, loss %.4f -> %.4f, peak RSS %.0f MB",
                 update.task_id, device_id, len(update.seeds), update.num_examples, update.loss_before,
                 update.loss_after, update.peak_rss_bytes / 2**20)
        self.changed.set()
        return protocol.Ack(task_id=update.task_id, accepted=True, reason="")

    def _decline(self, device_id: str, decline: protocol.Decline) -> protocol.Ack:
        """A device that cannot run its task gives it back: forfeited, it goes to another device at once
        (never back to this one in the round's wave). Acked as accepted, or refused with the code that
        an update for that task would get (unknown_task, foreign, late, abandoned, duplicate)."""
        task = self.store.task(decline.task_id)
        rnd = self.store.open_round(self.job.id)
        if task is None:
            refusal = ("unknown_task", "unknown task")
        elif task.device_id != device_id:
            refusal = ("foreign", "this task was sent to another device")
        elif rnd is None or rnd.id != task.round_id or rnd.id == self.sealed:
            refusal = ("late", "the task's round is closed")
        elif task.abandoned_at is not None:
            refusal = ("abandoned", "the task was already taken from this device")
        elif task.id in self.store.answered(rnd.id):
            refusal = ("duplicate", "this task already has an accepted update")
        else:
            self.store.forfeit_task(task.id, "declined")
            self.store.add_refusal(self.job.id, device_id, "declined", f"{decline.code}: {decline.reason}")
            log.warning("round %d: %s declined task %s (%s: %s), reassigning", rnd.number, device_id, task.id,
                        decline.code, decline.reason)
            self.changed.set()
            return protocol.Ack(task_id=task.id, accepted=True, reason="")
        log.warning("refused the decline of %s from %s (%s)", decline.task_id, device_id, refusal[0])
        return protocol.Ack(task_id=decline.task_id, accepted=False, reason=f"{refusal[0]}: {refusal[1]}")

    def _refusal(self, device_id: str, update: protocol.Update, task) -> tuple[str, str] | None:
        """(code, reason) when the update must not be aggregated; None when it may."""
        if update.job_id != self.job.id:
            return "other_job", f"update for job {update.job_id}, this coordinator runs {self.job.id}"
        held = {device_id: self.credential_of.get(device_id, "")}
        if self.limits.require_credentials and self.store.superseded(held):
            return "revoked", REVOKED
        if task is None:
            return "unknown_task", "unknown task"
        if task.device_id != device_id:
            return "foreign", "this task was sent to another device"
        rnd = self.store.open_round(self.job.id)
        if rnd is None or rnd.id != task.round_id or rnd.id == self.sealed:
            return "late", "the task's round is closed"
        if task.abandoned_at is not None:
            return "abandoned", "the device was away and its task went to another device"
        if update.global_version != rnd.base_version or update.round != rnd.number:
            return "wrong_version", (f"the update starts from round {update.round} version {update.global_version}, "
                                     f"the task was round {rnd.number} version {rnd.base_version}")
        return self.checks.poisoning(list(zip(update.seeds, update.coefs)), update.scale, update.dense, task.hparams,
                                     self.round_method(rnd.number))


async def serve_job(coordinator: Coordinator, host: str, port: int, ready=None, heartbeat_s: float = 10.0,
                    tls: ssl.SSLContext | None = None) -> bool:
    """Serve until the job ends. `ready(url)` is called once the socket listens. A device that
    does not answer a ping within `heartbeat_s` is disconnected (and then counts as away).
    Frames larger than the job needs are refused from their header, before they are read."""
    job = coordinator.job
    # max_queue: a device waits for each ack, so a few unread frames are all an honest one has;
    # the cap bounds what a flooding one makes the server hold. Reading pauses while the queue is
    # full, so closing such a connection cannot finish its handshake: close_timeout bounds that wait.
    # compression=None: no permessage-deflate, so a frame's size is its header's and the cap is checked
    # there, before the body is read (a compressed frame would have to be inflated to be measured).
    async with serve(coordinator.handle, host, port, ssl=tls, process_request=coordinator.admission.check,
                     compression=None,
                     max_size=max_frame_bytes(job, coordinator.scheduled_dense_values()), max_queue=4, close_timeout=2,
                     ping_interval=heartbeat_s, ping_timeout=heartbeat_s,
                     create_connection=CountingConnection) as server:
        bound = server.sockets[0].getsockname()[1]
        url = f"{'wss' if tls else 'ws'}://{host}:{bound}"
        log.info("listening on %s", url)
        if ready:
            ready(url)
        sweeper = asyncio.create_task(coordinator.cut_off_revoked())
        counter = asyncio.create_task(coordinator.traffic.run(coordinator.connections))
        try:
            ok = await coordinator.run_job()
        finally:
            sweeper.cancel()
        await asyncio.sleep(0.2)  # let the Done frames reach the devices before closing
        counter.cancel()
        coordinator.traffic.flush(coordinator.connections)
        return ok


def resume_problem(store: Store, job: Job) -> str | None:
    """Why a stored job cannot go on, in words for the operator, or None: its latest adapter is what
    every next task carries, so one that is damaged or not finite (stored before the coordinator
    checked aggregates) would only make every device refuse its tasks."""
    latest = store.latest_version(job.id)
    if latest is None:
        return f"job {job.id} has no adapter version (the database is damaged); start a new job with --job-id"
    if len(latest.vector) != 4 * job.adapter_dim or hashlib.sha256(latest.vector).hexdigest() != latest.sha256:
        return (f"job {job.id}: adapter version {latest.version} is damaged ({len(latest.vector)} bytes for "
                f"{job.adapter_dim} float32 values, or not matching its sha256); start a new job with --job-id")
    if not np.isfinite(np.frombuffer(latest.vector, "<f4")).all():
        return (f"job {job.id}: adapter version {latest.version} holds non-finite values, which no device trains "
                f"from; start a new job with --job-id (export-adapter --version {latest.version - 1} keeps the "
                "last version before it)")
    return None


def job_from_bundle(job_id: str, bundle_path: str, manifest, config: JobConfig) -> Job:
    return Job(id=job_id, bundle=bundle_path, base_model_hash=manifest.base_model_hash, adapter_dim=manifest.adapter_dim,
               method=config.method, hparams=config.hparams, options=config.options.to_json(), rounds=config.rounds,
               devices_per_round=config.devices_per_round, min_devices=config.min_devices,
               round_deadline_s=config.round_deadline_s)

