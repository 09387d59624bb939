"""The coordinator's tables: everything it knows about jobs, devices, rounds, tasks, updates,
adapter versions, metrics, refusals and credentials.

Nothing about a job lives only in memory: the job, its rounds, the tasks sent, every
accepted update and every global adapter version are rows, so a restarted coordinator
continues from the database.
"""

from __future__ import annotations

import time

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# 2: waves, blocks, per-task hparams, scale, device status, refusals; 3: credentials; 4: operator tokens,
# bytes each device sent and was sent; 5: a task forfeited for good (tasks.forfeited); 6: a device's public key
# (credentials.public_key); 7: the bytes of each task's frames (tasks.sent_bytes, tasks.sent_seed_form)
SCHEMA_VERSION = 7
UPGRADABLE = {"2", "3", "4", "5", "6"}  # versions whose upgrade only adds tables and nullable columns


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
    first_seen: Mapped[float] = mapped_column(Float, default=time.time)  # its first hello; never changed
    last_seen: Mapped[float] = mapped_column(Float, default=time.time)
    status: Mapped[str] = mapped_column(String(16), default="online")  # online | gone
    # Bytes of the websocket messages it sent (up) and was sent (down); None: seen before they were counted.
    bytes_up: Mapped[int | None] = mapped_column(BigInteger, nullable=True, default=0)
    bytes_down: Mapped[int | None] = mapped_column(BigInteger, nullable=True, default=0)


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
    # Why its device lost it for good (it broke the protocol, declined it, ...): never given back to it.
    forfeited: Mapped[str | None] = mapped_column(String(32), nullable=True)
    sent_at: Mapped[float] = mapped_column(Float, default=time.time)  # its latest send (a resent task: the resend)
    # The bytes of the task frames the coordinator sent for it (a resent task's sends summed), and whether the
    # latest carried the seed-form history instead of the dense adapter; written when its round ends. None: not
    # counted (a coordinator that stopped before the round ended, or one from before they were counted).
    sent_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    sent_seed_form: Mapped[bool | None] = mapped_column(Boolean, nullable=True)


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
    received_at: Mapped[float] = mapped_column(Float, default=time.time)  # when it arrived (and was accepted)


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
    """A device's enrolment: its Ed25519 public key (challenge-response), or, enrolled with `enrol --bearer`,
    the sha256 of its token (the token itself is never stored). `token_hash` names the credential either way
    (for a key, the sha256 of `ed25519:` and the key's hex): re-enrolling changes it, which cuts off a session."""
    __tablename__ = "credentials"
    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    public_key: Mapped[str | None] = mapped_column(String(64), nullable=True)  # raw 32 bytes in hex; None: a token
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class OperatorToken(Base):
    """A token that opens the operator's dashboard (read-only): its sha256, never the token itself."""
    __tablename__ = "operator_tokens"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class Metric(Base):
    __tablename__ = "metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    version: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
