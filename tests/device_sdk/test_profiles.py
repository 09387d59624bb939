"""Device profiles (device_sdk.profiles): seeded draws, and the flags' one-line errors."""

from __future__ import annotations

import asyncio
import math
import time
from types import SimpleNamespace

import pytest
from websockets.exceptions import ConnectionClosed

from device_sdk.client import Device
from device_sdk.emulate import parse_args
from device_sdk.fleet_time import Timing, Turns, Window, WorkerFleet
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


def test_online_windows_leave_the_other_draws_as_they_were():
    """Windows are drawn after speed and budget: a fleet given windows keeps its devices' speeds and budgets."""
    plain = ProfileSpec(seed=3, speed=(0.5, 4.0), mem=(800 * MIB, 2048 * MIB))
    windowed = ProfileSpec(seed=3, speed=(0.5, 4.0), mem=(800 * MIB, 2048 * MIB), online=(0.25, 0.75), day=600.0)
    before = [plain.draw(f"emu-{i}", None) for i in range(500)]
    after = [windowed.draw(f"emu-{i}", None) for i in range(500)]
    assert [(p.speed, p.mem_budget_bytes) for p in before] == [(p.speed, p.mem_budget_bytes) for p in after]
    assert all(p.online_share == 1.0 and p.online_phase == 0.0 for p in before)
    shares, phases = [p.online_share for p in after], [p.online_phase for p in after]
    assert 0.25 <= min(shares) < 0.3 and 0.7 < max(shares) <= 0.75 and 0 <= min(phases) < 30 and max(phases) > 570


def test_without_profile_flags_every_device_is_as_before():
    args = parse_args(BASE)
    profile = args.profile_spec.draw("emu-0", args.mem_bytes)
    assert (profile.speed, profile.dropout, profile.mem_budget_bytes) == (1.0, 0.0, args.mem_bytes)
    assert args.profile_spec.seed == args.seed


def test_the_flags_make_the_spec():
    args = parse_args([*BASE, "--profile-speed", "0.5:2", "--profile-dropout", "0.2", "--profile-mem", "1GB:2GB",
                       "--profile-seed", "7", "--profile-online", "0.25:0.75", "--profile-day", "600", "--time-scale",
                       "0.5"])
    assert args.profile_spec == ProfileSpec(seed=7, speed=(0.5, 2.0), dropout=0.2, mem=(10**9, 2 * 10**9),
                                            online=(0.25, 0.75), day=600.0)
    assert args.time_scale == 0.5
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
    (["--time-scale", "0"], "--time-scale must be a number of wall seconds per simulated second > 0, got 0.0"),
    (["--time-scale", "inf"], "--time-scale must be a number of wall seconds per simulated second > 0, got inf"),
    (["--time-scale", "x"], "argument --time-scale: invalid float value: 'x'"),
    (["--profile-online", "0:1", "--time-scale", "1"], "--profile-online: an online share must be a number in (0, 1], "
                                                       "got '0'"),
    (["--profile-online", "0.5:1.5", "--time-scale", "1"], "--profile-online: an online share must be a number in "
                                                           "(0, 1], got '1.5'"),
    (["--profile-online", "0.9:0.5", "--time-scale", "1"], "--profile-online: LO must not exceed HI, got '0.9:0.5'"),
    (["--profile-online", "0.5"], "--profile-online needs --time-scale: the windows are in simulated time, which "
                                  "runs in wall time only at a scale"),
    (["--profile-day", "0"], "--profile-day must be a number of simulated seconds > 0, got 0.0"),
    (["--profile-day", "nan"], "--profile-day must be a number of simulated seconds > 0, got nan"),
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


def profiled(monkeypatch, profile: Profile, seconds: float, scale: float | None = None,
             fleet: WorkerFleet | None = None) -> ProfiledDevice:
    """A ProfiledDevice whose Device.train takes `seconds` of the measured clock and returns a marker (the one piece
    under test is the profile's clock, dropouts and windows, not training)."""
    monkeypatch.setattr(Device, "train", lambda self, task: self.marker)
    device = object.__new__(ProfiledDevice)
    device.config = SimpleNamespace(device_id=profile.device_id)
    device.engine = "engine"
    device.fleet = fleet or WorkerFleet(Timing(spec_seed=5, start=time.time(), scale=scale, day=10.0))
    device.profile, device.window = profile, Window(profile.online_phase, profile.online_share, device.fleet.timing.day)
    device.train_seconds = device.simulated_seconds = device.last_seconds = 0.0
    device.dropouts, device.attempts, device.tasks = 0, {}, {}
    device.marker, device.num_examples = f"update of {profile.device_id}", 8
    clock = iter(range(10**6))
    monkeypatch.setattr("device_sdk.profiles.time.perf_counter", lambda: next(clock) * seconds)
    return device


def attempts(device: ProfiledDevice, rounds: int, tries: int) -> list[list[bool]]:
    """Per round, whether each try dropped out."""
    out = []
    for r in range(rounds):
        task = SimpleNamespace(round=r, task_id=f"t{r}")
        row = []
        for _ in range(tries):
            try:
                assert asyncio.run(device.run_task(task)) == device.marker
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
    assert [t["simulated_seconds"] for t in device.tasks.values()] == [1.25] * 3


def test_dropout_is_seeded_by_device_round_and_attempt(monkeypatch):
    first = attempts(profiled(monkeypatch, Profile("emu-0", dropout=0.5), 0.1), 20, 4)
    again = attempts(profiled(monkeypatch, Profile("emu-0", dropout=0.5), 0.1), 20, 4)
    other = attempts(profiled(monkeypatch, Profile("emu-1", dropout=0.5), 0.1), 20, 4)
    assert first == again and first != other
    share = sum(map(sum, first)) / 80
    assert 0.35 < share < 0.65
    assert any(row[0] and not row[1] for row in first)  # a retried task may go through
    assert not any(map(any, attempts(profiled(monkeypatch, Profile("emu-0"), 0.1), 20, 4)))  # dropout 0


def test_at_a_time_scale_a_slow_device_holds_its_update_for_its_simulated_time(monkeypatch):
    """Two devices of one worker, trained one at a time, 0.02 measured seconds a task: at 5 wall seconds per
    simulated second the device of speed 4 answers 0.4 s after its task came, the one of speed 1 after 0.1 s,
    whichever asked to train first."""
    fleet = WorkerFleet(Timing(spec_seed=5, start=time.time(), scale=5.0))
    slow = profiled(monkeypatch, Profile("slow", speed=4.0), 0.02, fleet=fleet)
    fast = profiled(monkeypatch, Profile("fast", speed=1.0), 0.02, fleet=fleet)

    async def answered(device):
        started = time.monotonic()
        await device.run_task(SimpleNamespace(round=1, task_id=device.config.device_id))
        return time.monotonic() - started

    async def both():
        return await asyncio.gather(answered(slow), answered(fast))

    slow_s, fast_s = asyncio.run(both())
    assert 0.4 <= slow_s < 0.6 and 0.1 <= fast_s < 0.3
    for device in (slow, fast):
        (task,) = device.tasks.values()
        assert task["outcome"] == "sent" and task["lag_seconds"] == 0.0  # the worker kept up


def test_the_device_whose_update_is_due_first_trains_first():
    order = []

    async def wait_turn(turns, name, due):
        async with turns.turn(due):
            order.append(name)
            await asyncio.sleep(0.01)

    async def scenario():
        turns = Turns()
        async with turns.turn(0.0):  # busy: the others queue up behind it
            waiting = [asyncio.create_task(wait_turn(turns, name, due))
                       for name, due in (("late", 9.0), ("soon", 1.0), ("later", 5.0), ("also soon", 1.0))]
            await asyncio.sleep(0.01)
            waiting[2].cancel()  # a device that left while it waited takes no turn
        await asyncio.gather(*waiting, return_exceptions=True)
        return turns

    turns = asyncio.run(scenario())
    assert order == ["soon", "also soon", "late"] and not turns._busy


def test_a_window_is_online_for_its_share_of_every_day_from_its_phase():
    w = Window(phase=30.0, share=0.25, day=100.0)
    online = [t for t in range(0, 300) if w.online(t)]
    assert online == [*range(30, 55), *range(130, 155), *range(230, 255)]
    assert w.next_change(40.0) == 55.0 and w.next_change(60.0) == 130.0 and w.next_change(10.0) == 30.0
    assert Window().always and Window().online(1e9) and Window().next_change(5.0) == math.inf


def test_an_offline_device_waits_for_its_window_and_stops_when_the_job_ends(monkeypatch):
    """A day of 10 simulated seconds at 0.02 wall seconds each (0.2 s): a device online for [5, 7.5) of it."""
    fleet = WorkerFleet(Timing(spec_seed=5, start=time.time(), scale=0.02, day=10.0))
    device = profiled(monkeypatch, Profile("emu-0", online_share=0.25, online_phase=5.0), 0.001, fleet=fleet)

    async def scenario():
        assert await device.before_connect()  # waits for simulated 5 s: 0.1 s
        opened = fleet.clock.now()
        closes = device.offline_at() - time.time()
        fleet.done.set()  # another device of the worker was told the job is done
        return opened, closes, await device.before_connect()

    opened, closes, again = asyncio.run(scenario())
    assert 5.0 <= opened < 7.5 and 0 < closes <= 0.05 + 1e-6 and not again


def test_a_task_still_held_when_the_window_ends_is_lost(monkeypatch):
    """Online until simulated 2.5 s of each 10; speed 100 at 0.01 measured seconds a task: 1 simulated second, due
    after the window has closed if the task comes at simulated 2."""
    fleet = WorkerFleet(Timing(spec_seed=5, start=time.time() - 2 * 0.05, scale=0.05, day=10.0))
    device = profiled(monkeypatch, Profile("emu-0", speed=100.0, online_share=0.25), 0.01, fleet=fleet)
    with pytest.raises(DroppedOut, match="its online window ended during task t1"):
        asyncio.run(device.run_task(SimpleNamespace(round=1, task_id="t1")))
    assert device.record(0)["went_offline"] == 1 and time.time() >= fleet.clock.wall(2.5) - 1e-3


def test_a_device_still_reaching_the_coordinator_stops_when_its_worker_hears_the_job_is_done(monkeypatch):
    """The coordinator has gone with the job: a device reconnecting after a dropout would retry for its whole
    connect timeout and then fail its worker."""
    async def unreachable(self):
        await asyncio.sleep(3600)

    monkeypatch.setattr(Device, "_connect", unreachable)
    device = profiled(monkeypatch, Profile("emu-0"), 0.01)
    device.tasks_done = 3

    async def scenario():
        running = asyncio.create_task(device.run())
        await asyncio.sleep(0.05)
        assert not running.done()
        device.fleet.done.set()
        return await asyncio.wait_for(running, 5)

    assert asyncio.run(scenario()) == 3
