"""One device: connect to the coordinator, take tasks, train with MeZO, upload seed-form updates.

The device holds the bundle (the `.pte` and its manifest) and its own data shard. A task
brings the global adapter; the device checks it is for its base model and intact, runs its
local MeZO steps through the ExecuTorch program, and answers with the (seed, coefficient)
pairs of every step. If the connection drops, it reconnects until `connect_timeout_s` passes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import tempfile
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from device_sdk.budget import BudgetGuard
from device_sdk.data import DataError, DataSpec, Partition, encode, labelled, partition, read_examples, split
from device_sdk.engine import ProgramEngine
from device_sdk.evaluate import load_tokenizer
from device_sdk.prefix_cache import cache_prefix_states
from fwdfed import handshake, protocol
from device_sdk.teacher import TeacherError, check_teacher, label
from fwdfed.batch import Batch
from fwdfed.bundle.manifest import Bundle, load_bundle
from fwdfed.bundle.signing import load_public_key
from fwdfed.bundle.tasks import SEQ_CLS
from fwdfed.errors import UserError
from fwdfed.memory import format_size, peak_rss
from fwdfed.memory_plan import plan_memory, plan_teacher_then_student
from fwdfed import methods
from fwdfed.methods.estimate import PoolDraws, hparam, mean_loss, parse_seed_pool, parse_steps
from fwdfed.methods.fedkd import teacher_objective
from fwdfed.net import is_loopback
from fwdfed.update import SeedSums, replay

log = logging.getLogger("device")

LOSS_PROBE_BATCHES = 4  # batches on which loss_before / loss_after are measured


class DeviceError(UserError):
    """The device cannot go on; the message is meant for the user."""


class HistoryMismatch(Exception):
    """A task's seed-form history, replayed onto the adapter this device kept, is not the task's adapter."""


@dataclass
class DeviceConfig:
    device_id: str
    coordinator: str
    bundle: str
    data: str
    shard_index: int
    shard_count: int
    mem_budget_bytes: int | None = None
    connect_timeout_s: float = 30.0
    seed: int = 0
    token: str | None = None  # a bearer token from `python -m coordinator enrol --bearer` (serve --allow-bearer)
    private_key: str | None = None  # the Ed25519 key (PEM) from `python -m coordinator enrol`: signs the challenge
    ca_file: str | None = None  # trust this CA (PEM) for wss:// besides the system's
    data_spec: DataSpec | None = None  # how the file is read (None: defaults, with the bundle's classes)
    partition: Partition = field(default_factory=Partition)  # how the training examples are dealt
    teacher_bundle: str | None = None  # fedkd: an inference-only teacher that labels the shard before training
    # The operator's public key (PEM, `coordinator keygen`): bundle and teacher must be signed by it. None: unchecked.
    trust_key: str | None = None
    # Keep the global adapter of the last task, and say so in the hello, so that tasks may bring the versions
    # since in seed form instead of the dense adapter (docs/protocol.md, Downlink in seed form).
    keep_adapter: bool = True


class Device:
    def __init__(self, config: DeviceConfig, engine: ProgramEngine | None = None,
                 train_lock: asyncio.Lock | None = None, load_program: bool = True):
        """`engine` and `train_lock` may be shared by logical devices multiplexed in one process
        (the emulator's --workers): one loaded program, one training step at a time. `load_program`
        False leaves `engine` for the caller to set (after every device's teacher has been freed)."""
        self.config = config
        self.trust_key = load_public_key(Path(config.trust_key)) if config.trust_key else None
        self.bundle = load_bundle(config.bundle, trust_key=self.trust_key)
        m = self.bundle.manifest
        spec = replace(config.data_spec or DataSpec(), num_labels=m.model.get("num_labels"))
        train = split(read_examples(config.data, spec), "train")
        examples = partition(train, config.shard_count, config.partition)[config.shard_index]
        if not examples:
            raise DeviceError(f"device {config.device_id}: its shard of {config.data} is empty")
        teacher = self._teacher_bundle()
        if teacher is None and m.task == SEQ_CLS:  # only a teacher's distribution teaches an unlabelled row
            try:
                examples = labelled(examples, f"device {config.device_id}: its shard of {config.data}")
            except DataError as e:
                raise DeviceError(f"{e}; a device given a teacher (--teacher-bundle) learns from unlabelled rows") \
                    from None
        self.num_examples = len(examples)
        self.plan = None
        if config.mem_budget_bytes is not None:
            # Before the program is loaded: a budget that cannot hold a step is refused here.
            directions = m.inputs["max_perturbations"] // 2
            if teacher is None:
                self.plan = plan_memory(self.bundle, config.mem_budget_bytes, len(examples), directions)
                log.info("%s: %s", config.device_id, self.plan.describe())
            else:  # the teacher's phase and the student's, one after the other: the larger must fit
                phased = plan_teacher_then_student(teacher, self.bundle, config.mem_budget_bytes, len(examples),
                                                   directions)
                self.plan = phased.phases[-1]
                log.info("%s: %s", config.device_id, phased.describe())
        tokenizer, size, length = load_tokenizer(self.bundle), m.inputs["batch_size"], m.inputs["seq_len"]
        # A task without a teacher trains on the labelled rows, one that names the teacher on all of them.
        self.batches = encode(tokenizer, [e for e in examples if e.label is not None or m.task != SEQ_CLS], m.task,
                              size, length)
        self.distillation_batches: list[Batch] = []
        self.labelling = None
        if teacher is not None:
            self.labelling = label(teacher, examples)  # the teacher is freed before the student is loaded
            self.distillation_batches = encode(tokenizer, examples, m.task, size, length)
            self._attach_teacher_logits(self.labelling.logits)
            log.info("%s: teacher %s labelled %d examples in %.1f s, peak %s; resident %s before, %s after "
                     "freeing it", config.device_id, self.labelling.sha256[:12], len(examples),
                     self.labelling.seconds, format_size(self.labelling.peak_bytes),
                     format_size(self.labelling.rss_before_bytes), format_size(self.labelling.rss_after_bytes))
        self.engine = engine or (ProgramEngine.for_bundle(self.bundle) if load_program else None)
        self.train_lock = train_lock
        self.tasks_done = 0
        self._eager = None  # built on the first backprop task
        self.prefix_cache = None  # a split program's prefix states, computed before the first training step
        self._prefix_folder = None
        # The global version this device holds and its float32 adapter: the bundle's initial adapter is the
        # job's version 0 when the job started from it (the coordinator compares the sha256). None: holds none.
        self.held: tuple[int, np.ndarray] | None = (0, self.bundle.initial_adapter()) if config.keep_adapter else None
        self.resyncs = 0  # histories that did not replay to their task's sha256 (the dense adapter came instead)

    def _teacher_bundle(self) -> Bundle | None:
        """The teacher bundle this device was given, checked against the student's, or None."""
        if self.config.teacher_bundle is None:
            return None
        teacher = load_bundle(self.config.teacher_bundle, trust_key=self.trust_key)
        try:
            check_teacher(teacher, self.bundle)
        except TeacherError as e:
            raise DeviceError(f"device {self.config.device_id}: teacher {self.config.teacher_bundle}: {e}") from None
        if "logits" not in self.bundle.manifest.program.get("methods", []):
            raise DeviceError(f"device {self.config.device_id}: the student bundle {self.config.bundle} has no logits "
                              "method to distil into: export it with `python -m export ... --distillation`")
        return teacher

    def _attach_teacher_logits(self, logits: np.ndarray) -> None:
        """Each batch gets its examples' rows of the teacher's logits (zeros for filler rows, weight 0)."""
        size = self.bundle.manifest.inputs["batch_size"]
        for i, batch in enumerate(self.distillation_batches):
            rows = np.zeros((size, logits.shape[1]), np.float32)
            part = logits[i * size : (i + 1) * size]
            rows[: len(part)] = part
            batch.teacher_logits = rows

    # ---- training ----
    def check_task(self, task: protocol.Task) -> np.ndarray:
        m = self.bundle.manifest
        if task.base_model_hash != m.base_model_hash:
            raise DeviceError(f"task {task.task_id} is for base model {task.base_model_hash[:12]}, "
                              f"this device holds {m.base_model_hash[:12]}")
        if len(task.adapter) != 4 * m.adapter_dim:
            raise DeviceError(f"task {task.task_id} carries {len(task.adapter)} adapter bytes, expected {4 * m.adapter_dim}")
        if hashlib.sha256(task.adapter).hexdigest() != task.adapter_sha256:
            raise DeviceError(f"task {task.task_id}: the adapter does not match its sha256 (corrupted in transit)")
        if task.method not in methods.METHODS:
            raise DeviceError(f"task {task.task_id} asks for method {task.method!r}; this device runs "
                              f"{methods.names()}")
        if methods.get(task.method).needs_teacher or "teacher_sha256" in task.hparams:
            wanted = str(task.hparams.get("teacher_sha256", ""))
            if self.labelling is None:
                raise DeviceError(f"task {task.task_id} asks for teacher {wanted[:12]} ({task.method}); this device "
                                  "was given no teacher bundle")
            if wanted != self.labelling.sha256:
                raise DeviceError(f"task {task.task_id} is for teacher {wanted[:12]}, this device holds teacher "
                                  f"{self.labelling.sha256[:12]}")
        if len(task.reference) not in (0, 4 * m.adapter_dim):
            raise DeviceError(f"task {task.task_id} carries a reference of {len(task.reference)} bytes")
        adapter = np.frombuffer(task.adapter, dtype="<f4").copy()
        # A sha256 only says the bytes arrived as sent: NaN or infinity would poison every loss.
        for name, values in (("adapter", adapter), ("reference", np.frombuffer(task.reference, dtype="<f4"))):
            if not np.isfinite(values).all():
                raise DeviceError(f"task {task.task_id}: its {name} holds NaN or infinite values")
        return adapter

    def train(self, task: protocol.Task) -> protocol.Update:
        adapter = self.check_task(task)
        method = methods.get(task.method)
        # Every hyperparameter is checked here, before the first allocation the task sizes.
        try:
            config = method.config.from_hparams(task.hparams)
            steps = parse_steps(task.hparams)
            wave = hparam(task.hparams, "wave", int, 0)
            pool = parse_seed_pool(task.hparams)
            if wave < 0:
                raise ValueError(f"wave must be >= 0, got {wave}")
            if config.block is not None and config.block[1] > adapter.shape[0]:
                raise ValueError(f"the adapter block [{config.block[0]}, {config.block[1]}) passes the adapter's "
                                 f"dimension {adapter.shape[0]}")
            if steps * getattr(config, "directions", 0) > protocol.MAX_PAIRS:  # backprop sends no pairs
                raise ValueError(f"{steps} steps of {config.directions} directions make more (seed, coefficient) "
                                 f"pairs than an update may carry ({protocol.MAX_PAIRS})")
        except (ValueError, TypeError) as e:
            raise DeviceError(f"task {task.task_id} has an unusable hyperparameter: {e}") from None
        if self.plan is not None:  # a task may ask for more directions per step than the plan assumed
            plan_memory(self.bundle, self.plan.budget, self.num_examples, getattr(config, "directions", 1),
                        runtime=self.plan.runtime, method=method.name)
        reference = np.frombuffer(task.reference, dtype="<f4") if task.reference else None
        # A task that names the teacher trains on every row, scored by the distillation loss (which
        # needs no label); any other on the labelled rows, by the program's own loss.
        if "teacher_sha256" in task.hparams:
            batches, scored_by = self.distillation_batches, teacher_objective(self.engine, task.hparams)
        else:
            batches, scored_by = self.batches, self.engine
        if not batches:
            raise DeviceError(f"task {task.task_id} ({task.method}) needs labelled rows; this device's shard has none")
        # A different slice of the shard every round; the same seeds never repeat across devices or rounds.
        start = (task.round * steps) % len(batches)
        batches = batches[start:] + batches[:start]
        rng = np.random.default_rng([self.config.seed, task.round, wave, zlib.crc32(self.config.device_id.encode())])
        if pool is not None:  # FedKSeed: every direction one of the job's pool
            rng = PoolDraws(rng, pool)
        if not method.needs_autograd:
            self._cache_prefix_states()
        probe = batches[:LOSS_PROBE_BATCHES]
        loss_before = mean_loss(scored_by, probe, adapter)
        guard = BudgetGuard(self.config.mem_budget_bytes)
        optimizer = method.make_optimizer(self._engine_for(method), adapter, config, rng, reference)
        run = optimizer.train(batches, steps, guard)
        if method.dense_length is None:
            loss_after = mean_loss(scored_by, probe, run.update.apply(adapter, config.kind, config.block))
        else:  # the dense part is the method's own payload (class statistics), not a change of the adapter
            loss_after = loss_before
        guard()  # the probe evaluations count too
        return protocol.Update(task_id=task.task_id, job_id=task.job_id, round=task.round,
                               global_version=task.global_version, seeds=[s for s, _ in run.pairs],
                               coefs=[c for _, c in run.pairs], scale=run.scale,
                               dense=b"" if run.dense is None else run.dense.astype("<f4").tobytes(),
                               num_examples=self.num_examples,
                               loss_before=loss_before, loss_after=loss_after, peak_rss_bytes=peak_rss())

    def _cache_prefix_states(self) -> None:
        """Once, before the first forward-only step: a split program's frozen prefix over the shard
        (device_sdk.prefix_cache); every pass after it runs the adapted top alone."""
        if self.prefix_cache is not None or not getattr(self.engine, "has_split", False) or not self.batches:
            return
        self._prefix_folder = tempfile.TemporaryDirectory(prefix="fwdfed-prefix-")
        self.prefix_cache = cache_prefix_states(self.engine, self.batches, Path(self._prefix_folder.name))
        log.info("%s: prefix states of %d batches in %.1f s (%s, float16, memory-mapped)", self.config.device_id,
                 self.prefix_cache.passes, self.prefix_cache.seconds, format_size(self.prefix_cache.bytes))

    def _engine_for(self, method: methods.Method):
        """The ExecuTorch program for forward-only methods; eager PyTorch (autograd) for backprop."""
        if not method.needs_autograd:
            return self.engine
        if self._eager is None:
            from device_sdk.eager import EagerEngine

            self._eager = EagerEngine(self.bundle)
        return self._eager

    # ---- the adapter a task starts from ----
    def task_adapter(self, task: protocol.Task) -> protocol.Task:
        """The task with its dense adapter: as sent, or, for a task with a history, the adapter this device kept
        with the history replayed onto it (fwdfed.update.replay), checked against the task's sha256
        (HistoryMismatch otherwise: this device then holds nothing, and asks for the dense adapter)."""
        if task.history is None:
            return task
        try:
            if self.held is None:
                raise ValueError("this device holds no adapter")
            version, adapter = self.held
            first = task.global_version - len(task.history)
            numbers = [step["version"] for step in task.history]
            if first != version or numbers != list(range(version + 1, task.global_version + 1)):
                raise ValueError(f"it goes from version {first}, this device holds {version}")
            kind = str(task.hparams.get("kind", "rademacher"))
            steps = [SeedSums(step["seeds"], step["coefs"], step["shrink"], self._block(step["block"], adapter))
                     for step in task.history]
            data = replay(adapter, steps, kind).astype("<f4").tobytes()
        except (ValueError, TypeError, KeyError) as e:
            self.held = None
            raise HistoryMismatch(f"task {task.task_id}: its history cannot be replayed: {e}") from None
        if hashlib.sha256(data).hexdigest() != task.adapter_sha256:
            self.held = None
            raise HistoryMismatch(f"task {task.task_id}: its history, replayed, does not match the adapter's sha256")
        return replace(task, adapter=data, history=None)

    @staticmethod
    def _block(block: list, adapter: np.ndarray) -> tuple[int, int] | None:
        if not block:
            return None
        if not 0 <= block[0] < block[1] <= adapter.shape[0]:
            raise ValueError(f"block {block} does not fit the adapter's {adapter.shape[0]} values")
        return block[0], block[1]

    def keep(self, task: protocol.Task) -> None:
        """After a task's adapter passed its checks: it is the version this device holds from now on."""
        if self.config.keep_adapter:
            self.held = (task.global_version, np.frombuffer(task.adapter, "<f4").copy())

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

    async def run(self) -> int:
        """Serve tasks until the coordinator says the job is done; returns tasks completed."""
        while True:
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

    async def _session(self, ws) -> bool:
        """One connection's life; True when the job is done."""
        await ws.send(self.hello().to_wire())
        while True:
            try:
                message = protocol.decode(await ws.recv())
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
                    if self.train_lock is None:
                        update = await asyncio.to_thread(self.train, message)
                    else:
                        async with self.train_lock:
                            update = await asyncio.to_thread(self.train, message)
                except DeviceError as e:  # say so on the wire, so the task goes to another device at once
                    await ws.send(protocol.Decline(task_id=message.task_id, code="cannot_run",
                                                   reason=str(e)[: protocol.MAX_TEXT]).to_wire())
                    raise
                self.keep(message)  # its adapter passed every check: the version this device holds now
                await ws.send(update.to_wire())
            elif isinstance(message, protocol.Ack):
                self.tasks_done += message.accepted
                log.info("%s: update %s %s", self.config.device_id, message.task_id,
                         "accepted" if message.accepted else f"refused: {message.reason}")
