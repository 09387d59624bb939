"""Everything the coordinator knows, in SQLite (or PostgreSQL) through SQLAlchemy.

Nothing about a job lives only in memory: the job, its rounds, the tasks sent, every
accepted update and every global adapter version are rows, so a restarted coordinator
continues from the database. The schema carries a version; a database with another
version is refused rather than misread.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass

import msgpack
import numpy as np
from sqlalchemy import (JSON, BigInteger, Float, ForeignKey, Integer, LargeBinary, String, UniqueConstraint,
                        create_engine, event, inspect, select)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fwdfed.errors import UserError, first_line

SCHEMA_VERSION = 3  # 2: waves, blocks, per-task hparams, scale, device status, refusals; 3: credentials
UPGRADABLE = {"2"}  # versions whose upgrade only adds tables


class StoreError(UserError):
    """A database the coordinator cannot use; the message is meant for the user."""


class Base(DeclarativeBase):
    pass


class Meta(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    bundle: Mapped[str] = mapped_column(String(1024))
    base_model_hash: Mapped[str] = mapped_column(String(64))
    adapter_dim: Mapped[int] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(32))
    hparams: Mapped[dict] = mapped_column(JSON)  # sent to devices with every task
    options: Mapped[dict] = mapped_column(JSON, default=dict)  # coordinator-side: lr strategy, blocks, variance
    rounds: Mapped[int] = mapped_column(Integer)
    devices_per_round: Mapped[int] = mapped_column(Integer)
    min_devices: Mapped[int] = mapped_column(Integer)
    round_deadline_s: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), default="running")  # running | finished
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class Device(Base):
    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    num_examples: Mapped[int] = mapped_column(Integer, default=0)
    mem_budget_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    first_seen: Mapped[float] = mapped_column(Float, default=time.time)
    last_seen: Mapped[float] = mapped_column(Float, default=time.time)
    status: Mapped[str] = mapped_column(String(16), default="online")  # online | gone


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("job_id", "number", "attempt"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    number: Mapped[int] = mapped_column(Integer)  # 1-based round of the job
    attempt: Mapped[int] = mapped_column(Integer, default=1)  # a failed round is retried as a new attempt
    status: Mapped[str] = mapped_column(String(16), default="open")  # open | closed | failed
    base_version: Mapped[int] = mapped_column(Integer)
    target: Mapped[int] = mapped_column(Integer, default=0)  # devices sampled (grows with --fraction)
    wave: Mapped[int] = mapped_column(Integer, default=0)  # FwdLLM: more perturbations asked while variance is high
    wave_opened_at: Mapped[float] = mapped_column(Float, default=time.time)
    block_start: Mapped[int | None] = mapped_column(Integer, nullable=True)  # block-cyclic: the slice perturbed
    block_end: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reason: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    opened_at: Mapped[float] = mapped_column(Float, default=time.time)
    closed_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("round_id", "device_id", "wave"),)
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    wave: Mapped[int] = mapped_column(Integer, default=0)
    hparams: Mapped[dict] = mapped_column(JSON)  # as sent: a resent task is the same task
    abandoned_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # its device went away; reassigned
    sent_at: Mapped[float] = mapped_column(Float, default=time.time)


class UpdateRow(Base):
    __tablename__ = "updates"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id"), unique=True)  # one update per task
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    pairs: Mapped[bytes] = mapped_column(LargeBinary)  # msgpack [[seed, coef], ...]
    num_pairs: Mapped[int] = mapped_column(Integer)
    scale: Mapped[float] = mapped_column(Float, default=1.0)
    dense: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # float32, the backprop baseline
    num_examples: Mapped[int] = mapped_column(Integer)
    loss_before: Mapped[float] = mapped_column(Float)
    loss_after: Mapped[float] = mapped_column(Float)
    peak_rss_bytes: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[float] = mapped_column(Float, default=time.time)


class AdapterVersion(Base):
    __tablename__ = "adapter_versions"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32 little-endian
    sha256: Mapped[str] = mapped_column(String(64))
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id"), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class Refusal(Base):
    """A refused update or connection: what, from whom, why."""
    __tablename__ = "refusals"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(128))
    device_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    code: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(1024))
    at: Mapped[float] = mapped_column(Float, default=time.time)


class Credential(Base):
    """A device's enrolment: the sha256 of its token (the token itself is never stored)."""
    __tablename__ = "credentials"
    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Metric(Base):
    __tablename__ = "metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    version: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)


@dataclass(frozen=True)
class AcceptedUpdate:
    device_id: str
    pairs: list[tuple[int, float]]
    num_examples: int
    scale: float = 1.0
    dense: np.ndarray | None = None


def adapter_bytes(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_store(url, sqlite_sync: str = "full") -> "Store":
    """Open (creating if new) the database at `url`; a bare path means SQLite.

    `sqlite_sync`: "full" makes every accepted update durable against power loss before it is
    acknowledged; "normal" (WAL) keeps it safe from a crash of the process only, and is faster."""
    url = str(url)
    if "://" not in url:
        url = f"sqlite:///{url}"
    try:
        engine = create_engine(url)
        if engine.dialect.name == "sqlite":
            @event.listens_for(engine, "connect")
            def _sqlite_pragmas(conn, _record):
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
                cur.execute("PRAGMA busy_timeout=5000")
                cur.execute(f"PRAGMA synchronous={'NORMAL' if sqlite_sync == 'normal' else 'FULL'}")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()
        tables = set(inspect(engine).get_table_names())
    except SQLAlchemyError as e:
        raise StoreError(f"cannot open database {url}: {first_line(e)}") from None
    store = Store(engine)
    if not tables:
        Base.metadata.create_all(engine)
        with Session(engine) as s, s.begin():
            s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
    else:
        store.check_schema(tables)
    return store


class Store:
    def __init__(self, engine):
        self.engine = engine

    def check_schema(self, tables: set[str]) -> None:
        if "meta" not in tables:
            raise StoreError("the database was not made by this coordinator (it has no meta table); use a new --db")
        with Session(self.engine) as s:
            row = s.get(Meta, "schema_version")
        if row is not None and row.value in UPGRADABLE:
            Base.metadata.create_all(self.engine)  # adds the missing tables, touches no existing one
            with Session(self.engine) as s, s.begin():
                s.get(Meta, "schema_version").value = str(SCHEMA_VERSION)
            return
        if row is None or row.value != str(SCHEMA_VERSION):
            found = row.value if row else "none"
            raise StoreError(f"database schema version {found} is not supported (this coordinator uses {SCHEMA_VERSION})")

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # ---- jobs and versions ----
    def running_job(self) -> Job | None:
        with self.session() as s:
            return s.scalars(select(Job).where(Job.status == "running").order_by(Job.created_at)).first()

    def latest_job(self) -> Job | None:
        with self.session() as s:
            return s.scalars(select(Job).order_by(Job.created_at.desc())).first()

    def job(self, job_id: str) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    def create_job(self, job: Job, initial: np.ndarray) -> Job:
        data = adapter_bytes(initial)
        with self.session() as s, s.begin():
            s.add(job)
            s.flush()
            s.add(AdapterVersion(job_id=job.id, version=0, vector=data, sha256=sha256(data)))
        return job

    def set_job_options(self, job_id: str, options: dict) -> Job:
        """Options an older coordinator did not store, filled in when the job is resumed."""
        with self.session() as s, s.begin():
            job = s.get(Job, job_id)
            job.options = options
        return job

    def finish_job(self, job_id: str) -> None:
        with self.session() as s, s.begin():
            s.get(Job, job_id).status = "finished"

    def latest_version(self, job_id: str) -> AdapterVersion:
        with self.session() as s:
            return s.scalars(select(AdapterVersion).where(AdapterVersion.job_id == job_id)
                             .order_by(AdapterVersion.version.desc())).first()

    def version(self, job_id: str, version: int) -> AdapterVersion | None:
        with self.session() as s:
            return s.get(AdapterVersion, (job_id, version))

    def versions(self, job_id: str) -> list[AdapterVersion]:
        with self.session() as s:
            return list(s.scalars(select(AdapterVersion).where(AdapterVersion.job_id == job_id)
                                  .order_by(AdapterVersion.version)))

    # ---- devices ----
    def touch_device(self, device_id: str, num_examples: int, mem_budget_bytes: int | None) -> None:
        with self.session() as s, s.begin():
            device = s.get(Device, device_id)
            if device is None:
                s.add(Device(id=device_id, num_examples=num_examples, mem_budget_bytes=mem_budget_bytes))
            else:
                device.num_examples, device.mem_budget_bytes, device.last_seen = num_examples, mem_budget_bytes, time.time()
                device.status = "online"

    def set_device_status(self, device_id: str, status: str) -> None:
        with self.session() as s, s.begin():
            device = s.get(Device, device_id)
            if device is not None:
                device.status, device.last_seen = status, time.time()

    def devices(self) -> list[Device]:
        with self.session() as s:
            return list(s.scalars(select(Device).order_by(Device.id)))

    # ---- credentials ----
    def enrol(self, device_id: str) -> str:
        """Issue a new token for `device_id` (replacing and so revoking any earlier one); returns it."""
        token = secrets.token_urlsafe(32)
        with self.session() as s, s.begin():
            s.merge(Credential(device_id=device_id, token_hash=sha256(token.encode()), created_at=time.time(),
                               revoked_at=None))
        return token

    def revoke(self, device_id: str) -> bool:
        """Revoke the device's credential; False if it has none or it is already revoked."""
        with self.session() as s, s.begin():
            credential = s.get(Credential, device_id)
            if credential is None or credential.revoked_at is not None:
                return False
            credential.revoked_at = time.time()
            return True

    def authenticate(self, token: str) -> str | None:
        """The device a valid, unrevoked token belongs to, or None."""
        with self.session() as s:
            credential = s.scalars(select(Credential).where(Credential.token_hash == sha256(token.encode()))).first()
        return credential.device_id if credential is not None and credential.revoked_at is None else None

    def revoked(self, device_ids: list[str]) -> set[str]:
        """Those of `device_ids` whose credential was revoked (or removed) since they connected."""
        with self.session() as s:
            valid = set(s.scalars(select(Credential.device_id).where(Credential.device_id.in_(device_ids),
                                                                     Credential.revoked_at.is_(None))))
        return set(device_ids) - valid

    def credentials(self) -> list[Credential]:
        with self.session() as s:
            return list(s.scalars(select(Credential).order_by(Credential.device_id)))

    def abandon_task(self, task_id: str) -> None:
        with self.session() as s, s.begin():
            s.get(Task, task_id).abandoned_at = time.time()

    def restore_task(self, task_id: str) -> Task:
        """An abandoned task given back to its device (no other device took it over)."""
        with self.session() as s, s.begin():
            task = s.get(Task, task_id)
            task.abandoned_at = None
        return task

    def add_refusal(self, job_id: str, device_id: str | None, code: str, reason: str) -> None:
        with self.session() as s, s.begin():
            s.add(Refusal(job_id=job_id, device_id=device_id, code=code, reason=reason[:1024]))

    def refusals(self, job_id: str) -> list[Refusal]:
        with self.session() as s:
            return list(s.scalars(select(Refusal).where(Refusal.job_id == job_id).order_by(Refusal.id)))

    def rounds(self, job_id: str) -> list[Round]:
        with self.session() as s:
            return list(s.scalars(select(Round).where(Round.job_id == job_id).order_by(Round.id)))

    # ---- rounds ----
    def open_round(self, job_id: str) -> Round | None:
        with self.session() as s:
            return s.scalars(select(Round).where(Round.job_id == job_id, Round.status == "open")).first()

    def closed_rounds(self, job_id: str) -> int:
        with self.session() as s:
            return len(list(s.scalars(select(Round.id).where(Round.job_id == job_id, Round.status == "closed"))))

    def start_round(self, job_id: str, number: int, base_version: int, block: tuple[int, int] | None = None) -> Round:
        with self.session() as s, s.begin():
            attempts = s.scalars(select(Round.attempt).where(Round.job_id == job_id, Round.number == number)).all()
            rnd = Round(job_id=job_id, number=number, attempt=max(attempts, default=0) + 1, base_version=base_version,
                        block_start=block[0] if block else None, block_end=block[1] if block else None)
            s.add(rnd)
        return rnd

    def raise_target(self, round_id: int, target: int) -> Round:
        with self.session() as s, s.begin():
            rnd = s.get(Round, round_id)
            rnd.target = max(rnd.target, target)
        return rnd

    def next_wave(self, round_id: int) -> Round:
        with self.session() as s, s.begin():
            rnd = s.get(Round, round_id)
            rnd.wave, rnd.wave_opened_at = rnd.wave + 1, time.time()
        return rnd

    def closed_round_list(self, job_id: str) -> list[Round]:
        with self.session() as s:
            return list(s.scalars(select(Round).where(Round.job_id == job_id, Round.status == "closed")
                                  .order_by(Round.number)))

    def fail_round(self, round_id: int, reason: str) -> None:
        with self.session() as s, s.begin():
            rnd = s.get(Round, round_id)
            rnd.status, rnd.reason, rnd.closed_at = "failed", reason, time.time()

    def close_round(self, rnd: Round, new_vector: np.ndarray, metrics: dict[str, float]) -> int:
        """Store the aggregated adapter as the next version and close the round, atomically."""
        data = adapter_bytes(new_vector)
        with self.session() as s, s.begin():
            row = s.get(Round, rnd.id)
            version = rnd.base_version + 1
            s.add(AdapterVersion(job_id=rnd.job_id, version=version, vector=data, sha256=sha256(data), round_id=rnd.id))
            row.status, row.closed_at = "closed", time.time()
            for name, value in metrics.items():
                s.add(Metric(job_id=rnd.job_id, version=version, name=name, value=float(value)))
        return version

    def add_metrics(self, job_id: str, version: int, metrics: dict[str, float]) -> None:
        with self.session() as s, s.begin():
            for name, value in metrics.items():
                s.add(Metric(job_id=job_id, version=version, name=name, value=float(value)))

    def metrics(self, job_id: str) -> list[Metric]:
        with self.session() as s:
            return list(s.scalars(select(Metric).where(Metric.job_id == job_id).order_by(Metric.version, Metric.id)))

    # ---- tasks and updates ----
    def add_tasks(self, round_id: int, wave: int, hparams_by_device: dict[str, dict]) -> list[Task]:
        """New tasks for these devices, stored in one transaction before any is sent."""
        tasks = [Task(id=uuid.uuid4().hex, round_id=round_id, device_id=d, wave=wave, hparams=h)
                 for d, h in hparams_by_device.items()]
        with self.session() as s, s.begin():
            s.add_all(tasks)
        return tasks

    def tasks(self, round_id: int, device_id: str | None = None) -> list[Task]:
        query = select(Task).where(Task.round_id == round_id)
        if device_id is not None:
            query = query.where(Task.device_id == device_id)
        with self.session() as s:
            return list(s.scalars(query))

    def task(self, task_id: str) -> Task | None:
        with self.session() as s:
            return s.get(Task, task_id)

    def add_update(self, task: Task, pairs: list[tuple[int, float]], scale: float, num_examples: int,
                   loss_before: float, loss_after: float, peak_rss_bytes: int, dense: bytes | None = None) -> bool:
        """Store an accepted update; False if this task already has one (a duplicate)."""
        try:
            with self.session() as s, s.begin():
                s.add(UpdateRow(task_id=task.id, round_id=task.round_id, device_id=task.device_id,
                                pairs=msgpack.packb(pairs), num_pairs=len(pairs), scale=scale, dense=dense or None,
                                num_examples=num_examples,
                                loss_before=loss_before, loss_after=loss_after, peak_rss_bytes=peak_rss_bytes))
            return True
        except IntegrityError:
            return False

    def answered(self, round_id: int) -> set[str]:
        """Ids of the round's tasks that have an accepted update (without loading the updates)."""
        with self.session() as s:
            return set(s.scalars(select(UpdateRow.task_id).where(UpdateRow.round_id == round_id)))

    def updates(self, round_id: int) -> list[UpdateRow]:
        with self.session() as s:
            return list(s.scalars(select(UpdateRow).where(UpdateRow.round_id == round_id).order_by(UpdateRow.id)))

    def accepted(self, round_id: int) -> list[AcceptedUpdate]:
        return [as_accepted(u) for u in self.updates(round_id)]


def as_accepted(u: UpdateRow) -> AcceptedUpdate:
    """A stored update as the strategy reads it."""
    return AcceptedUpdate(u.device_id, [(int(a), float(b)) for a, b in msgpack.unpackb(u.pairs)], u.num_examples,
                          u.scale, np.frombuffer(u.dense, "<f4") if u.dense else None)
