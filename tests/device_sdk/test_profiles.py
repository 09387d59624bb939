"""Device profiles (device_sdk.profiles): seeded draws, and the flags' one-line errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from websockets.exceptions import ConnectionClosed

from device_sdk.client import Device
from device_sdk.emulate import parse_args
from device_sdk.profiles import MIB, DroppedOut, Profile, ProfiledDevice, ProfileSpec

RAY_ADDRESS = "--ray ADDRESS must be host:port (the head's, as `ray start --head --port` printed)"
BASE = ["--mem", "1GB", "--coordinator", "ws://127.0.0.1:1", "--bundle", "b", "--data", "d"]


def test_a_devices_profile_is_its_own_whatever_the_fleet():
    """Drawn from the seed and the device's id: the same device gets the same profile in a fleet of any size."""
    spec = ProfileSpec(seed=3, speed=(0.5, 4.0), dropout=0.1, mem=(800 * MIB, 2048 * MIB))
    small = {p.device_id: p for p in (spec.draw(f"emu-{i}", None) for i in range(3))}
    large = {p.device_id: p for p in (spec.draw(f"emu-{i}", None) for i in range(300))}
    assert all(large[name] == profile for name, profile in small.items())
    speeds = [p.speed for p in large.values()]
    assert 0.5 <= min(speeds) < 0.6 and 3.5 < max(speeds) <= 4.0  # log-uniform over the whole range
    assert sum(s < 1 for s in speeds) / len(speeds) == pytest.approx(1 / 3, abs=0.1)  # log2: 1 of 3 octaves
    budgets = [p.mem_budget_bytes for p in large.values()]
    assert all(b % MIB == 0 and 800 * MIB <= b <= 2048 * MIB for b in budgets) and len(set(budgets)) > 100
    other = ProfileSpec(seed=4, speed=(0.5, 4.0))
    assert [other.draw(f"emu-{i}", None).speed for i in range(3)] != speeds[:3]


def test_without_profile_flags_every_device_is_as_before():
    args = parse_args(BASE)
    profile = args.profile_spec.draw("emu-0", args.mem_bytes)
    assert (profile.speed, profile.dropout, profile.mem_budget_bytes) == (1.0, 0.0, args.mem_bytes)
    assert args.profile_spec.seed == args.seed


def test_the_flags_make_the_spec():
    args = parse_args([*BASE, "--profile-speed", "0.5:2", "--profile-dropout", "0.2", "--profile-mem", "1GB:2GB",
                       "--profile-seed", "7"])
    assert args.profile_spec == ProfileSpec(seed=7, speed=(0.5, 2.0), dropout=0.2, mem=(10**9, 2 * 10**9))
    assert parse_args([*BASE, "--profile-speed", "3"]).profile_spec.speed == (3.0, 3.0)


@pytest.mark.parametrize("flags, error", [
    (["--profile-speed", "0:2"], "--profile-speed: a speed multiplier must be a number > 0, got '0'"),
    (["--profile-speed", "x"], "--profile-speed: a speed multiplier must be a number > 0, got 'x'"),
    (["--profile-speed", "2:1"], "--profile-speed: LO must not exceed HI, got '2:1'"),
    (["--profile-speed", "1:2:3"], "--profile-speed must be LO:HI or one value, got '1:2:3'"),
    (["--profile-dropout", "1"], "--profile-dropout must be a probability in [0, 1), got 1.0"),
    (["--profile-dropout", "nan"], "--profile-dropout must be a probability in [0, 1), got nan"),
    (["--profile-mem", "2GB:1GB"], "--profile-mem: LO must not exceed HI, got '2GB:1GB'"),
    (["--profile-mem", "1KB"], "--profile-mem: a budget must be at least 1 MiB, got '1KB'"),
    (["--ray-cpus", "0"], "--ray-cpus must be a number > 0, got 0.0"),
    (["--workers", "5"], "--workers must be between 1 and --devices"),
    (["--ray", "nohost"], f"{RAY_ADDRESS}, got 'nohost'"),
    (["--ray", "h:99999"], f"{RAY_ADDRESS}, got 'h:99999'"),
])
def test_bad_profile_values_get_one_clear_error(flags, error, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args([*BASE, *flags])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == f"python -m device_sdk.emulate: error: {error}"


def test_speed_is_log_uniform_not_uniform():
    """Half the devices are faster than the geometric mean of the range, not the arithmetic one."""
    spec = ProfileSpec(seed=0, speed=(0.25, 4.0))
    speeds = [spec.draw(f"d{i}", None).speed for i in range(2000)]
    assert sum(s < math.sqrt(0.25 * 4.0) for s in speeds) / len(speeds) == pytest.approx(0.5, abs=0.04)


def profiled(monkeypatch, profile: Profile, seconds: float) -> ProfiledDevice:
    """A ProfiledDevice whose Device.train takes `seconds` of the clock and returns a marker (the one piece
    under test is the profile's clock and dropout, not training)."""
    clock = iter(range(10**6))
    monkeypatch.setattr(Device, "train", lambda self, task: "update")
    monkeypatch.setattr("device_sdk.profiles.time.perf_counter", lambda: next(clock) * seconds)
    device = object.__new__(ProfiledDevice)
    device.config = SimpleNamespace(device_id=profile.device_id)
    device.profile, device.spec_seed = profile, 5
    device.train_seconds = device.simulated_seconds = 0.0
    device.dropouts, device.attempts = 0, {}
    return device


def attempts(device: ProfiledDevice, rounds: int, tries: int) -> list[list[bool]]:
    """Per round, whether each try dropped out."""
    out = []
    for r in range(rounds):
        task = SimpleNamespace(round=r, task_id=f"t{r}")
        row = []
        for _ in range(tries):
            try:
                assert device.train(task) == "update"
                row.append(False)
            except DroppedOut as e:
                assert isinstance(e, ConnectionClosed) and "dropped out of task" in str(e)
                row.append(True)
        out.append(row)
    return out


def test_the_simulated_clock_runs_at_the_profiles_speed(monkeypatch):
    device = profiled(monkeypatch, Profile("emu-0", speed=2.5), seconds=0.5)
    assert attempts(device, 3, 1) == [[False]] * 3
    assert device.train_seconds == pytest.approx(1.5) and device.simulated_seconds == pytest.approx(3.75)


def test_dropout_is_seeded_by_device_round_and_attempt(monkeypatch):
    first = attempts(profiled(monkeypatch, Profile("emu-0", dropout=0.5), 0.1), 20, 4)
    again = attempts(profiled(monkeypatch, Profile("emu-0", dropout=0.5), 0.1), 20, 4)
    other = attempts(profiled(monkeypatch, Profile("emu-1", dropout=0.5), 0.1), 20, 4)
    assert first == again and first != other
    share = sum(map(sum, first)) / 80
    assert 0.35 < share < 0.65
    assert any(row[0] and not row[1] for row in first)  # a retried task may go through
    assert not any(map(any, attempts(profiled(monkeypatch, Profile("emu-0"), 0.1), 20, 4)))  # dropout 0
