"""Issue 25's fault scenarios, longer than the suite runs them (tests/integration/test_network_faults.py), with
their figures: updates sent, accepted, refused, lost (0), doubled (0); rounds completed; the times to recover.

    sudo python -m benchmarks.faults --scenario all [--devices 60] [--rounds 10] [--out faults.json]

Scenarios (tests/support/fault_scenarios.py says what each does):
- latency: every packet each way delayed 200 ± 50 ms and 5% lost, enrolled devices (the handshake crosses it);
- reorder: a quarter of the packets overtaking the rest (delayed 20 ms), updates of 300 pairs;
- partition: a third of the fleet (those holding round 2's tasks) cut off for --hold seconds, then healed;
- kill-sqlite, kill-postgres: the coordinator kill -9ed mid-round 2 and restarted on the same database
  (kill-postgres needs FWDFED_TEST_POSTGRES_URL, as .ci/run sets it; it runs in a schema of its own);
- disk-full: the SQLite database on a small tmpfs (2 MB, 50 KB a device past 40) that fills mid-round 2, then
  has room again.
The network scenarios make two network namespaces and TUN devices, the disk one mounts a tmpfs: they need root.
Any bundle gives the job its identity (--bundle); by default a stand-in one (tests/support/fake_bundle.py) is
written, which needs ../shared's stories260K tokenizer. A scenario whose checks fail is printed as a MISS and
the command exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from fwdfed.cli import quiet_libraries, run_main
from fwdfed.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the fleet, the link and the ledger live with the tests (tests/support)

SCENARIOS = ("latency", "reorder", "partition", "kill-sqlite", "kill-postgres", "disk-full")


def run_scenario(name: str, workdir: Path, bundle: Path, args):
    """The scenario's outcome, and why it missed or None (checked while its database is there)."""
    from tests.support import fault_scenarios as s

    if name == "kill-postgres":
        with s.postgres_schema(os.environ["FWDFED_TEST_POSTGRES_URL"]) as url:
            outcome = s.coordinator_killed(workdir, bundle, url, devices=args.devices, rounds=args.rounds,
                                           within_s=args.within)
            return outcome, check(outcome)
    if name == "latency":
        outcome = s.impaired_job(workdir, bundle, devices=args.devices, rounds=args.rounds, enrolled=True,
                                 seed=args.seed, impairment={"delay_ms": 200, "jitter_ms": 50, "loss": 0.05},
                                 within_s=args.within)
    elif name == "reorder":
        outcome = s.impaired_job(workdir, bundle, devices=args.devices, rounds=args.rounds, pairs=300, seed=args.seed,
                                 impairment={"delay_ms": 20, "reorder": 0.25}, within_s=args.within)
    elif name == "partition":  # rounds enough to go on after the heal (a round takes at least about 0.6 s)
        outcome = s.partition(workdir, bundle, devices=args.devices, rounds=args.rounds + 2 * args.hold,
                              deadline_s=args.hold * 0.8, hold_s=args.hold, seed=args.seed, within_s=args.within)
    elif name == "kill-sqlite":
        outcome = s.coordinator_killed(workdir, bundle, str(workdir / "job.db"), devices=args.devices,
                                       rounds=args.rounds, within_s=args.within)
    else:
        outcome = s.disk_fills(workdir, bundle, devices=args.devices, rounds=args.rounds, within_s=args.within)
    return outcome, check(outcome)


def check(outcome) -> str | None:
    """Why the scenario missed (a coordinator that did not finish the job, lost, doubled or altered updates, versions
    that are not the aggregation of their updates, devices not told the job ended), or None."""
    from tests.support.fault_scenarios import assert_recovered

    try:
        assert_recovered(outcome)
    except AssertionError as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else "a check failed"
    return None


def link_line(link: dict) -> str:
    ways = []
    for way in ("near_to_far", "far_to_near"):
        c = link[way]
        delay = f", delay {c['delay_ms_min']:.0f}-{c['delay_ms_max']:.0f} ms (mean {c['delay_ms_mean']:.0f})" \
            if c.get("delayed") else ""
        ways.append(f"{way.replace('_', ' ')}: {c['arrived']} packets, {c['lost']} lost, {c['partitioned']} cut off, "
                    f"{c['reordered']} reordered ({c['reordered_in_flow']} within a TCP connection){delay}")
    return "; ".join(ways)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", nargs="+", choices=(*SCENARIOS, "all"), required=True)
    parser.add_argument("--devices", type=int, default=60, help="fleet size (at least 21)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--hold", type=int, default=30, help="partition: seconds the third is cut off")
    parser.add_argument("--within", type=float, default=600, help="seconds after which a scenario's fleet gives up")
    parser.add_argument("--seed", type=int, default=0, help="the link's draws, the fleet's pauses, the sampling")
    parser.add_argument("--bundle", type=Path, help="any exported bundle: the job's identity (default: a stand-in)")
    parser.add_argument("--out", type=Path, help="write every scenario's figures here (JSON)")
    args = parser.parse_args(argv)
    quiet_libraries()
    if args.devices < 21 or args.rounds < 3 or args.hold < 5:
        raise UserError("--devices must be at least 21, --rounds at least 3, --hold at least 5")
    names = SCENARIOS if "all" in args.scenario else tuple(dict.fromkeys(args.scenario))
    if "kill-postgres" in names and not os.environ.get("FWDFED_TEST_POSTGRES_URL"):
        raise UserError("kill-postgres needs FWDFED_TEST_POSTGRES_URL (a PostgreSQL URL whose user may create "
                        "a schema)")
    if os.geteuid() != 0 and set(names) - {"kill-sqlite", "kill-postgres"}:
        raise UserError("the network and disk scenarios need root (network namespaces, TUN devices, a tmpfs)")
    results, missed = {}, []
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        bundle = args.bundle
        if bundle is None:
            from tests.support.fake_bundle import write_fake_bundle

            bundle = write_fake_bundle(Path(tmp) / "bundle")
        for name in names:
            workdir = Path(tmp) / name
            workdir.mkdir()
            started = time.perf_counter()
            outcome, miss = run_scenario(name, workdir, bundle, args)
            wall = time.perf_counter() - started
            print(f"\n{name}: {args.devices} devices, {outcome.ledger.rounds_closed} rounds ({wall:.0f} s wall)")
            print(f"  {outcome.ledger.line()}")
            print("  " + ", ".join(f"{k} {v:.1f} s" for k, v in outcome.times.items()))
            if outcome.link:
                print(f"  link: {link_line(outcome.link)}")
            if outcome.facts:
                shown = {k: v for k, v in outcome.facts.items() if k != "first_stderr"}
                print(f"  {json.dumps(shown)}")
            if name == "disk-full":
                print(f"  the first coordinator's last line: {outcome.facts['first_stderr'].strip().splitlines()[-1]}")
            if miss:
                missed.append(name)
                print(f"  MISS: {miss}")
            results[name] = {"ledger": outcome.ledger.as_dict(), "times": outcome.times, "link": outcome.link,
                             "facts": {k: v for k, v in outcome.facts.items() if k != "first_stderr"},
                             "wall_s": wall, "miss": miss}
            sys.stdout.flush()
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                       indent=1))
    print(f"\n{len(names) - len(missed)} of {len(names)} scenarios kept every update once" +
          (f"; missed: {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    run_main(main)
