"""Coordinator load: many lightweight protocol clients sending seed-form updates, no model.

    python benchmarks/coordinator_load.py --bundle BUNDLE --devices 100 1000 4000 [--rounds 4] [--pairs 10]

For each fleet size N: a fresh SQLite job whose rounds sample all N devices; N clients in this
process answer every task at once with `--pairs` (seed, coefficient) pairs. Since devices take
no time, a round's wall time is the coordinator's own overhead: dispatching N tasks (each
carrying the adapter), validating and storing N updates, aggregating, and closing the round.
Round 1 also absorbs enrolment and is reported apart. Any bundle gives the job its identity
(`python -m export --preset tiny-llama --out BUNDLE`).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fwdfed.cli import quiet_libraries, run_main
from fwdfed.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the model-free protocol client lives with the tests (tests/support)


async def fleet(url: str, n: int, manifest, pairs: int) -> int:
    from tests.support.protocol_client import ProtocolClient

    enrolling = asyncio.Semaphore(100)  # devices arrive in waves, as a fleet does, not in one burst

    async def one(i: int) -> int:
        client = ProtocolClient(url, f"load-{i}", manifest.base_model_hash, manifest.adapter_dim)
        async with enrolling:
            await client.__aenter__()
        try:
            return await client.answer_until_done(pairs)
        finally:
            await client.__aexit__()

    return sum(await asyncio.gather(*(one(i) for i in range(n))))


def run_fleet(bundle: Path, n: int, rounds: int, pairs: int, sync: str) -> dict:
    from coordinator.store import open_store
    from fwdfed.bundle.manifest import load_bundle

    manifest = load_bundle(bundle).manifest
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "load.db"
        coordinator = subprocess.Popen(
            [sys.executable, "-m", "coordinator", "serve", "--db", str(db), "--port", "0", "--bundle", str(bundle),
             "--rounds", str(rounds), "--devices-per-round", str(n), "--round-deadline", "900", "--heartbeat", "120", "--sqlite-sync", sync,
             "--auth", "none", "--local-steps", str(pairs)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            url = next(line.split()[-1] for line in coordinator.stdout if line.startswith("listening on "))
            start = time.perf_counter()
            accepted = asyncio.run(fleet(url, n, manifest, pairs))
            wall = time.perf_counter() - start
            coordinator.wait(timeout=600)
        finally:
            coordinator.kill()
        store = open_store(db)
        rounds_rows = [r for r in store.rounds(store.latest_job().id) if r.status == "closed"]
        times = [r.closed_at - r.opened_at for r in rounds_rows]
    steady = times[1:] or times
    mean = statistics.mean(steady)
    return {"sync": sync, "devices": n, "accepted": accepted, "rounds": len(times), "first_round_s": times[0],
            "round_s": mean, "updates_per_s": n / mean, "wall_s": wall}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--sync", nargs="+", choices=("full", "normal"), default=["full", "normal"],
                        help="SQLite durability settings to compare")
    args = parser.parse_args(argv)
    quiet_libraries()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one socket per device, on both sides
    print(f"open-file limit {hard}; {args.rounds} rounds, {args.pairs} pairs per update")
    print(f"{'sync':>6} {'devices':>8} {'accepted':>9} {'round 1 s':>10} {'round s':>8} {'updates/s':>10} {'wall s':>7}")
    for n in args.devices:
        if n + 64 > hard:
            raise UserError(f"{n} devices need more open files than the limit {hard}")
        for sync in args.sync:
            r = run_fleet(args.bundle, n, args.rounds, args.pairs, sync)
            print(f"{sync:>6} {r['devices']:>8} {r['accepted']:>9} {r['first_round_s']:>10.2f} {r['round_s']:>8.2f} "
                  f"{r['updates_per_s']:>10.0f} {r['wall_s']:>7.1f}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
