"""The coordinator: an asyncio websockets server that runs a job's rounds.

A round: sample connected devices, persist and send each a task (the global adapter and the
hyperparameters), accept updates until every tasked device answered or the round's deadline
passed, aggregate through the Strategy, store the new global version, evaluate it, go on.
Every step is written to the store first, so a restarted coordinator resumes the open round
with the updates it had already accepted: devices that reconnect get their task again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import ssl
import time
from dataclasses import dataclass, field, replace
from http import HTTPStatus

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from coordinator.job import DEFAULT_MAX_UPDATE_RMS, JobOptions, round_method_name
from coordinator.store import Job, Round, Store
from coordinator.store.queries import token_hash
from coordinator.strategies import AcceptedUpdate, Strategy, device_deltas
from coordinator.traffic import CountingConnection, Traffic
from fwdfed import handshake, methods, protocol
from fwdfed.methods.estimate import parse_seed_pool
from fwdfed.update import SeedSums, replay

log = logging.getLogger("coordinator")

HELLO_TIMEOUT_S = 10.0
COLLECT_BATCH_S = 0.05
REVOCATION_CHECK_S = 1.0  # how soon a revoked credential cuts its device off
MAX_NONCES = 100_000  # challenges outstanding at once; past it the oldest is forgotten (its device asks again)


def update_rms(pairs: list[tuple[int, float]], dense: np.ndarray | None) -> float:
    """About the RMS per value by which an update changes the adapter, for the bound: a direction has
    unit RMS per value (Rademacher: exactly), so the seed form's is the norm of its coefficients,
    those of a repeated seed summed first (one direction); a dense change's is its own RMS."""
    by_seed: dict[int, float] = {}
    for seed, coef in pairs:
        by_seed[seed] = by_seed.get(seed, 0.0) + coef
    # math.hypot scales internally: coefficients near the float64 limit give their norm, not infinity.
    seed_rms = math.hypot(*by_seed.values()) if by_seed else 0.0
    dense_rms = 0.0 if dense is None else float(np.sqrt(np.mean(dense.astype(np.float64) ** 2)))
    return math.hypot(seed_rms, dense_rms)


@dataclass
class Limits:
    """What the fleet and each device may send. Past a limit, the connection or update is refused
    with a reason (and the refusal stored); nothing past a limit is read into memory or aggregated."""
    require_credentials: bool = True
    allow_bearer: bool = False  # accept `Authorization: Bearer` tokens too (serve --allow-bearer, for one release)
    max_connections: int = 10_000
    messages_per_s: float = 5.0  # per device, sustained; an honest device sends one update per task
    burst: int = 20
    max_update_rms: float | None = DEFAULT_MAX_UPDATE_RMS  # bound on an update's RMS change per adapter value


@dataclass
class RateLimiter:
    """A token bucket per device, kept across reconnections so that reconnecting does not refill it."""
    rate: float
    burst: int
    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # device -> (tokens, at)

    def empty(self, key: str) -> None:
        """No tokens left from now: the bucket refills from this moment."""
        self.buckets[key] = (0.0, time.monotonic())

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        if len(self.buckets) > 100_000:  # forget buckets refilled since: they would start full anyway
            full_after = self.burst / self.rate
            self.buckets = {k: v for k, v in self.buckets.items() if now - v[1] < full_after}
        tokens, at = self.buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        self.buckets[key] = (tokens - 1.0, now) if tokens >= 1.0 else (tokens, now)
        return tokens >= 1.0


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; the scheme in any case (RFC 9110)."""
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


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
SCALE_TOLERANCE = 1e-6  # an update's scale may pass its method's range by this much (float rounding)
# Refusals that cost a device its open task: it broke the protocol or lost its right to take part.
FORFEITING = {"bad_message", "rate_limited", "wrong_device", "wrong_model", "revoked", "timeout", "internal_error"}


class Coordinator:
    def __init__(self, store: Store, job: Job, strategy: Strategy, evaluate=None, seed: int = 0,
                 max_attempts: int = 3, blocks: list[tuple[int, int]] | None = None, device_timeout_s: float = 30.0,
                 limits: Limits | None = None, layout=None):
        self.store, self.job, self.strategy, self.evaluate = store, job, strategy, evaluate
        self.limits = limits or Limits()
        self.rate = RateLimiter(self.limits.messages_per_s, self.limits.burst)
        self.blocks = blocks  # block-cyclic: round r perturbs blocks[(r - 1) % len(blocks)]
        self.kind = str(job.hparams.get("kind", "rademacher"))
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
        self.nonces: dict[str, float] = {}  # challenges issued and not yet answered -> when (monotonic), oldest first
        self.finished = asyncio.Event()
        self.traffic = Traffic(store)  # bytes up and down per device, for the dashboard
        self._pools: dict[tuple, frozenset[int]] = {}  # a task's seed pool, by (size, key)
        # The downlink in seed form: the (version, sha256) each connected device that keeps its adapter holds
        # (from its hello, then every task sent to it), and each version's seed sums (None: it goes down dense).
        self.held: dict[str, tuple[int, str]] = {}
        self._sums: dict[int, SeedSums | None] = {}
        self.task_frames: dict[int, list[tuple[int, bool]]] = {}  # per round attempt: each task's bytes, in seed form

    def round_method(self, number: int) -> methods.Method:
        """The method of round `number` (`round_method_name`)."""
        name = round_method_name(self.method.name, self.options, number)
        return self.method if name == self.method.name else methods.get(name)

    def scheduled_dense_values(self) -> int | None:
        """The longest dense part a scheduled round's method sends (the class statistics), if any."""
        hparams = self.round_hparams(1)
        method = self.round_method(1)
        return method.dense_length(hparams) if hparams is not None and method.dense_length else None

    def round_hparams(self, number: int) -> dict | None:
        """A scheduled method's task hyperparameters (None: the strategy configures the job's)."""
        if self.round_method(number) is self.method:
            return None
        from fwdfed.methods.class_stats import round_hparams

        hparams = round_hparams(self.layout, self.options.lda_shrinkage)
        if self.method.needs_teacher:  # the head round counts examples by the teacher's targets too
            hparams |= {k: self.job.hparams[k] for k in ("teacher_sha256", "kd_weight", "kd_temperature")
                        if k in self.job.hparams}
        return hparams

    # ---- connections ----
    def check_handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        """Before the websocket opens: refuse when the fleet is full or the credential is not valid,
        so that nothing from an unknown sender is ever read as a message."""
        if len(connection.server.connections) >= self.limits.max_connections:
            return self._refuse_handshake(connection, HTTPStatus.SERVICE_UNAVAILABLE, "too_many_connections",
                                          f"the coordinator holds its limit of {self.limits.max_connections} connections")
        if not self.limits.require_credentials:
            return None
        header = request.headers.get("Authorization")
        if header is None:  # the first request of every connection: it gets the nonce to sign
            return self._challenge(connection, HTTPStatus.UNAUTHORIZED, "challenge",
                                   f"sign this challenge: 'Authorization: {handshake.SCHEME} <device>.<nonce>.<time>."
                                   "<signature>' (docs/protocol.md)")
        scheme, credentials = handshake.scheme_of(header)
        if scheme == handshake.SCHEME.lower():
            return self._check_answer(connection, credentials)
        if scheme == "bearer":
            return self._check_bearer(connection, request)
        return self._refuse_handshake(connection, HTTPStatus.FORBIDDEN, "bad_credential",
                                      f"unknown credential scheme {header.partition(' ')[0][:32]!r}: answer the "
                                      f"challenge with 'Authorization: {handshake.SCHEME} ...'")

    def _challenge(self, connection: ServerConnection, status: HTTPStatus, code: str, reason: str) -> Response:
        """A 401 (or 403) carrying a fresh nonce in `WWW-Authenticate`, remembered for NONCE_TTL_S and one answer."""
        now = time.monotonic()
        while self.nonces and (len(self.nonces) >= MAX_NONCES or
                               now - next(iter(self.nonces.values())) > handshake.NONCE_TTL_S):
            del self.nonces[next(iter(self.nonces))]  # the oldest: expired, or evicted by a flood of requests
        nonce = handshake.new_nonce()
        self.nonces[nonce] = now
        if code == "challenge":  # every connection's first step: not a refusal, nothing stored
            response = connection.respond(status, f"{code}: {reason}\n")
        else:
            response = self._refuse_handshake(connection, status, code, reason)
        response.headers["WWW-Authenticate"] = handshake.challenge_header(nonce)
        return response

    def _check_answer(self, connection: ServerConnection, credentials: str) -> Response | None:
        """The device's signature of a nonce this coordinator issued, checked with its enrolled public key."""
        try:
            answer = handshake.Answer(credentials)
        except handshake.HandshakeError as e:
            return self._refuse_handshake(connection, HTTPStatus.FORBIDDEN, "bad_credential", f"malformed answer: {e}")
        issued = self.nonces.pop(answer.nonce, None)  # used once, whatever the outcome
        if issued is None or time.monotonic() - issued > handshake.NONCE_TTL_S:
            return self._challenge(connection, HTTPStatus.UNAUTHORIZED, "stale_challenge",
                                   f"the nonce was not issued by this coordinator, was answered already or is older "
                                   f"than {handshake.NONCE_TTL_S:g} s: sign the new challenge")
        device_id = answer.device_id
        if not 0 < len(device_id) <= protocol.MAX_ID:
            return self._refuse_handshake(connection, HTTPStatus.FORBIDDEN, "bad_credential",
                                          f"a device id has 1 to {protocol.MAX_ID} characters")
        skew = answer.time - time.time()
        if abs(skew) > handshake.MAX_CLOCK_SKEW_S:
            return self._refuse_handshake(connection, HTTPStatus.FORBIDDEN, "bad_credential",
                                          f"the answer's time is {skew:+.0f} s from the coordinator's clock (at most "
                                          f"{handshake.MAX_CLOCK_SKEW_S} s either way): set the device's clock")
        credential = self.store.device_key(device_id)
        if credential is None:
            return self._refuse_handshake(connection, HTTPStatus.FORBIDDEN, "bad_credential",
                                          f"device {device_id[:64]} is not enrolled or its credential was revoked")
        public_key, digest = credential
        if public_key is None:
            return self._refuse_handshake(connection, HTTPStatus.FORBIDDEN, "bad_credential",
                                          f"device {device_id[:64]} is enrolled with a bearer token, not a key: "
                                          "enrol it again (python -m coordinator enrol)")
        if not answer.verifies(handshake.public_key_from_hex(public_key)):
            return self._refuse_handshake(connection, HTTPStatus.FORBIDDEN, "bad_credential",
                                          f"the signature does not verify with device {device_id[:64]}'s enrolled key")
        connection.username = device_id  # where websockets' own auth helpers keep who is connected
        connection.token_hash = digest  # which of the device's credentials: re-enrolling replaces it
        return None

    def _check_bearer(self, connection: ServerConnection, request: Request) -> Response | None:
        """A bearer token (before challenge-response): only with `serve --allow-bearer`."""
        if not self.limits.allow_bearer:
            return self._refuse_handshake(connection, HTTPStatus.FORBIDDEN, "bearer_refused",
                                          "bearer tokens are refused: answer the challenge with the device's key "
                                          "(docs/protocol.md; python -m coordinator enrol), or serve --allow-bearer")
        token = bearer_token(request)
        if token is None:
            return self._refuse_handshake(connection, HTTPStatus.UNAUTHORIZED, "no_credential",
                                          "no token after 'Bearer'")
        device_id = self.store.authenticate(token[:256])
        if device_id is None:
            return self._refuse_handshake(connection, HTTPStatus.FORBIDDEN, "bad_credential",
                                          "the credential is not valid or was revoked")
        connection.username = device_id
        connection.token_hash = token_hash(token[:256])
        return None

    def _refuse_handshake(self, connection: ServerConnection, status: HTTPStatus, code: str, reason: str) -> Response:
        self.store.add_refusal(self.job.id, None, code, reason)
        log.warning("refused a handshake from %s (%s): %s", connection.remote_address, code, reason)
        return connection.respond(status, f"{code}: {reason}\n")

    async def _receive(self, ws: ServerConnection, device_id: str | None, timeout: float | None = None) -> protocol.Message:
        """The next message, or ProtocolError; a device past its message rate is refused."""
        frame = await (asyncio.wait_for(ws.recv(), timeout) if timeout else ws.recv())
        if device_id is not None and not self.rate.allow(device_id):
            raise Refused("rate_limited",
                          f"more than {self.limits.burst} messages at once or {self.limits.messages_per_s:g} per second")
        return protocol.decode(frame)

    async def handle(self, ws: ServerConnection) -> None:
        device_id = None
        enrolled = getattr(ws, "username", None)  # set by check_handshake when credentials are required
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
        elif rnd is None or rnd.id != task.round_id:
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
        if rnd is None or rnd.id != task.round_id:
            return "late", "the task's round is closed"
        if task.abandoned_at is not None:
            return "abandoned", "the device was away and its task went to another device"
        if update.global_version != rnd.base_version or update.round != rnd.number:
            return "wrong_version", (f"the update starts from round {update.round} version {update.global_version}, "
                                     f"the task was round {rnd.number} version {rnd.base_version}")
        return self._poisoning(list(zip(update.seeds, update.coefs)), update.scale, update.dense, task.hparams,
                               self.round_method(rnd.number))

    def _pool(self, hparams: dict) -> frozenset[int] | None:
        """The seeds of the pool a task names (FedKSeed), made once per pool; None for a task without one."""
        key = (hparams.get("seed_pool"), hparams.get("seed_pool_key"))
        if key == (None, None):
            return None
        if key not in self._pools:
            self._pools[key] = frozenset(int(s) for s in parse_seed_pool(hparams))
        return self._pools[key]

    def _poisoning(self, pairs: list[tuple[int, float]], scale: float, dense_bytes: bytes | None, hparams: dict,
                   method: methods.Method) -> tuple[str, str] | None:
        """(code, reason) for an update whose content would damage the model if aggregated."""
        if len(pairs) > (allowed := method.allowed_pairs(hparams)):
            return "too_many_pairs", f"{len(pairs)} pairs, the task allows {allowed} (local steps x directions)"
        pool = self._pool(hparams)
        if pool is not None and (outside := next((s for s, _ in pairs if s not in pool), None)) is not None:
            return "outside_pool", f"seed {outside} is not one of the job's pool of {len(pool)} (docs/directions.md)"
        lowest, highest = method.scale_range(hparams)
        lowest, highest = lowest - SCALE_TOLERANCE, highest + SCALE_TOLERANCE
        if not lowest <= scale <= highest:
            return "bad_scale", f"scale {scale:.9g}: this task allows a scale in [{lowest:.9g}, {highest:.9g}]"
        dense = None
        if dense_bytes:
            # The length first: bytes that are not whole float32 values cannot even be read as an adapter.
            length = method.dense_length(hparams) if method.dense_length else self.job.adapter_dim
            if len(dense_bytes) != 4 * length:
                return "wrong_dimension", (f"dense part of {len(dense_bytes)} bytes, this task's has {length} "
                                           f"float32 values ({4 * length} bytes)")
            dense = np.frombuffer(dense_bytes, "<f4")
            if not np.all(np.isfinite(dense)):
                return "non_finite", "the dense part holds non-finite values"
        bound = self.limits.max_update_rms
        # A method's own dense payload (class statistics) is no change of the adapter: only its pairs count.
        change = dense if method.dense_length is None else None
        if bound is not None and (rms := update_rms(pairs, change)) > bound:
            return "norm_bound", f"the update changes the adapter by RMS {rms:.3g}, past the bound {bound:.3g}"
        return None

    # ---- rounds ----
    def _lr_history(self) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
        """Per device, for the client lr strategies: train loss per closed round, and its dense change in the
        latest one."""
        losses: dict[str, list[float]] = {}
        last: dict[str, np.ndarray] = {}
        need_deltas = self.options.lr_strategy == "model-diff"
        for rnd in self.store.closed_round_list(self.job.id):
            block = (rnd.block_start, rnd.block_end) if rnd.block_start is not None else None
            for row in self.store.updates(rnd.id):
                losses.setdefault(row.device_id, []).append((row.loss_before + row.loss_after) / 2)
                if need_deltas:
                    update = AcceptedUpdate.from_row(row)
                    last[row.device_id] = device_deltas([update], self.job.adapter_dim, self.kind, block)[0]
        return losses, last

    def _reference(self, rnd: Round) -> bytes:
        """The previous round's global update, for a method that uses it (the forward gradient's selection)."""
        if not self.method.uses_reference or rnd.base_version == 0:
            return b""
        new = np.frombuffer(self.store.version(self.job.id, rnd.base_version).vector, "<f4")
        old = np.frombuffer(self.store.version(self.job.id, rnd.base_version - 1).vector, "<f4")
        return (new - old).astype("<f4").tobytes()

    async def _send_task(self, rnd: Round, task, version=None, reference: bytes | None = None) -> None:
        version = version or self.store.version(self.job.id, rnd.base_version)
        reference = self._reference(rnd) if reference is None else reference
        deadline = max(0.0, rnd.wave_opened_at + self.job.round_deadline_s - time.time())
        message = protocol.Task(task_id=task.id, job_id=self.job.id, round=rnd.number, global_version=rnd.base_version,
                                base_model_hash=self.job.base_model_hash, adapter=version.vector,
                                adapter_sha256=version.sha256, method=self.round_method(rnd.number).name,
                                hparams=task.hparams,
                                deadline_s=deadline, reference=reference)
        ws = self.connections.get(task.device_id)
        if ws is not None:
            frame, in_seed_form = message.to_wire(), False
            if (history := self._history(task.device_id, rnd.base_version)) is not None:
                seed_form = replace(message, adapter=b"", history=history).to_wire()
                if len(seed_form) < len(frame):  # the smaller of the two
                    frame, in_seed_form = seed_form, True
            self.task_frames.setdefault(rnd.id, []).append((len(frame), in_seed_form))
            if task.device_id in self.held:  # from now on it holds this version (or says so when it reconnects)
                self.held[task.device_id] = (rnd.base_version, version.sha256)
            try:
                await ws.send(frame)
            except ConnectionClosed:
                pass

    def _history(self, device_id: str, version: int) -> list[dict] | None:
        """The seed-form history (docs/protocol.md, Downlink in seed form) from the version the device holds to
        `version`, or None when it must get the dense adapter: it keeps none (an older device), holds a
        version the store does not (or with another sha256), or a version between is not a per-seed sum."""
        held = self.held.get(device_id)
        if held is None or not held[1] or not 0 <= version - held[0] <= protocol.MAX_HISTORY:
            return None
        start = self.store.version(self.job.id, held[0])
        if start is None or start.sha256 != held[1]:
            return None
        steps = []
        for number in range(held[0] + 1, version + 1):
            if (sums := self._version_sums(number)) is None:
                return None
            steps.append(dict(version=number, seeds=sums.seeds, coefs=sums.coefs, shrink=sums.shrink,
                              block=list(sums.block or ())))
        return steps

    def _version_sums(self, version: int) -> SeedSums | None:
        """How the round that made `version` changed the one before, in seed form, made once from its stored
        updates and checked by replaying it onto the stored previous version: None (the version goes down
        dense) where it is no plain per-seed sum (dense parts, DP noise, the class-statistics head) or where
        the replay does not give the stored version's sha256."""
        if version not in self._sums:
            self._sums[version] = self._replayable_sums(version)
        return self._sums[version]

    def _replayable_sums(self, version: int) -> SeedSums | None:
        stored, before = self.store.version(self.job.id, version), self.store.version(self.job.id, version - 1)
        if stored is None or before is None:
            return None
        rnd = next((r for r in self.store.closed_round_list(self.job.id) if r.id == stored.round_id), None)
        method = self.round_method(rnd.number) if rnd is not None else None
        if rnd is None or method is not self.method or method.coordinator_aggregate is not None:
            return None
        block = (rnd.block_start, rnd.block_end) if rnd.block_start is not None else None
        sums = self.strategy.version_sums([AcceptedUpdate.from_row(row) for row in self.store.updates(rnd.id)], block)
        if sums is None:
            return None
        replayed = replay(np.frombuffer(before.vector, "<f4"), [sums], self.kind).astype("<f4").tobytes()
        if hashlib.sha256(replayed).hexdigest() != stored.sha256:
            log.warning("version %d: its seed sums do not replay to its sha256; its tasks go down dense", version)
            return None
        return sums

    async def _resend_open_task(self, device_id: str) -> None:
        """After a restart or reconnect, a device gets back the task it has not answered: also one
        taken from it while it was away, if no other device has taken that task over (the wave is
        still short of live tasks), rather than the round waiting for its deadline."""
        rnd, tasks = self._unanswered_tasks(device_id)
        if rnd is not None and not tasks:
            tasks = self._restorable(rnd, device_id)
        for task in tasks:
            if task.wave == rnd.wave:
                log.info("resending task %s (round %d) to %s", task.id, rnd.number, device_id)
                await self._send_task(rnd, task)

    def _restorable(self, rnd: Round, device_id: str) -> list:
        """The device's abandoned, unanswered task of this wave, given back to it, when the wave lacks it."""
        answered = self.store.answered(rnd.id)
        mine = [t for t in self.store.tasks(rnd.id, device_id)
                if t.wave == rnd.wave and t.abandoned_at is not None and t.forfeited is None and t.id not in answered]
        if not mine or len(self._live_tasks(rnd)) >= self._target(rnd):
            return []
        log.info("round %d: %s is back and no device took over its task %s: giving it back", rnd.number,
                 device_id, mine[0].id)
        return [self.store.restore_task(mine[0].id)]

    def _live_tasks(self, rnd: Round) -> list:
        """This wave's tasks, after abandoning those whose device has been away too long."""
        answered = self.store.answered(rnd.id)
        live = []
        for task in self.store.tasks(rnd.id):
            if task.wave != rnd.wave or task.abandoned_at is not None:
                continue
            if task.id not in answered and task.device_id not in self.connections:
                away = time.time() - self.gone_since.setdefault(task.device_id, time.time())
                if away > self.device_timeout_s:
                    self.store.abandon_task(task.id)
                    log.warning("round %d: %s away for %.0f s: task %s abandoned, reassigning", rnd.number,
                                task.device_id, away, task.id)
                    continue
            live.append(task)
        return live

    def _target(self, rnd: Round) -> int:
        """Devices this round samples (the strategy's count); stored, as it may only grow while the round is open."""
        wanted = self.strategy.target(len(self.connections), rnd.target)
        if wanted > rnd.target:
            rnd.target = self.store.raise_target(rnd.id, wanted).target
        return max(wanted, rnd.target)

    async def _dispatch(self, rnd: Round) -> None:
        """Send tasks to idle connected devices until this wave has its target of live tasks."""
        live = self._live_tasks(rnd)
        # A device whose task was abandoned is not asked again in the same wave: the task moved on.
        assigned = {t.device_id for t in self.store.tasks(rnd.id) if t.wave == rnd.wave}
        idle = [d for d in self.connections if d not in assigned]
        chosen = self.strategy.sample(idle, self._target(rnd) - len(live), self.rng)
        if not chosen:
            return
        block = (rnd.block_start, rnd.block_end) if rnd.block_start is not None else None
        scheduled = self.round_hparams(rnd.number)
        if scheduled is not None:
            hparams = {device_id: dict(scheduled, wave=rnd.wave) for device_id in chosen}
        else:
            hparams = self.strategy.configure(rnd.wave, block, chosen, self._lr_history, self.rng)
        tasks = self.store.add_tasks(rnd.id, rnd.wave, hparams)  # one transaction
        version, reference = self.store.version(self.job.id, rnd.base_version), self._reference(rnd)
        for task in tasks:
            log.info("round %d wave %d: task %s -> %s (lr %.3g)", rnd.number, rnd.wave, task.id, task.device_id,
                     task.hparams["lr"])
            await self._send_task(rnd, task, version, reference)

    async def _collect(self, rnd: Round) -> None:
        """Dispatch and wait until every task of the current wave is answered or its deadline passes."""
        deadline = rnd.wave_opened_at + self.job.round_deadline_s
        while True:
            self.changed.clear()
            await self._dispatch(rnd)
            tasks = self._live_tasks(rnd)
            answered = self.store.answered(rnd.id)
            if len(tasks) >= self._target(rnd) and all(t.id in answered for t in tasks):
                return
            remaining = deadline - time.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=min(remaining, 1.0))
                # Let a burst of arrivals land before re-checking: each check reads the round's tasks.
                await asyncio.sleep(COLLECT_BATCH_S)
            except TimeoutError:
                pass

    async def _gather(self, rnd: Round, block) -> tuple[Round, list, float | None]:
        """Collect the round's updates, wave after wave while the strategy asks for another:
        (the round as it stands, its updates, the estimate variance if measured)."""
        while True:
            await self._collect(rnd)
            rows = self.store.updates(rnd.id)
            if len(rows) < self.job.min_devices or self.round_method(rnd.number) is not self.method:
                return rnd, rows, None
            accepted = [AcceptedUpdate.from_row(row) for row in rows]
            more, variance = self.strategy.another_wave(accepted, self.job.adapter_dim, rnd.wave, block)
            if not more:
                return rnd, rows, variance
            log.info("round %d: estimate variance %.3g > %.3g: asking for more perturbations (wave %d)",
                     rnd.number, variance, self.options.variance_threshold, rnd.wave + 1)
            rnd = self.store.next_wave(rnd.id)

    def _combine(self, rnd: Round, base: np.ndarray, accepted: list[AcceptedUpdate], block) -> np.ndarray | None:
        """The round's rule applied to `accepted`; None when it cannot give a finite adapter."""
        method = self.round_method(rnd.number)
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                if method.coordinator_aggregate is not None:
                    new = method.coordinator_aggregate(base, [u.change.dense for u in accepted],
                                                       self.round_hparams(rnd.number), self.layout)
                else:
                    new = self.strategy.aggregate(base, accepted, block)
        except (ValueError, ArithmeticError):  # e.g. class statistics whose head is singular or not finite
            return None
        return new if np.isfinite(new).all() else None

    def _change_size(self, rnd: Round, row, base: np.ndarray) -> float:
        """How far an update would move the adapter: its bound's measure, or a statistics payload's largest value."""
        update = AcceptedUpdate.from_row(row)
        dense = update.change.dense
        if self.round_method(rnd.number).dense_length is not None:
            return float(np.max(np.abs(dense))) if dense is not None else 0.0
        scale_part = abs(update.change.scale - 1.0) * float(np.sqrt(np.mean(base.astype(np.float64) ** 2)))
        return update_rms(update.pairs, dense) + scale_part

    def _drop_updates(self, rnd: Round, offenders: list[tuple]) -> None:
        """Take accepted updates back out of the round, each recorded as a refusal with its code, and their
        tasks forfeited: the round collects again without them (another device may take their place)."""
        for row, code, reason in offenders:
            self.store.drop_update(row.id)
            self.store.forfeit_task(row.task_id, code)
            self.store.add_refusal(self.job.id, row.device_id, code, reason)
            log.warning("round %d: dropped the update of %s for task %s (%s): %s; the round goes on without it",
                        rnd.number, row.device_id, row.task_id, code, reason)

    def _diverged(self, metrics: dict, base_version: int) -> str | None:
        """A held-out metric that is not finite for the new adapter but was for the round's base version."""
        before = {m.name for m in self.store.metrics(self.job.id) if m.version == base_version}
        return next((name for name, value in metrics.items() if not math.isfinite(value) and name in before), None)

    async def _publishable(self, rnd: Round, rows: list, block) -> tuple[np.ndarray, dict] | None:
        """The next adapter and its held-out metrics; None when updates had to be dropped first (_drop_updates):
        one that the limits refuse (stored by an older coordinator, or under other limits), one without
        which the aggregate is finite, or, when a held-out metric stops being finite, the largest."""
        method = self.round_method(rnd.number)
        stale = [(row, *refusal) for row in rows
                 if (refusal := self._poisoning(AcceptedUpdate.from_row(row).pairs, row.scale, row.dense,
                                                self.store.task(row.task_id).hparams, method))]
        if stale:
            self._drop_updates(rnd, stale)
            return None
        base = np.frombuffer(self.store.version(self.job.id, rnd.base_version).vector, dtype="<f4")
        accepted = [AcceptedUpdate.from_row(row) for row in rows]
        new = self._combine(rnd, base, accepted, block)
        if new is None:
            alone = [row for row, u in zip(rows, accepted) if self._combine(rnd, base, [u], block) is None]
            blamed = alone or [max(rows, key=lambda row: self._change_size(rnd, row, base))]
            reason = "the round's aggregate with this update is not finite"
            self._drop_updates(rnd, [(row, "non_finite_aggregate", reason) for row in blamed])
            return None
        metrics = await asyncio.to_thread(self.evaluate, new) if self.evaluate else {}
        if (name := self._diverged(metrics, rnd.base_version)) is not None:
            largest = max(rows, key=lambda row: self._change_size(rnd, row, base))
            reason = f"with this update, the largest of the round, the held-out {name} is {metrics[name]}"
            self._drop_updates(rnd, [(largest, "diverged", reason)])
            return None
        return new, metrics

    def _finite_metrics(self, version: int, metrics: dict) -> dict:
        """The metrics that can be stored; a non-finite one is recorded as a refusal with its value instead."""
        kept = {}
        for name, value in metrics.items():
            if math.isfinite(value):
                kept[name] = value
            else:
                reason = f"version {version}: {name} is {value}, not stored"
                self.store.add_refusal(self.job.id, None, "non_finite_metric", reason)
                log.warning("%s", reason)
        return kept

    async def run_round(self, rnd: Round) -> bool:
        """Run one round attempt to its end; True if it closed with a new global version."""
        block = (rnd.block_start, rnd.block_end) if rnd.block_start is not None else None
        while True:
            rnd, rows, variance = await self._gather(rnd, block)
            if len(rows) < self.job.min_devices:
                reason = (f"{len(rows)} of the required {self.job.min_devices} updates arrived before the deadline "
                          f"({len(self.connections)} devices connected, {len(self.store.tasks(rnd.id))} tasked)")
                self.store.fail_round(rnd.id, reason)
                self.task_frames.pop(rnd.id, None)
                log.warning("round %d attempt %d failed: %s", rnd.number, rnd.attempt, reason)
                return False
            if (published := await self._publishable(rnd, rows, block)) is not None:
                break
        new, metrics = published
        metrics["train_loss_before"] = float(np.mean([u.loss_before for u in rows]))
        metrics["train_loss_after"] = float(np.mean([u.loss_after for u in rows]))
        metrics["waves"] = rnd.wave + 1
        metrics |= self.strategy.round_metrics(rnd.number)
        if variance is not None:
            metrics["estimate_variance"] = variance
        if frames := self.task_frames.pop(rnd.id, None):  # the task frames this process sent for the round
            metrics["task_bytes_max"] = float(max(size for size, _ in frames))
            metrics["task_bytes_mean"] = float(np.mean([size for size, _ in frames]))
            metrics["tasks_in_seed_form"] = float(sum(seed for _, seed in frames))
            metrics["tasks_sent"] = float(len(frames))
        version = self.store.close_round(rnd, new, self._finite_metrics(rnd.base_version + 1, metrics))
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        log.info("round %d closed: %d updates -> version %d; %s", rnd.number, len(rows), version, shown)
        print(f"round {rnd.number}/{self.job.rounds}: {len(rows)} updates, {shown}", flush=True)
        return True

    async def run_job(self) -> bool:
        """Run rounds until the job has them all; False if a round failed too often."""
        if self.evaluate and not self.store.metrics(self.job.id):
            metrics = await asyncio.to_thread(self.evaluate, np.frombuffer(self.store.version(self.job.id, 0).vector, "<f4"))
            self.store.add_metrics(self.job.id, 0, self._finite_metrics(0, metrics))
            print("round 0 (initial adapter): " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        failures = 0
        while (done := self.store.closed_rounds(self.job.id)) < self.job.rounds:
            rnd = self.store.open_round(self.job.id)
            if rnd is None:
                base = self.store.latest_version(self.job.id).version
                blocks = self.blocks
                rnd = self.store.start_round(self.job.id, done + 1, base, blocks[done % len(blocks)] if blocks else None)
                log.info("round %d attempt %d opened from version %d", rnd.number, rnd.attempt, base)
            else:
                log.info("resuming open round %d attempt %d", rnd.number, rnd.attempt)
            if await self.run_round(rnd):
                failures = 0
            else:
                failures += 1
                if failures >= self.max_attempts:
                    return False
        self.store.finish_job(self.job.id)
        self.finished.set()
        for device_id, ws in list(self.connections.items()):
            try:
                await ws.send(protocol.Done(job_id=self.job.id, reason="job finished").to_wire())
            except ConnectionClosed:
                pass
        return True


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
    async with serve(coordinator.handle, host, port, ssl=tls, process_request=coordinator.check_handshake,
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

