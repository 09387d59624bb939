"""The door: who may open a websocket to the coordinator, checked before it opens.

Every connection's first request gets a challenge (a nonce in `WWW-Authenticate`); the answer is
the device's Ed25519 signature of it, checked with the key the device was enrolled with
(fwdfed.handshake, docs/protocol.md). Bearer tokens pass only with `serve --allow-bearer`. A full
fleet, a bad credential or a stale answer is refused with an HTTP status and a code, stored, before
any frame of the sender is read. The per-device message rate is limited here too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from coordinator.job import DEFAULT_MAX_UPDATE_RMS
from coordinator.store import Store
from coordinator.store.queries import token_hash
from fwdfed import handshake, protocol

log = logging.getLogger("coordinator")

MAX_NONCES = 100_000  # challenges outstanding at once; past it the oldest is forgotten (its device asks again)


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


class Admission:
    """The handshake's checks for one job: the fleet's size, then the credential. Returns the HTTP response
    that refuses the connection, or None to let it open (with `connection.username` the device's id)."""

    def __init__(self, store: Store, job_id: str, limits: Limits):
        self.store, self.job_id, self.limits = store, job_id, limits
        self.nonces: dict[str, float] = {}  # challenges issued and not yet answered -> when (monotonic), oldest first
        # Websocket connections open (counted by Coordinator.handle): counting the server's on every handshake
        # would cost a pass over the whole fleet per device.
        self.open_connections = 0

    def check(self, connection: ServerConnection, request: Request) -> Response | None:
        """Before the websocket opens: refuse when the fleet is full or the credential is not valid,
        so that nothing from an unknown sender is ever read as a message."""
        if self.open_connections >= self.limits.max_connections:
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
        self.store.add_refusal(self.job_id, None, code, reason)
        log.warning("refused a handshake from %s (%s): %s", connection.remote_address, code, reason)
        return connection.respond(status, f"{code}: {reason}\n")
