"""The fault scenarios of issue 25, each a function that runs a whole job through a fault with real processes
(the coordinator, and a fleet of model-free devices: tests.support.device_fleet) and returns what happened:
the ledger of updates (tests.support.ledger), the times, and the link's counts. The tests in
tests/integration/test_network_faults.py run them small and assert; `python -m benchmarks.faults` runs them
long and prints the figures.

- `impaired_job`: the whole job over an impaired link (latency, jitter, loss, reordering; tests.support.testbed);
- `partition`: a third of the fleet cut off for longer than a round's deadline, then healed;
- `coordinator_killed`: the coordinator kill -9ed mid-round while the fleet sends, restarted on the same
  database (SQLite or PostgreSQL), on loopback;
- `disk_fills`: the SQLite database on a small tmpfs that fills while the coordinator writes, then has room again.

Every wait is bounded: a scenario that hangs fails with what it was waiting for.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.store import open_store
from tests.conftest import ROOT
from tests.support.fleet import Coordinator, enrol, free_port
from tests.support.ledger import Ledger, assert_nothing_lost_or_doubled, reckon
from tests.support.testbed import Testbed

_schemas = itertools.count()


@dataclass
class Outcome:
    ledger: Ledger
    report: dict  # the fleet's (tests.support.device_fleet)
    db: str
    times: dict = field(default_factory=dict)  # seconds, by name
    facts: dict = field(default_factory=dict)  # what the scenario's own checks need
    link: dict | None = None  # the netem's counts (tests.support.netem), where there was a link
    logs: list = field(default_factory=list)  # (exit code, stdout, stderr) of each coordinator process

    def summary(self) -> str:
        times = ", ".join(f"{k} {v:.1f} s" for k, v in self.times.items())
        return f"{self.ledger.line()}; {times}"


class Fleet:
    """The device fleet's process (tests.support.device_fleet), started now; `finish` waits for its report."""

    def __init__(self, workdir: Path, url: str, bundle: Path, devices: int, within_s: float, *, launcher=(),
                 addresses=(), think_s: float = 0.0, ping_s: float = 2.0, credentials: Path | None = None,
                 seed: int = 0, pairs: int = 4):
        self.report_path = workdir / "fleet.json"
        self.log = open(workdir / "fleet.log", "w+")
        self.process = subprocess.Popen(
            [*launcher, sys.executable, "-m", "tests.support.device_fleet", "--url", url, "--bundle", str(bundle),
             "--devices", str(devices), "--within", str(within_s), "--think", str(think_s), "--ping", str(ping_s),
             "--seed", str(seed), "--pairs", str(pairs), "--report", str(self.report_path),
             *(["--addresses", *addresses] if addresses else []),
             *(["--credentials", str(credentials)] if credentials else [])],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def finish(self, grace_s: float = 20) -> dict:
        """The fleet's report, once every device stopped; after `grace_s` seconds (the job is over: devices that
        did not hear so will not), the devices still waiting are stopped (SIGTERM) and the report says so."""
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"the fleet did not stop:\n{self.output()}") from None
        if not self.report_path.exists():
            raise AssertionError(f"the fleet wrote no report:\n{self.output()}")
        return json.loads(self.report_path.read_text())

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


def read_until(coordinator: Coordinator, text: str, timeout: float) -> str:
    """Coordinator.read_until, bounded: the coordinator is killed (and this fails) if `text` is not printed in time."""
    watchdog = threading.Timer(timeout, coordinator.process.kill)
    watchdog.start()
    try:
        return coordinator.read_until(text)
    except AssertionError:
        raise AssertionError(f"no {text!r} within {timeout} s:\n{coordinator.stderr()[-3000:]}") from None
    finally:
        watchdog.cancel()


def poll(condition, timeout: float, what: str, every: float = 0.05):
    """condition()'s first truthy value, or AssertionError after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := condition():
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s")


def assert_recovered(outcome: Outcome) -> None:
    """The scenario's end: its last coordinator finished the job (exit 0), and the ledger's checks hold
    (tests.support.ledger.assert_nothing_lost_or_doubled)."""
    code, _, err = outcome.logs[-1]
    assert code == 0, f"the last coordinator exited with {code}:\n{err[-3000:]}"
    assert_nothing_lost_or_doubled(open_store(outcome.db), outcome.report)


def first_welcome_after(report: dict, devices, at: float) -> dict[str, float | None]:
    """Per device, seconds from `at` (wall clock) to its first welcome after it; None if it never came back."""
    back = {}
    for device_id in devices:
        later = [t for t in report["devices"][device_id]["welcomed"] if t >= at]
        back[device_id] = min(later) - at if later else None
    return back


def job_args(bundle: Path, devices_per_round: int, rounds: int, deadline_s: float, *extra: str, pairs: int = 4
             ) -> list[str]:
    """A job of the bundle's identity whose updates may hold `pairs` pairs (a device of the fleet sends that many)."""
    return ["--bundle", str(bundle), "--rounds", str(rounds), "--devices-per-round", str(devices_per_round),
            "--round-deadline", str(deadline_s), "--local-steps", str(pairs), "--directions", "1",
            "--max-attempts", "2", *extra]


def impaired_job(workdir: Path, bundle: Path, *, devices: int, rounds: int, impairment: dict, seed: int = 0,
                 enrolled: bool = False, pairs: int = 4, within_s: float = 120) -> Outcome:
    """Every round of a job through the impaired link, all devices sampled every round; `enrolled`: the devices
    have credentials, so each connection's handshake (its challenge and signed answer) crosses the link too;
    `pairs` per update (300: an update of about 5 KB, several TCP segments in flight at once)."""
    db = workdir / "job.db"
    credentials, auth = None, []
    if enrolled:
        credentials, auth = workdir / "credentials.json", ["--auth", "token"]
        enrol(db, credentials, [f"dev-{i}" for i in range(devices)])
    with Testbed(devices, seed) as bed:
        bed.impair(**impairment)
        coordinator = Coordinator(db, "--host", bed.coordinator_ip, *auth,
                                  *job_args(bundle, devices, rounds, within_s, "--heartbeat", "5", pairs=pairs),
                                  launcher=bed.on("coordinator"))
        fleet = None
        try:
            fleet = Fleet(workdir, coordinator.url, bundle, devices, within_s, launcher=bed.on("devices"),
                          addresses=bed.addresses, ping_s=5, credentials=credentials, seed=seed, pairs=pairs)
            started = time.time()
            log = coordinator.wait(timeout=within_s + 30)
            report = fleet.finish()
            ended = time.time()
        finally:
            coordinator.kill()
            if fleet is not None:
                fleet.kill()
        link = bed.stats()
    store = open_store(db)
    closed = store.closed_round_list(store.latest_job().id)
    times = {"job": ended - started, "round mean": sum(r.closed_at - r.opened_at for r in closed) / max(1, len(closed))}
    return Outcome(reckon(store, report), report, str(db), times, link=link, logs=[log])


def partition(workdir: Path, bundle: Path, *, devices: int = 21, rounds: int = 20, deadline_s: float = 10,
              hold_s: float = 12, think_s: float = 1.0, seed: int = 0, within_s: float = 120) -> Outcome:
    """A third of the fleet sampled per round; once round 2's tasks are out, the devices holding them (a third of
    the fleet) are cut off for `hold_s` seconds, longer than a round's deadline, then the link is healed. The
    coordinator notices them gone within about 4 s (no pong within two heartbeats of 1 s, then its 2 s close
    timeout) and reassigns their tasks after --device-timeout (1 s)."""
    db = workdir / "job.db"
    third = devices // 3
    with Testbed(devices, seed) as bed:
        coordinator = Coordinator(db, "--host", bed.coordinator_ip,
                                  *job_args(bundle, third, rounds, deadline_s, "--heartbeat", "1", "--device-timeout",
                                            "1", "--seed", str(seed)),
                                  launcher=bed.on("coordinator"))
        fleet = None
        try:
            fleet = Fleet(workdir, coordinator.url, bundle, devices, within_s, launcher=bed.on("devices"),
                          addresses=bed.addresses, think_s=think_s, ping_s=1, seed=seed)
            read_until(coordinator, "round 1/", within_s)
            store = open_store(db)
            job = store.latest_job()

            def round_two_tasks():
                rnd = store.open_round(job.id)
                if rnd is not None and rnd.number == 2 and len(tasks := store.tasks(rnd.id)) >= third:
                    return rnd, tasks
            rnd, tasks = poll(round_two_tasks, 30, "round 2's tasks")
            cut = sorted(t.device_id for t in tasks)
            answered_before = store.answered(rnd.id)
            bed.partition([bed.addresses[int(d.rsplit("-", 1)[1]) % len(bed.addresses)] for d in cut])
            cut_at = time.time()
            time.sleep(hold_s)
            healed_at = time.time()
            bed.heal()
            log = coordinator.wait(timeout=within_s)
            report = fleet.finish()
        finally:
            coordinator.kill()
            if fleet is not None:
                fleet.kill()
        link = bed.stats()
    store = open_store(db)
    attempts = [r for r in store.rounds(job.id) if r.number == 2]
    closed = next(r for r in attempts if r.status == "closed")
    after_heal = [r.id for r in store.rounds(job.id) if r.opened_at >= healed_at]
    back = first_welcome_after(report, cut, healed_at)
    facts = {"cut": cut, "answered_before_cut": len(answered_before),
             "round_two_attempts": [r.status for r in attempts],
             "round_two_closed_during_partition": closed.closed_at < healed_at,
             "cut_tasks_abandoned": sum(t.abandoned_at is not None for r in attempts for t in store.tasks(r.id)
                                        if t.device_id in cut),
             "round_two_updates": {"from the cut": sum(u.device_id in cut for u in store.updates(closed.id)),
                                   "from the others": sum(u.device_id not in cut for u in store.updates(closed.id))},
             "not_back": [d for d, s in back.items() if s is None],
             "updates_from_cut_after_heal": sum(u.device_id in cut for r in after_heal for u in store.updates(r))}
    times = {"partition": healed_at - cut_at, "round 2 closed after the cut": closed.closed_at - cut_at,
             "all cut devices back after the heal": max((s for s in back.values() if s is not None), default=0.0)}
    return Outcome(reckon(store, report), report, str(db), times, facts, link=link, logs=[log])


def coordinator_killed(workdir: Path, bundle: Path, db: str, *, devices: int = 24, rounds: int = 3,
                       think_s: float = 3.0, kill_at_share: float = 0.3, within_s: float = 150) -> Outcome:
    """Every device sampled; devices answer within `think_s` of their task, so a round's updates arrive spread
    out. Once `kill_at_share` of round 2's updates are stored, SIGKILL; a new coordinator on the same database
    and port resumes. On loopback (no link to impair: the fault is the process's)."""
    port = free_port()
    args = job_args(bundle, devices, rounds, 60, "--heartbeat", "5")
    first = Coordinator(db, *args, port=port)
    fleet = second = None
    try:
        fleet = Fleet(workdir, first.url, bundle, devices, within_s, think_s=think_s, ping_s=5)
        read_until(first, "round 1/", within_s)
        store = open_store(db)
        job = store.latest_job()

        def round_two_under_way():
            rnd = store.open_round(job.id)
            if rnd is not None and rnd.number == 2 and len(store.answered(rnd.id)) >= kill_at_share * devices:
                return rnd
        rnd = poll(round_two_under_way, 60, "round 2 under way")
        first.process.kill()  # SIGKILL: no chance to clean up
        first.process.communicate()
        killed_at = time.time()
        stored_at_kill = len(store.answered(rnd.id))
        store.engine.dispose()
        second = Coordinator(db, port=port)
        listening_at = time.time()
        log = second.wait(timeout=within_s)
        report = fleet.finish()
    finally:
        first.kill()
        if second is not None:
            second.kill()
        if fleet is not None:
            fleet.kill()
    store = open_store(db)
    round_two = next(r for r in store.rounds(job.id) if r.id == rnd.id)
    back = first_welcome_after(report, report["devices"], killed_at)
    facts = {"stored_at_kill": stored_at_kill, "target": devices, "round_two_status": round_two.status,
             "not_back": [d for d, s in back.items() if s is None]}
    times = {"restart (process up)": listening_at - killed_at,
             "all devices back after the kill": max((s for s in back.values() if s is not None), default=0.0),
             "round 2 closed after the kill": (round_two.closed_at or float("nan")) - killed_at}
    return Outcome(reckon(store, report), report, db, times, facts, logs=[log])


@contextmanager
def postgres_schema(url: str):
    """A schema of its own in the PostgreSQL database at `url`, dropped after: the URL of a database whose tables
    live there (its search_path), so that a run clashes with no other user of that database."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    schema = f"faults_{os.getpid()}_{next(_schemas)}"
    engine = create_engine(url)
    with engine.begin() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield make_url(url).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False)
    finally:
        with engine.begin() as c:
            c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


def tmpfs(folder: Path, size: str) -> None:
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"cannot mount a tmpfs: {done.stderr.strip()}")


def fill(folder: Path, leave: int) -> int:
    """Fill the file system of `folder` but `leave` bytes; returns the bytes written."""
    st = os.statvfs(folder)
    size = max(0, st.f_bavail * st.f_frsize - leave)
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * size)
    return size


def disk_fills(workdir: Path, bundle: Path, *, devices: int = 24, rounds: int = 3, think_s: float = 1.0,
               leave: int = 48 * 1024, within_s: float = 150) -> Outcome:
    """The database on a tmpfs (2 MB, more for more than 40 devices: room for round 1's writes): once round 1
    closed, all of it but `leave` bytes is taken by a file, so the coordinator's own writes fill the rest mid-round
    (its WAL grows with every commit). The coordinator must stop with one clear line, having acked nothing it did
    not store; then the file is removed, the disk grown, and a new coordinator on the same database resumes."""
    disk = workdir / "disk"
    tmpfs(disk, f"{max(2048, 50 * devices)}k")
    db, kept = disk / "job.db", workdir / "job.db"
    port = free_port()
    second = None
    try:
        first = Coordinator(db, *job_args(bundle, devices, rounds, 60, "--heartbeat", "5"), port=port)
        fleet = None
        try:
            fleet = Fleet(workdir, first.url, bundle, devices, within_s, think_s=think_s, ping_s=5)
            read_until(first, "round 1/", within_s)
            fill(disk, leave)
            filled_at = time.time()
            try:
                stopped = first.wait(timeout=60)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"the coordinator went on with a full disk:\n{first.stderr()[-3000:]}") from None
            stopped_at = time.time()
            # Room again, as an operator makes it: the file gone and the disk grown, to hold the rest of the job.
            (disk / "filler").unlink()
            remounted = subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], capture_output=True,
                                       text=True)
            assert remounted.returncode == 0, remounted.stderr
            freed_at = time.time()
            second = Coordinator(db, port=port)
            log = second.wait(timeout=within_s)
            report = fleet.finish()
            ended = time.time()
        finally:
            first.kill()
            if second is not None:
                second.kill()
            if fleet is not None:
                fleet.kill()
        for suffix in ("", "-wal", "-shm"):  # off the tmpfs, as SQLite left it
            if (found := Path(f"{db}{suffix}")).exists():
                Path(f"{kept}{suffix}").write_bytes(found.read_bytes())
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    store = open_store(kept)
    back = first_welcome_after(report, report["devices"], freed_at)
    facts = {"first_exit": stopped[0], "first_stderr": stopped[2],
             "not_back": [d for d, s in back.items() if s is None]}
    times = {"stopped after the fill": stopped_at - filled_at,
             "all devices back after space came back": max((s for s in back.values() if s is not None), default=0.0),
             "job done after space came back": ended - freed_at}
    return Outcome(reckon(store, report), report, str(kept), times, facts, logs=[stopped, log])
