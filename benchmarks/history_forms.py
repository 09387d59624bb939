"""Each version of a finished job in the downlink's forms: the bytes of its history entry as seeds and coefficients,
packed by the job's seed pool, and the dense adapter's, read from the job's database.

    python -m benchmarks.history_forms --db DIR/job.db

For every version: its round's method, the seed sums the coordinator's rule made of the stored updates (the
same `coordinator.downlink.Downlink` a running coordinator uses, replay check included), whether it carries a
span and how many values, the msgpack bytes of the entry with `seeds` and `coefs` and with `sums` packed (a job
with `--seed-pool K`: 8·K bytes), and the form of the entry the coordinator makes (fwdfed.history.entry: the
smaller), against 4·d for the dense adapter: a task whose history makes a larger frame than the dense adapter's
goes dense. docs/protocol.md, Downlink in seed form.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import msgpack
import numpy as np

from fwdfed.cli import run_main
from fwdfed.errors import UserError


def entry_sizes(step: dict, pool: np.ndarray | None) -> tuple[int, int | None]:
    """The msgpack bytes of a history entry with `seeds` and `coefs`, and with `sums` packed by the job's `pool`
    (None without one), whichever form it came in."""
    from fwdfed.history import entry_sums

    common = {k: v for k, v in step.items() if k not in ("seeds", "coefs", "sums")}
    sums = entry_sums(step, pool)
    arrays = common | {"seeds": sums.seeds, "coefs": sums.coefs}
    packed = None if pool is None else common | {"sums": b"\0" * (8 * len(pool))}
    return len(msgpack.packb(arrays)), None if packed is None else len(msgpack.packb(packed))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.history_forms", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, required=True, help="a job's database (benchmarks.agnews: DIR/job.db)")
    args = parser.parse_args(argv)
    if not args.db.is_file():
        raise UserError(f"{args.db} does not exist")
    from coordinator.downlink import Downlink
    from coordinator.job import JobOptions, round_method_name
    from coordinator.store import open_store
    from coordinator.strategies import build
    from coordinator.strategies.scheduled import ScheduledRound
    from fwdfed import methods
    from fwdfed.directions import seed_pool

    store = open_store(args.db)
    job = store.latest_job()
    if job is None:
        raise UserError(f"{args.db} holds no job")
    options = JobOptions.from_json(job.options)
    strategy = build(job, options)

    def round_strategy(number: int):
        name = round_method_name(job.method, options, number)
        return strategy if name == job.method else ScheduledRound(methods.get(name), {}, None, strategy)

    downlink = Downlink(store, job, {}, round_strategy)
    pool = None if options.seed_pool is None else seed_pool(int(options.seed_pool_key, 16), options.seed_pool)
    seeds = f"seed pool K = {options.seed_pool:,}" if options.seed_pool else "free seeds"
    print(f"job {job.id}: d = {job.adapter_dim:,} (dense adapter {4 * job.adapter_dim:,} B), {seeds}")
    print(f"{'version':>7} {'method':<12} {'sums':>7} {'span values':>11} {'seeds+coefs B':>14} {'packed B':>9}  entry")
    rounds = {r.id: r for r in store.closed_round_list(job.id)}
    for version in store.versions(job.id)[1:]:
        method = round_method_name(job.method, options, rounds[version.round_id].number)
        step = downlink.version_entry(version.version)
        if step is None:
            print(f"{version.version:>7} {method:<12} {'-':>7} {'-':>11} {'-':>14} {'-':>9}  dense (no entry)")
            continue
        arrays, packed = entry_sizes(step, pool)
        count = len(step["seeds"]) if "seeds" in step else int(np.count_nonzero(np.frombuffer(step["sums"], "<f8")))
        span = len(step["span"]) // 4 if "span" in step else 0
        print(f"{version.version:>7} {method:<12} {count:>7,} {span:>11,} {arrays:>14,} "
              f"{'-' if packed is None else f'{packed:,}':>9}  {'packed' if 'sums' in step else 'seeds+coefs'}"
              + (" (larger than dense)" if min(arrays, packed or arrays) > 4 * job.adapter_dim else ""))
    return 0


if __name__ == "__main__":
    run_main(main)
