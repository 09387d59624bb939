"""The downlink in seed form: a task that carries the versions since the one its device holds, as per-seed sums.

A device that keeps its adapter says which version it holds (its hello, then every task sent to
it); its next task may then carry each version since as the round's per-seed sums, which it
replays (fwdfed.update.replay), instead of the whole adapter. A version goes down dense where it
is no plain per-seed sum (dense parts, DP noise, the class-statistics head) or where its sums do
not replay to its stored sha256. docs/protocol.md, Downlink in seed form.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import numpy as np

from coordinator.store import Job, Store
from coordinator.strategies import AcceptedUpdate, Strategy
from fwdfed import protocol
from fwdfed.directions import task_kind
from fwdfed.update import SeedSums, replay

log = logging.getLogger("coordinator")


class Downlink:
    def __init__(self, store: Store, job: Job, held: dict[str, tuple[int, str]],
                 round_strategy: Callable[[int], Strategy]):
        self.store, self.job = store, job
        self.kind = task_kind(job.hparams)
        self.held = held  # the (version, sha256) each connected device that keeps its adapter holds
        self.round_strategy = round_strategy  # the strategy round n ran, whose version_sums say its seed form
        self._sums: dict[int, SeedSums | None] = {}  # each version's seed sums, made once (None: dense)

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
            if (sums := self.version_sums(number)) is None:
                return None
            steps.append(dict(version=number, seeds=sums.seeds, coefs=sums.coefs, shrink=sums.shrink,
                              block=list(sums.block or ())))
        return steps

    def version_sums(self, version: int) -> SeedSums | None:
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
        if rnd is None:
            return None
        block = (rnd.block_start, rnd.block_end) if rnd.block_start is not None else None
        sums = self.round_strategy(rnd.number).version_sums([AcceptedUpdate.from_row(row) for row in self.store.updates(rnd.id)], block)
        if sums is None:
            return None
        replayed = replay(np.frombuffer(before.vector, "<f4"), [sums], self.kind).astype("<f4").tobytes()
        if hashlib.sha256(replayed).hexdigest() != stored.sha256:
            log.warning("version %d: its seed sums do not replay to its sha256; its tasks go down dense", version)
            return None
        return sums
