"""Coordinator load: thousands of model-free devices answering every task at once with a seed-form update.

    python -m benchmarks.coordinator_load --bundle BUNDLE --devices 5000 10000 [--rounds 3] [--pairs 10]
        [--seed-pool 1024] [--db sqlite postgresql+psycopg://USER:PASSWORD@HOST/DB] [--workers 2] [--floor]

For each database and fleet size N: the real coordinator (`python -m coordinator serve`, its own
process, credentials off) runs a fresh job whose rounds sample all N devices; the devices (N
connections from `--workers` processes, benchmarks/load_fleet.py) each answer every task with
`--pairs` (seed, coefficient) pairs drawn from the job's seed pool. Each round's updates are written
only once every device holds its task, all at once, as a fleet whose devices finished training
together would send them; so a round has three phases, measured apart:

- dispatch: from the round's opening (its stored `opened_at`) until every device holds its task
  (N task frames, each carrying the 14 KB adapter of the tiny-llama bundle);
- collect: from the first update written by any device to the last ack read by any device (the
  clock of this one machine, `time.time()`, in every process). The **acceptance rate** is the
  updates acked as accepted in the round divided by this time: an ack is sent only after its
  update's row is committed, so it counts updates decoded, checked and stored;
- close: from the last ack to the round's stored `closed_at` (aggregation, the new version stored).

Beside the rates, the CPU time the coordinator process (all its threads) and the device processes
(together) used over each collect phase, per accepted update: on a shared machine the rate is what
the coordinator got of the cores, its CPU per update what it needs of one.

With `--floor`, each fleet first runs the same rounds against benchmarks/websocket_floor.py, a server
that only receives, decodes and acks (no store, no round, no checks), on the same websockets settings:
what this machine allows any coordinator of this design; each database's line then gives its rate as a
share of the floor's.

Round 1's dispatch also waits for the devices to connect (reported apart). After the job, the rows
are counted in the store: every update acked as accepted must be there once. An SQLite database is a
fresh file (`--sqlite-sync`: its durability); a PostgreSQL URL must name a database without an
unfinished job: each run adds a job of its own (`load-N-TIME`) and leaves it there. Any bundle gives
the job its identity (`python -m export --preset tiny-llama --out BUNDLE`).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import wait
from pathlib import Path

from fwdfed.cli import run_main
from fwdfed.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PHASE_TIMEOUT_S = 900


class Run:
    """One server process (the coordinator, or the floor) and its fleet of worker processes."""

    def __init__(self, args, manifest, n: int, command: list[str]):
        self.log = tempfile.TemporaryFile("w+")
        self.server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.lines: list[str] = []
        url = None
        for line in self.server.stdout:
            self.lines.append(line)
            if line.startswith("listening on "):
                url = line.split()[-1]
                break
        if url is None:
            raise UserError(f"the server did not start: {self.tail()}")
        threading.Thread(target=self.drain, daemon=True).start()  # a full pipe would stall the server
        from benchmarks.load_fleet import worker

        spawn = multiprocessing.get_context("spawn")
        ids = [f"load-{i}" for i in range(n)]
        self.pipes, self.workers = [], []
        for w in range(args.workers):
            mine, theirs = spawn.Pipe()
            process = spawn.Process(target=worker, args=(theirs, url, ids[w::args.workers], manifest.base_model_hash,
                                                         manifest.adapter_dim, args.pairs), daemon=True)
            process.start()
            self.pipes.append(mine)
            self.workers.append(process)

    def drain(self) -> None:
        for line in self.server.stdout:
            self.lines.append(line)

    def tail(self) -> str:
        self.log.seek(0)
        return (self.log.read() + "".join(self.lines))[-2000:]

    def expect(self, kind: str) -> list[tuple]:
        """One message of `kind` from every worker; a failure or silence stops the run with its reason."""
        got: dict[int, tuple] = {}
        deadline = time.time() + PHASE_TIMEOUT_S
        while len(got) < len(self.pipes):
            if self.server.poll() is not None and kind != "done":
                raise UserError(f"the coordinator exited ({self.server.returncode}) waiting for {kind}: {self.tail()}")
            for pipe in wait([p for i, p in enumerate(self.pipes) if i not in got], timeout=1.0):
                try:
                    message = pipe.recv()
                except EOFError:
                    raise UserError(f"a device worker exited waiting for {kind}") from None
                if message[0] == "failed":
                    raise UserError(f"a device worker failed: {message[1]}")
                if message[0] != kind:
                    raise UserError(f"a device worker said {message[0]} while {kind} was due")
                got[self.pipes.index(pipe)] = message
            if time.time() > deadline:
                raise UserError(f"no {kind} from every worker within {PHASE_TIMEOUT_S} s")
        return list(got.values())

    def go(self) -> None:
        for pipe in self.pipes:
            pipe.send(("go",))

    def cpu_s(self) -> float:
        """CPU seconds the coordinator process has used so far (all its threads, user and system)."""
        with open(f"/proc/{self.server.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        for process in self.workers:
            process.kill()
        if self.server.poll() is None:
            self.server.kill()
            self.server.wait()


def run_rounds(run: Run, rounds: int) -> tuple[int, float, list[dict]]:
    """Drive `run`'s fleet through its rounds: (devices connected, seconds to connect, each round's figures)."""
    try:
        connected = run.expect("connected")
        figures = []
        for number in range(1, rounds + 1):
            tasked = max(m[2] for m in run.expect("tasked"))
            cpu = run.cpu_s()
            run.go()
            acked = run.expect("acked")
            cpu = run.cpu_s() - cpu
            first, last = min(m[2] for m in acked), max(m[3] for m in acked)
            figures.append(dict(number=number, tasked=tasked, first=first, last=last, cpu_s=cpu,
                                devices_cpu_s=sum(m[6] for m in acked), collect_s=last - first,
                                accepted=sum(m[4] for m in acked), refused=sum(m[5] for m in acked)))
            figures[-1]["rate"] = figures[-1]["accepted"] / figures[-1]["collect_s"]
        run.expect("done")
        code = run.server.wait(timeout=PHASE_TIMEOUT_S)
        if code != 0:
            raise UserError(f"the server exited with {code}: {run.tail()}")
    finally:
        run.stop()
    return sum(c[1] for c in connected), max(c[2] for c in connected), figures


def run_floor(args, manifest, n: int) -> dict:
    """The same fleet and rounds against benchmarks/websocket_floor.py: no store, no round, no checks."""
    command = [sys.executable, "-m", "benchmarks.websocket_floor", "--devices", str(n), "--rounds", str(args.rounds)]
    devices, connect_s, rounds = run_rounds(Run(args, manifest, n, command), args.rounds)
    return dict(devices=devices, rounds=rounds, accepted=sum(r["accepted"] for r in rounds),
                rate=sum(r["accepted"] for r in rounds) / sum(r["collect_s"] for r in rounds))


def run_fleet(args, manifest, n: int, db_arg: str) -> dict:
    from coordinator.store import open_store

    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "load.db") if db_arg == "sqlite" else db_arg
        if db_arg != "sqlite":  # serve would resume an unfinished job instead of starting this run's
            store = open_store(db)
            running = store.running_job()
            store.engine.dispose()
            if running is not None:
                raise UserError(f"{db_arg} holds the unfinished job {running.id}: use another database")
        job_id = f"load-{n}-{int(time.time())}"
        command = [sys.executable, "-m", "coordinator", "serve", "--db", db, "--port", "0", "--bundle", str(args.bundle),
                   "--job-id", job_id, "--rounds", str(args.rounds), "--devices-per-round", str(n),
                   "--round-deadline", "900", "--heartbeat", "120", "--auth", "none", "--local-steps", str(args.pairs),
                   "--max-connections", str(n + 64), "--sqlite-sync", args.sqlite_sync]
        if args.seed_pool:
            command += ["--seed-pool", str(args.seed_pool)]
        devices, connect_s, rounds = run_rounds(Run(args, manifest, n, command), args.rounds)
        store = open_store(db)
        stored = {r.number: r for r in store.rounds(job_id) if r.status == "closed"}
        figures = store.update_figures(job_id)
        store.engine.dispose()
    for r in rounds:
        row = stored[r["number"]]
        r.update(dispatch_s=r["tasked"] - row.opened_at, close_s=row.closed_at - r["last"],
                 round_s=row.closed_at - row.opened_at)
    return dict(db=db_arg.split(":")[0].split("+")[0], devices=devices, connect_s=connect_s, rounds=rounds,
                stored=len(figures), distinct=len({(f.round_id, f.device_id) for f in figures}),
                accepted=sum(r["accepted"] for r in rounds), refused=sum(r["refused"] for r in rounds))


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--devices", type=int, nargs="+", default=[5000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=10, help="(seed, coefficient) pairs per update")
    parser.add_argument("--seed-pool", type=int, default=1024, help="the job's seed pool (0: free seeds)")
    parser.add_argument("--db", nargs="+", default=["sqlite"],
                        help="sqlite (a fresh file) and/or SQLAlchemy URLs of PostgreSQL databases")
    parser.add_argument("--sqlite-sync", choices=("full", "normal"), default="full")
    parser.add_argument("--workers", type=int, default=2, help="device processes")
    parser.add_argument("--floor", action="store_true",
                        help="first run each fleet against benchmarks/websocket_floor.py, for the ratio")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.pairs < 1 or args.workers < 1 or min(args.devices) < args.workers:
        raise UserError("--rounds, --pairs and --workers must be at least 1, and every --devices at least --workers")
    from fwdfed.bundle.manifest import load_bundle

    manifest = load_bundle(args.bundle).manifest
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the coordinator and the workers
    if max(args.devices) + 64 > hard:
        raise UserError(f"{max(args.devices)} devices need more open files than the limit {hard}")
    print(f"open-file limit {hard}; {args.rounds} rounds, {args.pairs} pairs per update, "
          f"seed pool {args.seed_pool or 'none'}, {args.workers} device processes; load average {load_average()}")
    print(f"{'db':>10} {'devices':>7} {'round':>5} {'accepted':>8} {'refused':>7} {'dispatch s':>10} {'collect s':>9} "
          f"{'updates/s':>9} {'CPU us/update':>13} {'devices CPU':>11} {'close s':>7} {'round s':>7}")
    floors = {}
    for n in args.devices if args.floor else ():
        floors[n] = f = run_floor(args, manifest, n)
        for x in f["rounds"]:
            print(f"{'floor':>10} {f['devices']:>7} {x['number']:>5} {x['accepted']:>8} {x['refused']:>7} {'-':>10} "
                  f"{x['collect_s']:>9.3f} {x['rate']:>9.0f} {1e6 * x['cpu_s'] / max(1, x['accepted']):>13.0f} "
                  f"{1e6 * x['devices_cpu_s'] / max(1, x['accepted']):>11.0f} {'-':>7} {'-':>7}", flush=True)
        print(f"{'floor':>10} {f['devices']:>7}   all: {f['accepted']} acked, {f['rate']:.0f} updates/s over the "
              f"collect phases; load average {load_average()}", flush=True)
    for db in args.db:
        for n in args.devices:
            r = run_fleet(args, manifest, n, db)
            for x in r["rounds"]:
                print(f"{r['db']:>10} {r['devices']:>7} {x['number']:>5} {x['accepted']:>8} {x['refused']:>7} "
                      f"{x['dispatch_s']:>10.2f} {x['collect_s']:>9.3f} {x['rate']:>9.0f} "
                      f"{1e6 * x['cpu_s'] / max(1, x['accepted']):>13.0f} "
                      f"{1e6 * x['devices_cpu_s'] / max(1, x['accepted']):>11.0f} {x['close_s']:>7.2f} "
                      f"{x['round_s']:>7.2f}", flush=True)
            collect = sum(x["collect_s"] for x in r["rounds"])
            steady = [x["round_s"] for x in r["rounds"][1:]] or [r["rounds"][0]["round_s"]]
            doubled = r["stored"] - r["distinct"]
            print(f"{r['db']:>10} {r['devices']:>7}   all: {r['accepted']} acked accepted, {r['stored']} rows stored "
                  f"({doubled} doubled), {r['accepted'] / collect:.0f} updates/s over the collect phases, "
                  f"median round {statistics.median(steady):.2f} s after round 1, connecting {r['connect_s']:.1f} s"
                  + (f", {r['accepted'] / collect / floors[n]['rate']:.0%} of the floor's rate" if n in floors else "")
                  + f"; load average {load_average()}", flush=True)
            if r["stored"] != r["accepted"] or doubled:
                print(f"error: {r['accepted']} updates acked as accepted, {r['stored']} stored", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    run_main(main)
