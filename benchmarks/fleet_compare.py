"""python -m benchmarks.fleet_compare --out DIR --bundle B: the same fleet job on worker processes and on Ray.

One job (benchmarks.fleet's: AG News dealt to `--devices` emulated devices, `--per-round` a
round, the class-statistics head round and then FZOO through the split MiniLM program B) runs
twice from fresh databases: the devices as `--workers` worker processes, then as as many Ray actors
on a local Ray cluster. The coordinator serves with `--min-available` the whole fleet, so that
each round samples once every device is connected: the same devices, the same seed, the same
sample. Nothing else differs, so the two jobs must store the same updates, device by device and
round by round (seeds, coefficients, examples, dense payload), and make the same global versions,
bit for bit. DIR/report.json holds both jobs' figures (wall time, updates per round, held-out
accuracy) and the comparison; the command exits 1 if the jobs differ.

No stragglers here (no time scale, dropouts or online windows: benchmarks.fleet has them):
which updates a round takes then depends on the order they arrive in, which no two runs share.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.fleet import AG_NEWS
from benchmarks.job import JobSpec, run_job
from fwdfed.cli import quiet_libraries
from fwdfed.errors import UserError


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet_compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, required=True, help="a split MiniLM bundle (benchmarks.fleet)")
    parser.add_argument("--data", type=Path, default=AG_NEWS)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2, help="FZOO rounds after the head round")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, and Ray actors")
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--eval-examples", type=int, default=800)
    args = parser.parse_args(argv)
    if min(args.devices, args.per_round, args.rounds, args.workers, args.local_steps, args.eval_examples) < 1:
        parser.error("--devices, --per-round, --rounds, --workers, --local-steps and --eval-examples "
                     "must be at least 1")
    if args.per_round > args.devices:
        parser.error("--per-round must not exceed --devices")
    return args


def job_spec(args, where: list[str]) -> JobSpec:
    """benchmarks.fleet's job and rates, every round sampled from the whole connected fleet."""
    training = ["--method", "fzoo", "--local-steps", str(args.local_steps), "--lr", "3e-3", "--eps", "1e-3",
                "--directions", "8", "--head-init", "lda", "--min-available", str(args.devices)]
    return JobSpec(bundle=args.bundle, data=args.data, rounds=args.rounds, training=training, devices=args.devices,
                   per_round=args.per_round, workers=args.workers, eval_examples=args.eval_examples,
                   device_flags=["--connect-timeout", "600", *where])


def stored(db: Path) -> tuple[dict, list[np.ndarray]]:
    """The job's stored updates, {"round/device": [sha256 of its (seed, coefficient) pairs as stored, scale,
    examples, sha256 of its dense part]}, and its global versions in order."""
    from coordinator.store import open_store

    store = open_store(db)
    job = store.latest_job()
    if job.status != "finished":
        raise UserError(f"the job in {db} ended {job.status}, not finished")
    updates = {}
    for rnd in store.closed_round_list(job.id):
        for u in store.updates(rnd.id):
            updates[f"{rnd.number}/{u.device_id}"] = [hashlib.sha256(u.pairs).hexdigest(), u.scale, u.num_examples,
                                                      hashlib.sha256(u.dense or b"").hexdigest()]
    return updates, [np.frombuffer(v.vector, "<f4") for v in store.versions(job.id)]


def compare(a: Path, b: Path) -> dict:
    """How the two jobs' stored updates and versions agree."""
    updates_a, versions_a = stored(a)
    updates_b, versions_b = stored(b)
    same = [k for k in updates_a if updates_b.get(k) == updates_a[k]]
    return {"updates": [len(updates_a), len(updates_b)], "identical_updates": len(same),
            "only_in_one": sorted(set(updates_a).symmetric_difference(updates_b))[:20],
            "versions": [len(versions_a), len(versions_b)],
            "identical_versions": sum(np.array_equal(x, y) for x, y in zip(versions_a, versions_b)),
            "max_version_difference": max((float(np.max(np.abs(x - y))) for x, y in zip(versions_a, versions_b)),
                                          default=0.0)}


def summary(figures: dict) -> dict:
    return {"job_seconds": figures["job_seconds"],
            "rounds": [{k: r.get(k) for k in ("round", "updates", "seconds", "heldout_accuracy", "heldout_loss")}
                       for r in figures["rounds"]]}


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    if not args.data.is_file():
        raise UserError(f"{args.data} does not exist (the shared data beside the checkout)")
    out = args.out.resolve()
    jobs = {"processes": [], "ray": ["--ray"]}
    figures = {name: run_job(job_spec(args, where), out / name) for name, where in jobs.items()}
    comparison = compare(out / "processes" / "job.db", out / "ray" / "job.db")
    report = {"command": "python -m benchmarks.fleet_compare " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "jobs": {name: summary(f) for name, f in figures.items()}, "comparison": comparison}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    for name, job in report["jobs"].items():
        rounds = "; ".join(f"round {r['round']}: {r['updates']} updates, accuracy {r['heldout_accuracy']}"
                           for r in job["rounds"])
        print(f"{name}: job wall {job['job_seconds'] / 60:.1f} min; {rounds}")
    c = comparison
    print(f"updates: {c['updates'][0]} and {c['updates'][1]} stored, {c['identical_updates']} identical; versions: "
          f"{c['identical_versions']} of {c['versions'][0]} identical "
          f"(largest difference {c['max_version_difference']:.3g})")
    identical = (c["updates"][0] == c["updates"][1] == c["identical_updates"]
                 and c["versions"][0] == c["versions"][1] == c["identical_versions"])
    print("identical" if identical else "the two jobs differ", f"(report {out / 'report.json'})")
    return 0 if identical else 1


if __name__ == "__main__":
    from fwdfed.cli import run_main

    run_main(main)
