"""The open round attempt as the coordinator holds it in memory: its row, its tasks, which of them have
an accepted update, and which are live in the current wave.

It is read from the store once, when the round opens or a restarted coordinator resumes it, and every
change is written through to the store before it is made here; so accepting an update reads nothing,
and the round loop checks its wave in constant time instead of reading every task of the round on each
arrival. An update's own row is written by coordinator.answers (batched, acked once committed): until its
commit lands, the task is `pending` here, neither answered nor free to be taken from its device.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from coordinator.store import Round, Store, Task


@dataclass(slots=True)
class HeldTask:
    """A task of the open round as the round holds it: a plain copy of its row. (A read of an ORM instance's
    attribute costs several times more, and accepting an update reads a few.)"""
    id: str
    round_id: int
    device_id: str
    wave: int
    hparams: dict
    abandoned_at: float | None
    forfeited: str | None
    sent_at: float | None

    @classmethod
    def of(cls, task: Task) -> HeldTask:
        return cls(task.id, task.round_id, task.device_id, task.wave, task.hparams, task.abandoned_at, task.forfeited,
                   task.sent_at)


class OpenRound:
    def __init__(self, store: Store, rnd: Round, tasks: list[Task] = (), answered: set[str] = frozenset()):
        self.store, self.rnd = store, rnd
        self.tasks: dict[str, HeldTask] = {}
        self.by_device: dict[str, list[HeldTask]] = {}
        self.answered = set(answered)
        self.pending: dict[str, asyncio.Future] = {}  # task id -> the commit of its update, under way
        self.live: set[str] = set()  # the current wave's tasks not abandoned
        self.unanswered: set[str] = set()  # of those, the ones without an accepted update
        self.assigned: set[str] = set()  # devices tasked in the current wave (never asked twice in one wave)
        # Cleared while the round aggregates its updates: an update for one of its tasks waits (the round may
        # close, making it late, or collect again), rather than being stored after the round read its updates.
        self.collecting = asyncio.Event()
        self.collecting.set()
        self.swept_at = 0.0  # the last look for tasked devices away too long (RoundEngine._abandon_away)
        self.accepted = self.refused = 0  # this process's acks, for the round's summary line
        for task in tasks:
            self._index(HeldTask.of(task))

    @classmethod
    def load(cls, store: Store, rnd: Round) -> OpenRound:
        return cls(store, rnd, store.tasks(rnd.id), store.answered(rnd.id))

    def _index(self, task: HeldTask) -> None:
        self.tasks[task.id] = task
        self.by_device.setdefault(task.device_id, []).append(task)
        if task.wave == self.rnd.wave:
            self.assigned.add(task.device_id)
            if task.abandoned_at is None:
                self.live.add(task.id)
                if task.id not in self.answered:
                    self.unanswered.add(task.id)

    def unanswered_of(self, device_id: str) -> list[HeldTask]:
        """The device's tasks (of any wave) that are neither answered, nor being answered, nor abandoned."""
        return [t for t in self.by_device.get(device_id, ())
                if t.abandoned_at is None and t.id not in self.answered and t.id not in self.pending]

    # ---- changes: the store first, then here ----
    def add_tasks(self, hparams_by_device: dict[str, dict]) -> list[HeldTask]:
        tasks = [HeldTask.of(task) for task in self.store.add_tasks(self.rnd.id, self.rnd.wave, hparams_by_device)]
        for task in tasks:
            self._index(task)
        return tasks

    async def mark_sent(self, sent: dict[str, float | None]) -> None:
        """Dated in a thread: a wave of thousands of sends is a long transaction, and nothing waits for it."""
        await asyncio.to_thread(self.store.mark_sent, sent)
        for task_id, at in sent.items():
            if at is not None:
                self.tasks[task_id].sent_at = at

    def abandon(self, task: HeldTask) -> None:
        self.store.abandon_task(task.id)
        task.abandoned_at = time.time()
        self._unlive(task)

    def forfeit(self, task: HeldTask, code: str) -> None:
        self.store.forfeit_task(task.id, code)
        task.abandoned_at, task.forfeited = time.time(), code
        self._unlive(task)

    def restore(self, task: HeldTask) -> HeldTask:
        self.store.restore_task(task.id)
        task.abandoned_at = None
        if task.wave == self.rnd.wave:
            self.live.add(task.id)
            if task.id not in self.answered:
                self.unanswered.add(task.id)
        return task

    def answer(self, task_id: str) -> None:
        """The task's update is committed (by coordinator.answers)."""
        self.answered.add(task_id)
        self.unanswered.discard(task_id)
        self.accepted += 1

    def drop_update(self, row) -> None:
        self.store.drop_update(row.id)
        self.answered.discard(row.task_id)

    def raise_target(self, target: int) -> None:
        self.rnd.target = self.store.raise_target(self.rnd.id, target).target

    def next_wave(self) -> Round:
        self.rnd = self.store.next_wave(self.rnd.id)
        self.live, self.unanswered, self.assigned = set(), set(), set()
        return self.rnd

    def _unlive(self, task: HeldTask) -> None:
        self.live.discard(task.id)
        self.unanswered.discard(task.id)

    async def settled(self) -> None:
        """Until every update under way has its commit's outcome."""
        if self.pending:
            await asyncio.wait(list(self.pending.values()))
