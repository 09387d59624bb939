"""One device: connect to the coordinator, take tasks, train forward-only, upload seed-form updates.

The device holds the bundle (the `.pte` and its manifest) and its own data shard, set up once
(device_sdk.setup). A task brings the global adapter (or the versions since the one the device
kept, in seed form); the device checks it and runs its local steps through the ExecuTorch
program (device_sdk.training), and answers with the (seed, coefficient) pairs of every step.
This module is the connection: the handshake, the session, reconnecting until
`connect_timeout_s` passes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import time
from urllib.parse import urlsplit

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from device_sdk.program import DeviceProgram, ProgramUnavailable
from device_sdk.setup import DeviceConfig, DeviceError, Shared, set_up
from device_sdk.training import HistoryMismatch, Trainer
from fwdfed import handshake, protocol
from fwdfed.net import is_loopback
from runtime.engine import ProgramEngine

__all__ = ["Device", "DeviceConfig", "DeviceError", "HistoryMismatch"]

log = logging.getLogger("device")


class Device(Trainer):
    def __init__(self, config: DeviceConfig, engine: ProgramEngine | None = None,
                 train_lock: asyncio.Lock | None = None, load_program: bool = True, shared: Shared | None = None):
        """`engine`, `train_lock` and `shared` may be shared by logical devices multiplexed in one process
        (the emulator's --workers): one loaded program, one training step at a time, the bundle, data and
        tokenizer read once. `load_program` False leaves `engine` and `program` for the caller to set (after
        every device's teacher has been freed).
        A program that crashed the child that tried it leaves `engine` None: the device declines its tasks."""
        setup = set_up(config, shared)  # before the program is loaded: the teacher's phase and the plan come first
        self.program = DeviceProgram(config, setup.bundle, setup.trust_key)
        super().__init__(config, setup, engine or (self.program.load() if load_program else None))
        self.train_lock = train_lock
        self.declined: set[str] = set()  # tasks declined while the program could not be loaded, until their ack
        self.tasks_done = 0
        self.resyncs = 0  # histories that did not replay to their task's sha256 (the dense adapter came instead)

    # ---- the connection ----
    def hello(self) -> protocol.Hello:
        m = self.bundle.manifest
        held = {}
        if self.config.keep_adapter:  # "" for the sha256: holds none, but keeps the next one
            version, sha = (0, "") if self.held is None else \
                (self.held[0], hashlib.sha256(self.held[1].astype("<f4").tobytes()).hexdigest())
            held = {"held_version": version, "held_sha256": sha}
        return protocol.Hello(device_id=self.config.device_id, base_model_hash=m.base_model_hash,
                              adapter_dim=m.adapter_dim, num_examples=self.num_examples,
                              mem_budget_bytes=self.config.mem_budget_bytes, **held)

    def _connect_options(self) -> dict:
        """The handshake's credential header and TLS context. The server's certificate is verified
        (against the system's CAs and --ca-file); a credential never travels unencrypted off this host."""
        url, c = self.config.coordinator, self.config
        try:
            secure, host = urlsplit(url).scheme == "wss", urlsplit(url).hostname or ""
        except ValueError:
            raise DeviceError(f"{url!r} is not a websocket URL (ws://host:port)") from None
        options = {"max_size": 8 * self.bundle.manifest.adapter_dim + 64 * 1024}  # a task: adapter + reference
        if (c.token or c.private_key) and not secure and not is_loopback(host):
            raise DeviceError(f"refusing to send this device's credential unencrypted to {host}: use wss://")
        if c.token:
            options["additional_headers"] = {"Authorization": f"Bearer {c.token}"}
        if secure:
            try:
                options["ssl"] = ssl.create_default_context(cafile=c.ca_file)
            except (OSError, ssl.SSLError) as e:
                raise DeviceError(f"cannot use the CA file {c.ca_file}: {e}") from None
        return options

    def _device_key(self):
        """The device's Ed25519 private key, or None when it has none (a bearer token, or no credential)."""
        if self.config.private_key is None:
            return None
        try:
            return handshake.load_device_key(self.config.private_key)
        except handshake.HandshakeError as e:
            raise DeviceError(f"device {self.config.device_id}: its private key is {e}") from None

    async def _open(self, options: dict, key):
        """One connection. With a key: the request without a credential gets the challenge (401 and its nonce),
        and the second one carries the signed answer (docs/protocol.md, The handshake)."""
        url = self.config.coordinator
        try:
            return await connect(url, open_timeout=10, **options)  # a coordinator without credentials lets it in
        except InvalidStatus as e:
            challenge = e.response.headers.get("WWW-Authenticate")
            if key is None or e.response.status_code != 401 or challenge is None:
                raise
        try:
            nonce = handshake.parse_challenge(challenge)
        except handshake.HandshakeError as e:
            raise DeviceError(str(e)) from None
        signed = handshake.answer(key, self.config.device_id, nonce, int(time.time()))
        return await connect(url, open_timeout=10, additional_headers={"Authorization": signed}, **options)

    async def _connect(self):
        options, key = self._connect_options(), self._device_key()
        deadline = time.monotonic() + self.config.connect_timeout_s
        delay, last_error = 0.2, None
        while time.monotonic() < deadline:
            try:
                return await self._open(options, key)
            except InvalidURI:
                raise DeviceError(f"{self.config.coordinator!r} is not a websocket URL (ws://host:port)") from None
            except InvalidStatus as e:
                if key is not None and e.response.status_code == 401 and "WWW-Authenticate" in e.response.headers:
                    last_error = e  # a stale challenge (answered too late): sign a new one
                elif e.response.status_code in (401, 403):
                    reason = e.response.body.decode("utf-8", "replace").strip()[:200]
                    raise DeviceError(f"the coordinator refused this device's credential: {reason}") from None
                else:
                    last_error = e  # 503: the coordinator is full for now
            except ssl.SSLCertVerificationError as e:
                raise DeviceError(f"the coordinator's TLS certificate is not trusted: {e.verify_message} "
                                  "(pass the CA that signed it with --ca-file)") from None
            except (OSError, InvalidHandshake, TimeoutError) as e:
                last_error = e
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        raise DeviceError(f"cannot reach the coordinator at {self.config.coordinator} "
                          f"within {self.config.connect_timeout_s:g} s ({last_error})")

    def train_with_program(self, task: protocol.Task) -> protocol.Update:
        """`train`, on the program loaded now if it crashed the child before (the bundle read again), or loaded
        since by another device sharing it. A device made with `load_program` False and no engine set trains
        on none (a test's stand-in `train`)."""
        if self.engine is None and (self.program.crashed is not None or self.program.engine is not None):
            self.engine = self.program.for_task(task.task_id)
        return self.train(task)

    async def run(self) -> int:
        """Serve tasks until the coordinator says the job is done; returns tasks completed."""
        while await self.before_connect():
            ws = await self._connect()
            try:
                if await self._session(ws):
                    return self.tasks_done
            except ConnectionClosed:
                log.info("%s: connection lost, reconnecting", self.config.device_id)
            except HistoryMismatch as e:  # the hello of the next connection holds nothing: the task comes dense
                self.resyncs += 1
                log.warning("%s: %s; reconnecting for the dense adapter", self.config.device_id, e)
            finally:
                await ws.close()
        return self.tasks_done

    # Hooks of the emulator's profiled devices (device_sdk.profiles): a phone's availability, speed and network.
    async def before_connect(self) -> bool:
        """Before each connection: False ends `run` (the job ended while this device was away)."""
        return True

    async def receive(self, ws):
        """The next frame of the connection."""
        return await ws.recv()

    async def run_task(self, task: protocol.Task) -> protocol.Update:
        """The task trained, in a thread (one device at a time, where devices share a program)."""
        if self.train_lock is None:
            return await asyncio.to_thread(self.train_with_program, task)
        async with self.train_lock:
            return await asyncio.to_thread(self.train_with_program, task)

    def acknowledged(self, ack: protocol.Ack) -> None:
        """The coordinator's answer to an update."""
        self.tasks_done += ack.accepted
        log.info("%s: update %s %s", self.config.device_id, ack.task_id,
                 "accepted" if ack.accepted else f"refused: {ack.reason}")

    async def _session(self, ws) -> bool:
        """One connection's life; True when the job is done."""
        await ws.send(self.hello().to_wire())
        while True:
            try:
                message = protocol.decode(await self.receive(ws))
            except protocol.ProtocolError as e:
                raise DeviceError(f"the coordinator sent a bad frame: {e}") from None
            if isinstance(message, protocol.Error):
                raise DeviceError(f"the coordinator refused this device ({message.code}): {message.message}")
            if isinstance(message, protocol.Done):
                log.info("%s: job %s done after %d tasks", self.config.device_id, message.job_id, self.tasks_done)
                return True
            if isinstance(message, protocol.Task):
                message = self.task_adapter(message)
                try:
                    update = await self.run_task(message)
                except DeviceError as e:  # say so on the wire, so the task goes to another device at once
                    await ws.send(protocol.Decline(task_id=message.task_id, code="cannot_run",
                                                   reason=str(e)[: protocol.MAX_TEXT]).to_wire())
                    if not isinstance(e, ProgramUnavailable):
                        raise
                    log.error("%s: declined: %s", self.config.device_id, e)
                    self.declined.add(message.task_id)
                    continue
                self.keep(message)  # its adapter passed every check: the version this device holds now
                await ws.send(update.to_wire())
            elif isinstance(message, protocol.Ack) and message.task_id in self.declined:
                self.declined.discard(message.task_id)
                log.info("%s: decline of %s %s", self.config.device_id, message.task_id,
                         "recorded" if message.accepted else f"refused: {message.reason}")
            elif isinstance(message, protocol.Ack):
                self.acknowledged(message)
