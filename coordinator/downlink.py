"""The downlink in seed form: a task that carries the versions since the one its device holds, as per-seed sums.

A device that keeps its adapter says which version it holds (its hello, then every task sent to
it); its next task may then carry each version since as the round's per-seed sums (and, for a
version with a dense part, the float32 values of the span that part changed), which it replays
(fwdfed.update.replay), instead of the whole adapter. Each version's map is made once, in the
smaller of its wire forms (fwdfed.history), and checked by replaying it onto the stored version
before; a version goes down dense where it is no per-seed sum (DP noise, per-tensor scales) or
where its map does not replay to its stored sha256. docs/protocol.md, Downlink in seed form.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import numpy as np

from coordinator.job import JobOptions
from coordinator.store import Job, Store
from coordinator.strategies import AcceptedUpdate, Strategy
from fwdfed import protocol
from fwdfed.directions import task_kind
from fwdfed.history import entry, entry_sums
from fwdfed.update import SeedSums, pool_order, replay

log = logging.getLogger("coordinator")


class Downlink:
    def __init__(self, store: Store, job: Job, held: dict[str, tuple[int, str]],
                 round_strategy: Callable[[int], Strategy]):
        self.store, self.job = store, job
        self.kind = task_kind(job.hparams)
        options = JobOptions.from_json(job.options)
        # The job's seed pool, by whose index a version's sums may go packed (fwdfed.history)
        self.pool = None if options.seed_pool is None else pool_order(int(options.seed_pool_key, 16), options.seed_pool)
        self.held = held  # the (version, sha256) each connected device that keeps its adapter holds
        self.round_strategy = round_strategy  # the strategy round n ran, whose version_sums say its seed form
        self._entries: dict[int, dict | None] = {}  # each version's history map, made once (None: dense)

    def history(self, device_id: str, version: int) -> list[dict] | None:
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
            if (step := self.version_entry(number)) is None:
                return None
            steps.append(step)
        return steps

    def version_entry(self, version: int) -> dict | None:
        """How the round that made `version` changed the one before, as its history map, made once from its
        stored updates and checked by replaying the map onto the stored previous version: None (the version
        goes down dense) where it is no per-seed sum (DP noise, per-tensor scales) or where the replay does not
        give the stored version's sha256."""
        if version not in self._entries:
            self._entries[version] = self._replayable_entry(version)
        return self._entries[version]

    def _replayable_entry(self, version: int) -> dict | None:
        stored, before = self.store.version(self.job.id, version), self.store.version(self.job.id, version - 1)
        if stored is None or before is None:
            return None
        rnd = next((r for r in self.store.closed_round_list(self.job.id) if r.id == stored.round_id), None)
        if rnd is None:
            return None
        block = (rnd.block_start, rnd.block_end) if rnd.block_start is not None else None
        updates = [AcceptedUpdate.from_row(row) for row in self.store.updates(rnd.id)]
        sums = self.round_strategy(rnd.number).version_sums(updates, block)
        if sums is None:
            return None
        step = entry(version, sums, self.pool)
        pool = None if self.pool is None else self.pool.seeds
        try:  # the map as a device reads it: the same unpacking, the same replay
            replayed = replay(np.frombuffer(before.vector, "<f4"), [entry_sums(step, pool)], self.kind)
        except ValueError as e:
            log.warning("version %d: its history map cannot be replayed (%s); its tasks go down dense", version, e)
            return None
        target = np.frombuffer(stored.vector, "<f4")
        if sums.dense_part:  # the values the sums do not give: the span from the first to the last, as stored
            differ = np.flatnonzero(replayed.view(np.uint32) != target.view(np.uint32))
            if differ.size:
                start, stop = int(differ[0]), int(differ[-1]) + 1
                step = entry(version, SeedSums(sums.seeds, sums.coefs, sums.shrink, sums.block, start,
                                               target[start:stop].copy()), self.pool)
                sent = entry_sums(step, pool)  # its span as a device reads it, set as replay sets it
                replayed = replay(replayed, [SeedSums([], [], 0.0, None, sent.span_start, sent.span)], self.kind)
        if hashlib.sha256(replayed.astype("<f4").tobytes()).hexdigest() != stored.sha256:
            log.warning("version %d: its seed sums do not replay to its sha256; its tasks go down dense", version)
            return None
        return step
