"""Device profiles for the emulator: a fleet that looks like phones, seeded and recorded.

Each logical device draws, from `--profile-seed` and its own id (so a device's profile does not
depend on the fleet's size or on which worker runs it):
- a compute speed multiplier (`--profile-speed LO:HI`, log-uniform): its simulated device clock
  advances by the measured training time of each task times the multiplier, and with
  `--time-scale S` it holds each update until its simulated time has passed, S wall seconds per
  simulated second (device_sdk.fleet_time);
- a dropout probability per task (`--profile-dropout P`): the device drops its connection after
  training, before uploading, and reconnects, as a phone that loses its network mid-task;
- a memory budget (`--profile-mem LO:HI`, uniform, whole MiB), in place of `--mem`;
- an online window (`--profile-online LO:HI`, the share of each simulated day, `--profile-day`, it
  is plugged in, idle and on Wi-Fi, uniform; its phase uniform over the day): offline, it is not
  connected; a task it has not uploaded when its window ends is lost; it comes back at its next window.
Data size skew is the partition's (`--size-skew`, runtime.data). Profiles are printed, and with
`--profile-out FILE` written, with each device's simulated clock and tasks, as JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from websockets.exceptions import ConnectionClosed

from device_sdk.client import Device
from device_sdk.fleet_time import Window, WorkerFleet
from fwdfed import protocol

MIB = 1024 * 1024
log = logging.getLogger("device")


@dataclass(frozen=True)
class Profile:
    device_id: str
    speed: float = 1.0  # simulated seconds per measured second of training: 2.0 is a device twice as slow
    dropout: float = 0.0  # probability, per task, of dropping the connection before uploading
    mem_budget_bytes: int | None = None
    online_share: float = 1.0  # of every simulated day; 1: always online
    online_phase: float = 0.0  # simulated seconds into the day at which its window opens


@dataclass(frozen=True)
class ProfileSpec:
    """What the --profile-* flags ask for; `draw` turns it into each device's Profile."""
    seed: int = 0
    speed: tuple[float, float] = (1.0, 1.0)
    dropout: float = 0.0
    mem: tuple[int, int] | None = None  # bytes; None: every device has --mem
    online: tuple[float, float] = (1.0, 1.0)  # share of the day online
    day: float = 86400.0  # simulated seconds

    def draw(self, device_id: str, default_mem: int | None) -> Profile:
        rng = np.random.default_rng([self.seed, zlib.crc32(device_id.encode())])
        low, high = self.speed
        speed = float(math.exp(rng.uniform(math.log(low), math.log(high)))) if high > low else low
        mem = default_mem
        if self.mem is not None:
            mem = int(rng.integers(self.mem[0] // MIB, self.mem[1] // MIB + 1)) * MIB
        # Drawn after the others, so that a fleet's speeds and budgets are what they were before windows existed.
        share, phase = self.online[0], 0.0
        if self.online != (1.0, 1.0):
            share, phase = float(rng.uniform(*self.online)), float(rng.uniform(0, self.day))
        return Profile(device_id=device_id, speed=speed, dropout=self.dropout, mem_budget_bytes=mem,
                       online_share=share, online_phase=phase)


def parse_range(text: str, parse, name: str) -> tuple:
    """'LO:HI' (or one value for both) through `parse`; ValueError with the flag's name otherwise."""
    parts = text.split(":")
    if len(parts) not in (1, 2):
        raise ValueError(f"{name} must be LO:HI or one value, got {text!r}")
    try:
        low, high = (parse(p) for p in (parts * 2)[:2]) if len(parts) == 1 else (parse(p) for p in parts)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if not low <= high:
        raise ValueError(f"{name}: LO must not exceed HI, got {text!r}")
    return low, high


def spec_of(args) -> ProfileSpec:
    """The profile flags, checked; ValueError with a one-line reason."""
    from fwdfed.memory import parse_size

    def speed(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"a speed multiplier must be a number > 0, got {text!r}")
        return value

    def share(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0 < value <= 1:
            raise ValueError(f"an online share must be a number in (0, 1], got {text!r}")
        return value

    if not (math.isfinite(args.profile_dropout) and 0 <= args.profile_dropout < 1):
        raise ValueError(f"--profile-dropout must be a probability in [0, 1), got {args.profile_dropout!r}")
    mem = parse_range(args.profile_mem, parse_size, "--profile-mem") if args.profile_mem else None
    if mem is not None and mem[0] < MIB:
        raise ValueError(f"--profile-mem: a budget must be at least 1 MiB, got {args.profile_mem!r}")
    if args.time_scale is not None and not (math.isfinite(args.time_scale) and args.time_scale > 0):
        raise ValueError(f"--time-scale must be a number of wall seconds per simulated second > 0, "
                         f"got {args.time_scale!r}")
    if not (math.isfinite(args.profile_day) and args.profile_day > 0):
        raise ValueError(f"--profile-day must be a number of simulated seconds > 0, got {args.profile_day!r}")
    online = parse_range(args.profile_online, share, "--profile-online")
    if online != (1.0, 1.0) and args.time_scale is None:
        raise ValueError("--profile-online needs --time-scale: the windows are in simulated time, which runs in "
                         "wall time only at a scale")
    seed = args.seed if args.profile_seed is None else args.profile_seed
    return ProfileSpec(seed=seed, speed=parse_range(args.profile_speed, speed, "--profile-speed"),
                       dropout=args.profile_dropout, mem=mem, online=online, day=args.profile_day)


def add_profile_arguments(parser) -> None:
    g = parser.add_argument_group("device profiles (seeded: each device's from --profile-seed and its id)")
    g.add_argument("--profile-speed", default="1", metavar="LO:HI",
                   help="compute speed multiplier per device, log-uniform in [LO, HI] (2 = twice as slow): the "
                        "simulated device clock advances by measured training time x multiplier (default 1)")
    g.add_argument("--profile-dropout", type=float, default=0.0, metavar="P",
                   help="probability per task that a device drops its connection after training, before "
                        "uploading, and reconnects (default 0)")
    g.add_argument("--profile-mem", metavar="LO:HI",
                   help="memory budget per device, uniform in [LO, HI] in whole MiB, e.g. 800MB:2GB (default: --mem)")
    g.add_argument("--profile-online", default="1", metavar="LO:HI",
                   help="share of each simulated day a device is online (plugged in, idle, on Wi-Fi), uniform in "
                        "[LO, HI] per device, from a phase uniform over the day; offline it is not connected "
                        "(default 1: always; needs --time-scale)")
    g.add_argument("--profile-day", type=float, default=86400.0, metavar="SECONDS",
                   help="the length of the online cycle in simulated seconds (default 86400, a day)")
    g.add_argument("--time-scale", type=float, metavar="S",
                   help="wall seconds per simulated second: each device holds its update until its simulated "
                        "training time (measured x speed) has passed at this scale, so that the coordinator's "
                        "deadline meets slow devices (default: none, updates go as soon as trained)")
    g.add_argument("--profile-seed", type=int, help="seed of the profiles (default: --seed)")
    g.add_argument("--profile-out", type=Path,
                   help="write every device's profile, simulated clock and tasks here (JSON)")


class DroppedOut(ConnectionClosed):
    """The profile dropped this device mid-task, or its online window ended before it uploaded. A ConnectionClosed,
    so that Device.run reconnects (at once, or at its next window), as after any lost connection; the task's
    update is never sent."""

    def __init__(self, what: str):
        super().__init__(None, None)
        self.what = what

    def __str__(self) -> str:
        return self.what


class JobEnded(Exception):
    """Another device of the worker was told the job is done while this one was reaching the coordinator, which has
    gone since and would never answer."""


class ProfiledDevice(Device):
    """A Device that keeps a simulated clock at its profile's speed (and with a time scale, holds each update
    until its simulated time has passed), drops out of tasks with its profile's probability (drawn from the
    profile seed, its id, the round and its attempt, so a retried task may go through), and is connected only in
    its online windows. Every task it trained is recorded, with what became of it."""

    def __init__(self, config, profile: Profile, fleet: WorkerFleet, **kwargs):
        super().__init__(config, **kwargs)
        self.profile, self.fleet = profile, fleet
        self.window = Window(profile.online_phase, profile.online_share, fleet.timing.day)
        self.train_seconds = 0.0
        self.simulated_seconds = 0.0
        self.last_seconds = 0.0
        self.dropouts = 0
        self.attempts: dict[int, int] = {}
        self.tasks: dict[str, dict] = {}  # task id -> its latest attempt's record

    # ---- online windows ----
    def offline_at(self) -> float:
        """The wall time at which this device's current window ends (inf: always online)."""
        if self.window.always:
            return math.inf
        return self.fleet.clock.wall(self.window.next_change(self.fleet.clock.now()))

    async def before_connect(self) -> bool:
        clock = self.fleet.clock
        if not self.window.always and not self.window.online(now := clock.now()):
            opens = clock.wall(self.window.next_change(now))
            log.info("%s: offline until simulated %.0f s", self.config.device_id, self.window.next_change(now))
            try:
                await asyncio.wait_for(self.fleet.done.wait(), timeout=max(0.0, opens - time.time()))
            except TimeoutError:
                pass
        return not self.fleet.done.is_set()

    async def run(self) -> int:
        try:
            return await super().run()
        except JobEnded:
            return self.tasks_done

    async def _connect(self):
        """Device._connect, given up when the worker hears that the job is done (a device reconnecting after a
        dropout, or at its window, as the job ends)."""
        connecting = asyncio.ensure_future(super()._connect())
        ended = asyncio.ensure_future(self.fleet.done.wait())
        await asyncio.wait({connecting, ended}, return_when=asyncio.FIRST_COMPLETED)
        ended.cancel()
        if connecting.done():
            return connecting.result()
        connecting.cancel()
        raise JobEnded

    async def receive(self, ws):
        if self.window.always:
            return await ws.recv()
        try:
            return await asyncio.wait_for(ws.recv(), timeout=max(0.0, self.offline_at() - time.time()))
        except TimeoutError:
            raise DroppedOut(f"{self.config.device_id}: its online window ended") from None

    async def _session(self, ws) -> bool:
        done = await super()._session(ws)
        if done:
            self.fleet.done.set()
        return done

    # ---- a task ----
    def train(self, task):
        started = time.perf_counter()
        update = super().train(task)
        self.last_seconds = time.perf_counter() - started
        self.train_seconds += self.last_seconds
        self.simulated_seconds += self.last_seconds * self.profile.speed
        return update

    async def run_task(self, task: protocol.Task) -> protocol.Update:
        received, scale = time.time(), self.fleet.clock.scale
        # Earliest due first: by the worker's last measured training time (before any, 1 s: by speed alone).
        due = received + (scale * self.profile.speed * (self.fleet.typical_seconds or 1.0) if scale else 0.0)
        async with self.fleet.turns.turn(due):
            update = await asyncio.to_thread(self.train_with_program, task)
        self.fleet.typical_seconds = self.last_seconds
        attempt = self.attempts[task.round] = self.attempts.get(task.round, 0) + 1
        record = self.tasks[task.task_id] = {
            "round": task.round, "attempt": attempt, "train_seconds": round(self.last_seconds, 4),
            "simulated_seconds": round(self.last_seconds * self.profile.speed, 4), "outcome": "sent"}
        if scale is not None:
            release = received + scale * self.profile.speed * self.last_seconds
            record["lag_seconds"] = round(max(0.0, time.time() - release), 3)  # the worker fell behind
            offline_at = self.offline_at()
            if (wait := min(release, offline_at) - time.time()) > 0:
                await asyncio.sleep(wait)
            if offline_at < release:
                record["outcome"] = "offline"
                raise DroppedOut(f"{self.config.device_id}: its online window ended during task {task.task_id}")
        if self.profile.dropout > 0:
            rng = np.random.default_rng([self.fleet.timing.spec_seed, zlib.crc32(self.config.device_id.encode()),
                                         task.round, attempt])
            if rng.random() < self.profile.dropout:
                self.dropouts += 1
                record["outcome"] = "dropped"
                log.info("%s: dropping out of task %s before uploading (profile, attempt %d)", self.config.device_id,
                         task.task_id, attempt)
                raise DroppedOut(f"{self.config.device_id} dropped out of task {task.task_id} (profile)")
        return update

    def acknowledged(self, ack: protocol.Ack) -> None:
        super().acknowledged(ack)
        if (record := self.tasks.get(ack.task_id)) is not None:
            record["outcome"] = "accepted" if ack.accepted else ack.reason.split(":")[0]  # the refusal's code

    def record(self, updates_accepted: int) -> dict:
        tasks = list(self.tasks.values())
        return {**asdict(self.profile), "num_examples": self.num_examples, "updates_accepted": updates_accepted,
                "late": sum(t["outcome"] == "late" for t in tasks), "dropouts": self.dropouts,
                "went_offline": sum(t["outcome"] == "offline" for t in tasks),
                "train_seconds": round(self.train_seconds, 3), "simulated_seconds": round(self.simulated_seconds, 3),
                "tasks": tasks}


def write_record(path: Path, spec: ProfileSpec, time_scale: float | None, workers: list[dict]) -> None:
    """The profiles' spec, the time scale, each worker (its node, pid, peak RSS, devices) and each device's record."""
    devices = sorted((r for w in workers for r in w["devices"]), key=lambda r: r["device_id"])
    summary = [{k: v for k, v in w.items() if k != "devices"} | {"devices": len(w["devices"])} for w in workers]
    path.write_text(json.dumps({"spec": asdict(spec), "time_scale": time_scale, "workers": summary,
                                "devices": devices}, indent=1) + "\n")
