"""Device profiles for the emulator: a fleet that looks like phones, seeded and recorded.

Each logical device draws, from `--profile-seed` and its own id (so a device's profile does not
depend on the fleet's size or on which worker runs it):
- a compute speed multiplier (`--profile-speed LO:HI`, log-uniform): its simulated device clock
  advances by the measured training time of each task times the multiplier;
- a dropout probability per task (`--profile-dropout P`): the device drops its connection after
  training, before uploading, and reconnects, as a phone that loses its network mid-task;
- a memory budget (`--profile-mem LO:HI`, uniform, whole MiB), in place of `--mem`.
Data size skew is the partition's (`--size-skew`, runtime.data). Profiles are printed, and with
`--profile-out FILE` written, with each device's simulated clock, tasks and dropouts, as JSON.
"""

from __future__ import annotations

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

MIB = 1024 * 1024
log = logging.getLogger("device")


@dataclass(frozen=True)
class Profile:
    device_id: str
    speed: float = 1.0  # simulated seconds per measured second of training: 2.0 is a device twice as slow
    dropout: float = 0.0  # probability, per task, of dropping the connection before uploading
    mem_budget_bytes: int | None = None


@dataclass(frozen=True)
class ProfileSpec:
    """What the --profile-* flags ask for; `draw` turns it into each device's Profile."""
    seed: int = 0
    speed: tuple[float, float] = (1.0, 1.0)
    dropout: float = 0.0
    mem: tuple[int, int] | None = None  # bytes; None: every device has --mem

    def draw(self, device_id: str, default_mem: int | None) -> Profile:
        rng = np.random.default_rng([self.seed, zlib.crc32(device_id.encode())])
        low, high = self.speed
        speed = float(math.exp(rng.uniform(math.log(low), math.log(high)))) if high > low else low
        mem = default_mem
        if self.mem is not None:
            mem = int(rng.integers(self.mem[0] // MIB, self.mem[1] // MIB + 1)) * MIB
        return Profile(device_id=device_id, speed=speed, dropout=self.dropout, mem_budget_bytes=mem)


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

    if not (math.isfinite(args.profile_dropout) and 0 <= args.profile_dropout < 1):
        raise ValueError(f"--profile-dropout must be a probability in [0, 1), got {args.profile_dropout!r}")
    mem = parse_range(args.profile_mem, parse_size, "--profile-mem") if args.profile_mem else None
    if mem is not None and mem[0] < MIB:
        raise ValueError(f"--profile-mem: a budget must be at least 1 MiB, got {args.profile_mem!r}")
    seed = args.seed if args.profile_seed is None else args.profile_seed
    return ProfileSpec(seed=seed, speed=parse_range(args.profile_speed, speed, "--profile-speed"),
                       dropout=args.profile_dropout, mem=mem)


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
    g.add_argument("--profile-seed", type=int, help="seed of the profiles (default: --seed)")
    g.add_argument("--profile-out", type=Path, help="write every device's profile and simulated clock here (JSON)")


class DroppedOut(ConnectionClosed):
    """The profile dropped this device mid-task. A ConnectionClosed, so that Device.run reconnects, as
    after any lost connection; the task's update is never sent."""

    def __init__(self, device_id: str, task_id: str):
        super().__init__(None, None)
        self.what = f"{device_id} dropped out of task {task_id} (profile)"

    def __str__(self) -> str:
        return self.what


class ProfiledDevice(Device):
    """A Device that keeps a simulated clock at its profile's speed, and drops out of tasks with its
    profile's probability (drawn from the profile seed, its id, the round and its attempt, so a retried
    task may go through)."""

    def __init__(self, config, profile: Profile, spec_seed: int, **kwargs):
        super().__init__(config, **kwargs)
        self.profile, self.spec_seed = profile, spec_seed
        self.train_seconds = 0.0
        self.simulated_seconds = 0.0
        self.dropouts = 0
        self.attempts: dict[int, int] = {}

    def train(self, task):
        started = time.perf_counter()
        update = super().train(task)
        elapsed = time.perf_counter() - started
        self.train_seconds += elapsed
        self.simulated_seconds += elapsed * self.profile.speed
        attempt = self.attempts[task.round] = self.attempts.get(task.round, 0) + 1
        if self.profile.dropout > 0:
            rng = np.random.default_rng([self.spec_seed, zlib.crc32(self.config.device_id.encode()), task.round,
                                         attempt])
            if rng.random() < self.profile.dropout:
                self.dropouts += 1
                log.info("%s: dropping out of task %s before uploading (profile, attempt %d)", self.config.device_id,
                         task.task_id, attempt)
                raise DroppedOut(self.config.device_id, task.task_id)
        return update

    def record(self, updates_accepted: int) -> dict:
        return {**asdict(self.profile), "num_examples": self.num_examples, "updates_accepted": updates_accepted,
                "dropouts": self.dropouts, "train_seconds": round(self.train_seconds, 3),
                "simulated_seconds": round(self.simulated_seconds, 3)}


def write_record(path: Path, spec: ProfileSpec, records: list[dict]) -> None:
    path.write_text(json.dumps({"spec": asdict(spec), "devices": records}, indent=1) + "\n")
