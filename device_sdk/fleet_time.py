"""The emulated fleet's simulated time: its clock in wall time, each device's online windows, and the
order in which a worker's devices take their turns to train.

A device of speed s whose task trains for m measured seconds here spends s·m seconds of simulated
time on it. With `--time-scale S` every simulated second lasts S wall seconds, for the whole fleet
from one start: a device holds its update until S·s·m wall seconds after its task arrived, so that
the coordinator's deadline and over-selection meet slow devices as late as their speed makes them.
A worker trains its devices one at a time; the device whose update is due first trains first
(earliest deadline first), so that a fleet of many devices per core keeps to its simulated clock
with a smaller S than first come, first served would need. When a worker falls behind (a device's
training ends after its update was due) the update goes at once, and the lag is recorded.

Online windows (availability): each device is online, that is plugged in, idle and on Wi-Fi, the
state in which phones run federated tasks, for a share of every simulated day, from its own phase.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class FleetClock:
    """Simulated time 0 is wall time `start` (time.time(), the same for every worker); `scale` wall seconds per
    simulated second, None when simulated time is kept apart from wall time (only added up)."""
    start: float
    scale: float | None = None

    def now(self) -> float:
        """Simulated seconds since the start."""
        return (time.time() - self.start) / self.scale

    def wall(self, simulated: float) -> float:
        """The wall time (time.time()) of simulated time `simulated`."""
        return self.start + simulated * self.scale


@dataclass(frozen=True)
class Window:
    """Online for `share` of every `day` simulated seconds, from `phase` on: [phase + k·day, phase + k·day +
    share·day) for every integer k."""
    phase: float = 0.0
    share: float = 1.0
    day: float = 86400.0

    @property
    def always(self) -> bool:
        return self.share >= 1.0

    def online(self, t: float) -> bool:
        return self.always or math.fmod(t - self.phase, self.day) % self.day < self.share * self.day

    def next_change(self, t: float) -> float:
        """The simulated time after `t` at which the device next goes offline (if online at `t`) or online."""
        if self.always:
            return math.inf
        into = math.fmod(t - self.phase, self.day) % self.day
        return t + (self.share * self.day - into if into < self.share * self.day else self.day - into)


class Turns:
    """One device of a worker trains at a time: of those waiting, the one with the smallest `due` first (ties in
    the order they asked)."""

    def __init__(self):
        self._busy = False
        self._waiting: list = []
        self._order = itertools.count()

    @asynccontextmanager
    async def turn(self, due: float):
        if self._busy:
            future = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (due, next(self._order), future))
            try:
                await future  # the turn is handed over to it: _busy stays True
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():  # handed over just as it was cancelled: pass it on
                    self._hand_over()
                raise
        else:
            self._busy = True
        try:
            yield
        finally:
            self._hand_over()

    def _hand_over(self) -> None:
        while self._waiting:
            future = heapq.heappop(self._waiting)[2]
            if not future.done():  # a cancelled waiter's future is done
                future.set_result(None)
                return
        self._busy = False


@dataclass(frozen=True)
class Timing:
    """What the emulator gives every worker, the same for all (a worker's devices share a WorkerFleet made of it)."""
    spec_seed: int  # the profiles' seed: the dropouts' draws
    start: float  # wall time of simulated time 0
    scale: float | None  # --time-scale
    day: float = 86400.0  # --profile-day: the online windows' cycle, simulated seconds


class WorkerFleet:
    """The devices of one worker: their clock, their turns to train, the last measured training time (what the
    next task is expected to take, for the turns' order) and whether the job has ended."""

    def __init__(self, timing: Timing):
        self.timing = timing
        self.clock = FleetClock(timing.start, timing.scale)
        self.turns = Turns()
        self.typical_seconds = 0.0
        # Set when a device of this worker is told the job is done: its offline devices stop waiting for their
        # next window (the emulator's stand-in for the check-in that would tell each of them).
        self.done = asyncio.Event()
