"""The coordinator's queries: one short transaction per change, or per batch of the changes devices make
(`commit_batch`, coordinator.group_commit), so that each acknowledged change is durable before its ack is
sent (an accepted update is stored before its ack)."""

from __future__ import annotations

import hashlib
import math
import secrets
import time
import uuid
from operator import itemgetter

import msgpack
import numpy as np
from sqlalchemy import bindparam, func, insert, literal_column, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Insert

from coordinator.store.schema import (AdapterVersion, Credential, Device, Job, Metric, OperatorToken, Refusal, Round,
                                      Task, UpdateRow)


def adapter_bytes(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def token_hash(token: str) -> str:
    """What the store keeps of a credential: the sha256 of its token."""
    return sha256(token.encode())


def key_hash(public_key_hex: str) -> str:
    """What names a key credential among a device's credentials (re-enrolling changes it)."""
    return sha256(f"ed25519:{public_key_hex}".encode())


def metric_rows(job_id: str, version: int, metrics: dict[str, float]) -> list[Metric]:
    """The finite metrics as rows. SQLite stores NaN as NULL, which metrics.value refuses: a non-finite
    value is left out (the coordinator records it as a refusal first), never a failed transaction."""
    return [Metric(job_id=job_id, version=version, name=name, value=float(value))
            for name, value in metrics.items() if math.isfinite(value)]


def executemany(conn, statement, rows: list[dict]) -> None:
    """`statement` once per row (each a dict of its bound values), through the driver's own executemany.
    For the rows of a fleet's batches, thousands a second, SQLAlchemy's processing of each row's parameters
    costs more than the database's insert; these need none: their values are numbers, strings and bytes,
    which SQLite and psycopg take as they are. PostgreSQL takes inserted rows through COPY."""
    if isinstance(statement, Insert):
        if conn.dialect.name == "postgresql":
            return copy_rows(conn, statement.table, rows)
        statement = statement.inline()  # no RETURNING of the new keys, which nobody reads
    compiled = statement.compile(dialect=conn.dialect, column_keys=list(rows[0]))
    order = compiled.positiontup  # the parameters' order where the driver's are positional (SQLite's ?)
    if order:
        rows = list(map(itemgetter(*order), rows)) if len(order) > 1 else [(row[order[0]],) for row in rows]
    conn.exec_driver_sql(str(compiled), rows)


def copy_rows(conn, table, rows: list[dict]) -> None:
    """Insert `rows` (dicts of the same columns) into `table` with PostgreSQL's COPY: for a batch of updates,
    a third of executemany's CPU in this process and half its time in the server's (benchmarks/coordinator_load.py).
    The columns left out take their server-side defaults, as with an INSERT; a violated constraint fails the
    whole COPY, raised as SQLAlchemy's error for it (IntegrityError for a second update of a task)."""
    columns, quoted = list(rows[0]), conn.dialect.identifier_preparer
    command = f"COPY {quoted.format_table(table)} ({', '.join(map(quoted.quote, columns))}) FROM STDIN"
    cursor = conn.connection.dbapi_connection.cursor()
    try:
        with cursor.copy(command) as copy:
            for row in rows:
                copy.write_row([row[c] for c in columns])
    except conn.dialect.loaded_dbapi.Error as e:
        raise DBAPIError.instance(command, None, e, conn.dialect.loaded_dbapi.Error) from e
    finally:
        cursor.close()


class Store:
    def __init__(self, engine):
        self.engine = engine

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

    def add_traffic(self, counts: dict[str, tuple[int, int] | list[int]]) -> None:
        """Add (bytes up, bytes down) to each device's totals, in one transaction: one statement executed for
        every device (executemany), as a fleet of thousands sends them every second."""
        devices, zero = Device.__table__.c, literal_column("0")
        statement = (update(Device.__table__).where(devices.id == bindparam("device"))
                     .values(bytes_up=func.coalesce(devices.bytes_up, zero) + bindparam("up"),
                             bytes_down=func.coalesce(devices.bytes_down, zero) + bindparam("down")))
        with self.engine.begin() as conn:
            executemany(conn, statement, [dict(device=d, up=up, down=down) for d, (up, down) in counts.items()])

    def devices(self) -> list[Device]:
        with self.session() as s:
            return list(s.scalars(select(Device).order_by(Device.id)))

    # ---- credentials ----
    def enrol(self, device_id: str) -> str:
        """Issue a new bearer token for `device_id` (replacing and so revoking any earlier credential); returns it.
        Only `serve --allow-bearer` accepts one: `enrol_key` is the credential that cannot be replayed."""
        token = secrets.token_urlsafe(32)
        with self.session() as s, s.begin():
            s.merge(Credential(device_id=device_id, token_hash=token_hash(token), public_key=None,
                               created_at=time.time(), revoked_at=None))
        return token

    def enrol_key(self, device_id: str, public_key_hex: str) -> None:
        """Record `device_id`'s Ed25519 public key (raw, hex) as its credential, replacing any earlier one."""
        with self.session() as s, s.begin():
            s.merge(Credential(device_id=device_id, token_hash=key_hash(public_key_hex), public_key=public_key_hex,
                               created_at=time.time(), revoked_at=None))

    def device_key(self, device_id: str) -> tuple[str | None, str] | None:
        """(public key hex or None for a token, the credential's token_hash) of an unrevoked credential, or None."""
        with self.session() as s:
            credential = s.get(Credential, device_id)
        if credential is None or credential.revoked_at is not None:
            return None
        return credential.public_key, credential.token_hash

    def revoke(self, device_id: str) -> bool:
        """Revoke the device's credential; False if it has none or it is already revoked."""
        with self.session() as s, s.begin():
            credential = s.get(Credential, device_id)
            if credential is None or credential.revoked_at is not None:
                return False
            credential.revoked_at = time.time()
            return True

    def authenticate(self, token: str) -> str | None:
        """The device a valid, unrevoked bearer token belongs to, or None (never a key's credential: a public
        key is public, so its hash must not open the door as a token would)."""
        with self.session() as s:
            credential = s.scalars(select(Credential).where(Credential.token_hash == token_hash(token),
                                                            Credential.public_key.is_(None))).first()
        return credential.device_id if credential is not None and credential.revoked_at is None else None

    def superseded(self, held: dict[str, str]) -> set[str]:
        """Those devices of `held` (device id -> the sha256 of the token it connected with) whose token
        is no longer their valid credential: revoked, removed, or replaced by re-enrolling."""
        with self.session() as s:
            valid = set(s.execute(select(Credential.device_id, Credential.token_hash)
                                  .where(Credential.device_id.in_(list(held)), Credential.revoked_at.is_(None))))
        return {device_id for device_id, digest in held.items() if (device_id, digest) not in valid}

    def credentials(self) -> list[Credential]:
        with self.session() as s:
            return list(s.scalars(select(Credential).order_by(Credential.device_id)))

    def issue_operator_token(self, name: str) -> str:
        """A new token that opens the dashboard, replacing (and so revoking) `name`'s earlier one."""
        token = secrets.token_urlsafe(32)
        with self.session() as s, s.begin():
            s.merge(OperatorToken(name=name, token_hash=sha256(token.encode()), created_at=time.time()))
        return token

    def operator(self, token: str) -> str | None:
        """The name of the operator a valid token belongs to, or None."""
        with self.session() as s:
            return s.scalars(select(OperatorToken.name)
                             .where(OperatorToken.token_hash == sha256(token.encode()))).first()

    def abandon_task(self, task_id: str) -> None:
        with self.session() as s, s.begin():
            s.get(Task, task_id).abandoned_at = time.time()

    def forfeit_task(self, task_id: str, code: str) -> None:
        """Take a task from its device for good (`code`: why); it goes to another device, never back to it."""
        with self.session() as s, s.begin():
            task = s.get(Task, task_id)
            task.abandoned_at, task.forfeited = time.time(), code

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
            s.add_all(metric_rows(rnd.job_id, version, metrics))
        return version

    def add_metrics(self, job_id: str, version: int, metrics: dict[str, float]) -> None:
        with self.session() as s, s.begin():
            s.add_all(metric_rows(job_id, version, metrics))

    def metrics(self, job_id: str) -> list[Metric]:
        with self.session() as s:
            return list(s.scalars(select(Metric).where(Metric.job_id == job_id).order_by(Metric.version, Metric.id)))

    # ---- tasks and updates ----
    def add_tasks(self, round_id: int, wave: int, hparams_by_device: dict[str, dict]) -> list[Task]:
        """New tasks for these devices, stored in one transaction before any is sent (`mark_sent` dates each send)."""
        now = time.time()
        tasks = [Task(id=uuid.uuid4().hex, round_id=round_id, device_id=d, wave=wave, hparams=h, abandoned_at=None,
                      forfeited=None, sent_at=now) for d, h in hparams_by_device.items()]
        with self.session() as s, s.begin():
            s.add_all(tasks)
        return tasks

    def mark_sent(self, sent: dict[str, float | None]) -> None:
        """Each task's sent_at: when it went to its device (its latest send); None: it was not sent."""
        rows = [{"task": task_id, "at": at} for task_id, at in sent.items() if at is not None]
        if rows:
            with self.engine.begin() as conn:
                executemany(conn, update(Task.__table__).where(Task.__table__.c.id == bindparam("task"))
                            .values(sent_at=bindparam("at")), rows)

    def add_sent_bytes(self, frames: dict[str, tuple[int, bool]]) -> None:
        """Each task's frames as the coordinator sent them: (bytes, summed over its sends; whether the latest carried
        the seed-form history), added to what an earlier process of the job counted for it; one transaction."""
        if not frames:
            return
        tasks = Task.__table__
        with self.engine.begin() as conn:
            executemany(conn, update(tasks).where(tasks.c.id == bindparam("task"))
                        .values(sent_bytes=func.coalesce(tasks.c.sent_bytes, literal_column("0")) + bindparam("size"),
                                sent_seed_form=bindparam("seed_form")),
                        [{"task": t, "size": size, "seed_form": seed_form} for t, (size, seed_form) in frames.items()])

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

    def commit_batch(self, presence: dict[str, dict], updates: list[dict], refusals: list[dict]) -> None:
        """coordinator.group_commit's batch, in one transaction: devices come or gone (each device's latest
        `status`, with a hello's `num_examples` and `mem_budget_bytes`: a device not yet known is stored then),
        accepted updates' rows and refusals' rows (their columns), in order. IntegrityError if a task
        already has an update."""
        now = time.time()
        devices = Device.__table__
        with self.engine.begin() as conn:
            if presence:
                known = set(conn.scalars(select(devices.c.id).where(devices.c.id.in_(list(presence)))))
                new = [dict(id=device_id, first_seen=now, last_seen=now, bytes_up=0, bytes_down=0, **seen)
                       for device_id, seen in presence.items() if device_id not in known and "num_examples" in seen]
                if new:
                    executemany(conn, insert(devices), new)
                for fields in (("status",), ("status", "num_examples", "mem_budget_bytes")):
                    rows = [{"device": device_id, "seen": now, **{f"new_{f}": seen[f] for f in fields}}
                            for device_id, seen in presence.items() if device_id in known and set(seen) == set(fields)]
                    if rows:
                        executemany(conn, update(devices).where(devices.c.id == bindparam("device"))
                                    .values(last_seen=bindparam("seen"), **{f: bindparam(f"new_{f}") for f in fields}),
                                    rows)
            if updates:
                executemany(conn, insert(UpdateRow.__table__), updates)
            if refusals:
                executemany(conn, insert(Refusal.__table__), refusals)

    def update_figures(self, job_id: str) -> list:
        """Every update of the job without its pairs or dense part: round_id, device_id, num_pairs,
        num_examples, loss_before, loss_after, peak_rss_bytes (what reports count)."""
        with self.session() as s:
            return list(s.execute(
                select(UpdateRow.round_id, UpdateRow.device_id, UpdateRow.num_pairs, UpdateRow.num_examples,
                       UpdateRow.loss_before, UpdateRow.loss_after, UpdateRow.peak_rss_bytes)
                .join(Round, Round.id == UpdateRow.round_id).where(Round.job_id == job_id).order_by(UpdateRow.id)))

    def drop_update(self, update_id: int) -> None:
        """Take an accepted update back out of its round (the aggregate refused it; a refusal says why)."""
        with self.session() as s, s.begin():
            s.delete(s.get(UpdateRow, update_id))

    def answered(self, round_id: int) -> set[str]:
        """Ids of the round's tasks that have an accepted update (without loading the updates)."""
        with self.session() as s:
            return set(s.scalars(select(UpdateRow.task_id).where(UpdateRow.round_id == round_id)))

    def updates(self, round_id: int) -> list[UpdateRow]:
        with self.session() as s:
            return list(s.scalars(select(UpdateRow).where(UpdateRow.round_id == round_id).order_by(UpdateRow.id)))
