"""The coordinator's per-device writes, committed in batches (group commit): the answers to updates, and
devices coming and going.

Every write is an entry. A writer commits, in one transaction and in a thread off the event loop, all
the entries that came while its previous transaction was being committed: under load a batch holds
the writes of the last few milliseconds, and one commit (one fsync) stores them all. An entry's outcome
is known only after that commit, and is what the device is told:

- An `Answer`: an update that passed the checks, or a refusal. An update is acked as accepted only once
  its row is committed, so a coordinator killed at any moment has lost no update it acked, and the
  resumed round counts each once. With credentials on, the batch first reads whether each of its devices
  still holds a valid credential (one query for the batch): the update of a device revoked before is
  refused `revoked`, which wins over every other code but `other_job` (docs/protocol.md).
- A `Presence`: a device's hello (stored, or marked online again, before its welcome: its tasks refer to
  its row) or its departure (marked gone; nobody waits for it). A device's latest presence in a batch wins.

A batch that cannot be committed stores nothing and acks nothing as accepted: each update in it is
refused `not_stored` (its device keeps the task and may send it again), a refusal keeps its own code
(its record is lost, and logged), and a hello fails. A database that cannot be written at all (SQLAlchemy's
OperationalError: a full disk, a server gone, a lock held past its timeout) is also reported to `failed`,
which stops the job (coordinator.server): serving again on the same database resumes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
from sqlalchemy.exc import IntegrityError, OperationalError

from coordinator.store import Store
from fwdfed.errors import first_line

log = logging.getLogger("coordinator")

REVOKED = "this device's credential was revoked, or replaced by enrolling the device again"
DUPLICATE = ("duplicate", "this task already has an accepted update")


@dataclass
class Answer:
    device_id: str
    credential: str | None  # the token_hash the device connected with, when credentials are required
    update: dict | None = None  # the row (coordinator.store.UpdateRow's columns) of an update the checks let through
    refusal: tuple[str, str] | None = None  # (code, reason) of an update the checks refused


@dataclass
class Presence:
    device_id: str
    online: bool
    num_examples: int | None = None  # a hello's: the device's row is stored, or updated, with them
    mem_budget_bytes: int | None = None


Outcome = tuple[str, str] | None  # None: stored (an update: accepted); else (code, reason)


def update_row(task, pairs: list[tuple[int, float]], scale: float, num_examples: int, loss_before: float,
               loss_after: float, peak_rss_bytes: int, dense: bytes) -> dict:
    """An update's row, as the batch inserts it."""
    return dict(task_id=task.id, round_id=task.round_id, device_id=task.device_id, pairs=msgpack.packb(pairs),
                num_pairs=len(pairs), scale=scale, dense=dense or None, num_examples=num_examples,
                loss_before=loss_before, loss_after=loss_after, peak_rss_bytes=peak_rss_bytes, received_at=time.time())


class GroupCommit:
    def __init__(self, store: Store, job_id: str, failed: Callable[[OperationalError], None] | None = None):
        self.store, self.job_id = store, job_id
        self.failed = failed  # told, on the event loop, of a database that cannot be written
        self.failure: OperationalError | None = None  # the last such error of a batch (set in the writer's thread)
        self.queue: list[tuple[Answer | Presence, asyncio.Future, Callable | None]] = []
        self.wake: asyncio.Event | None = None
        self.writer: asyncio.Task | None = None
        self.writing: list[asyncio.Future] = []  # the futures of the batch being committed

    def submit(self, entry: Answer | Presence, settle=None) -> asyncio.Future:
        """The entry's outcome, once the batch holding it is committed (or failed). `settle(outcome)` is called
        first, whatever becomes of the future's awaiter."""
        loop = asyncio.get_running_loop()
        if self.writer is None or self.writer.get_loop() is not loop:  # started by the first entry, in its loop
            self.wake = asyncio.Event()
            self.writer = loop.create_task(self._write_batches())
        future = loop.create_future()
        self.queue.append((entry, future, settle))
        self.wake.set()
        return future

    async def _write_batches(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            batch, self.queue = self.queue, []
            self.writing = [future for _, future, _ in batch]
            outcomes = await asyncio.to_thread(self.write, [entry for entry, _, _ in batch])
            if self.failure is not None and self.failed is not None:
                self.failed(self.failure)
            for (_, future, settle), outcome in zip(batch, outcomes):
                if settle is not None:
                    settle(outcome)
                if not future.done():
                    future.set_result(outcome)

    async def drain(self) -> None:
        """Until every entry submitted so far is written (or failed)."""
        if waiting := [f for f in self.writing if not f.done()] + [future for _, future, _ in self.queue]:
            await asyncio.wait(waiting)

    def write(self, entries: list[Answer | Presence]) -> list[Outcome]:
        """Commit the entries in one transaction; their outcomes, in order."""
        try:
            return self._commit(entries)
        except IntegrityError:
            # A row the store already holds (a task answered by another process on this database): each
            # entry alone then, so that only that one is refused.
            if len(entries) == 1:
                entry = entries[0]
                return [DUPLICATE if isinstance(entry, Answer) and entry.update is not None else self._failed(entry)]
            return [self.write([entry])[0] for entry in entries]
        except Exception as e:  # the database failed (locked past its timeout, gone, full): nothing stored
            if isinstance(e, OperationalError):
                self.failure = e
            log.error("could not store %d writes of devices: %s", len(entries), first_line(e))
            return [self._failed(entry, type(e).__name__) for entry in entries]

    @staticmethod
    def _failed(entry: Answer | Presence, cause: str = "IntegrityError") -> Outcome:
        if isinstance(entry, Answer) and entry.refusal is not None:
            return entry.refusal
        return "not_stored", f"the coordinator could not store it ({cause}); nothing was kept: send it again"

    def _commit(self, entries: list[Answer | Presence]) -> list[Outcome]:
        answers = [e for e in entries if isinstance(e, Answer)]
        held = {e.device_id: e.credential for e in answers if e.credential is not None}
        revoked = self.store.superseded(held) if held else set()
        presence: dict[str, dict] = {}
        outcomes, rows, refusals = [], [], []
        for entry in entries:
            if isinstance(entry, Presence):
                seen = presence.setdefault(entry.device_id, {})
                seen["status"] = "online" if entry.online else "gone"
                if entry.num_examples is not None:
                    seen.update(num_examples=entry.num_examples, mem_budget_bytes=entry.mem_budget_bytes)
                outcomes.append(None)
                continue
            outcome = entry.refusal
            if entry.device_id in revoked and (outcome is None or outcome[0] != "other_job"):
                outcome = ("revoked", REVOKED)
            if outcome is None:
                rows.append(entry.update)
            else:
                refusals.append(dict(job_id=self.job_id, device_id=entry.device_id, code=outcome[0],
                                     reason=outcome[1][:1024], at=time.time()))
            outcomes.append(outcome)
        self.store.commit_batch(presence, rows, refusals)
        return outcomes
