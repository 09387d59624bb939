"""python -m device_sdk.emulate: N emulated devices, each its own process with its own shard.

    python -m device_sdk.emulate --mem 1.5GB --coordinator ws://127.0.0.1:8765 --devices 3 \\
        --bundle bundles/stories --data ../shared/data/tinystories/train_head.txt

Each device runs the bundle's `.pte` through the ExecuTorch runtime, trains with MeZO and
uploads (seed, coefficient) pairs. `--mem` is the per-device budget; it is reported to the
coordinator, and a device stops with an error when its measured peak passes it (device_sdk.budget). With `--ray [ADDRESS]` the
workers are Ray actors, on a local cluster or the one at ADDRESS (device_sdk.ray_fleet); the
`--profile-*` flags give each device a speed, a dropout rate, a budget and an online window
(device_sdk.profiles), and `--time-scale` holds each update until its device's simulated training time
has passed (device_sdk.fleet_time).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
import time
from pathlib import Path

from fwdfed.cli import quiet_libraries, run_main
from fwdfed.errors import UserError
from fwdfed.progress import progress

LOCAL_RAY = "local"  # --ray without an address


def parse_args(argv):
    from fwdfed.memory import parse_size

    parser = argparse.ArgumentParser(prog="python -m device_sdk.emulate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mem", required=True, help="memory budget per device, e.g. 1.5GB, 1500MB, 800MiB")
    parser.add_argument("--coordinator", required=True, help="ws://host:port of the coordinator")
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--workers", type=int, help="processes (or Ray actors) the devices are multiplexed over "
                        "(default: one per device; with --ray, as many as the cluster's CPUs hold); a worker loads "
                        "the program once and trains one device at a time")
    parser.add_argument("--ray", nargs="?", const=LOCAL_RAY, metavar="ADDRESS",
                        help="run the workers as actors on a Ray cluster: a local one (alone), or the one at ADDRESS "
                             "(host:port of its head); needs the extra: pip install -e '.[ray]'")
    parser.add_argument("--ray-cpus", type=float, default=1.0,
                        help="with --ray: CPUs a worker reserves, those of the one device it trains at a time "
                             "(it reserves that device's memory budget too); default 1")
    parser.add_argument("--bundle", type=Path, required=True, help="exported bundle folder")
    parser.add_argument("--data", type=Path, required=True,
                        help="training data (.txt, .csv, .tsv or .jsonl); shuffled, held-out slice left out, dealt to the devices")
    parser.add_argument("--teacher-bundle", type=Path,
                        help="fedkd: the teacher's inference-only bundle; each device labels its shard with it and "
                             "frees it before loading the student")
    parser.add_argument("--device-prefix", default="emu", help="devices are named PREFIX-0, PREFIX-1, ...")
    parser.add_argument("--connect-timeout", type=float, default=30.0, help="seconds to keep trying to reach the coordinator")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--credentials", type=Path,
                        help="JSON file of device id -> credential: its private key, or a bearer token (from "
                             "`python -m coordinator enrol`, `enrol --bearer`)")
    parser.add_argument("--ca-file", type=Path, help="CA certificate (PEM) that signed the coordinator's wss:// certificate")
    parser.add_argument("--trust-key", type=Path,
                        help="the operator's public key (trust_key.pem from `python -m coordinator keygen`): refuse a "
                             "bundle or teacher it did not sign (docs/security.md); without it bundles are unchecked")
    parser.add_argument("--no-isolate-load", dest="isolate_load", action="store_false",
                        help="load the program in the device's own process without first running it in a forked "
                             "child: a program that crashes the runtime then takes the device with it "
                             "(docs/security.md, Isolated loading)")
    from runtime.data import add_data_arguments, add_partition_arguments

    add_data_arguments(parser, "training data")
    add_partition_arguments(parser)
    from device_sdk.profiles import add_profile_arguments, spec_of

    add_profile_arguments(parser)
    args = parser.parse_args(argv)
    try:
        args.mem_bytes = parse_size(args.mem)
    except ValueError as e:
        parser.error(f"--mem: {e}")
    if args.devices < 1:
        parser.error("--devices must be at least 1")
    if args.workers is None and args.ray is None:
        args.workers = args.devices
    if args.workers is not None and not 1 <= args.workers <= args.devices:
        parser.error("--workers must be between 1 and --devices")
    if not args.coordinator.startswith(("ws://", "wss://")):
        parser.error(f"--coordinator must be a ws:// or wss:// URL, got {args.coordinator!r}")
    if args.connect_timeout <= 0:
        parser.error("--connect-timeout must be positive")
    if not (math.isfinite(args.ray_cpus) and args.ray_cpus > 0):
        parser.error(f"--ray-cpus must be a number > 0, got {args.ray_cpus!r}")
    if args.ray not in (None, LOCAL_RAY):
        from device_sdk.ray_fleet import split_address

        try:
            split_address(args.ray)
        except ValueError as e:
            parser.error(str(e))
    try:
        args.profile_spec = spec_of(args)
    except ValueError as e:
        parser.error(str(e))
    return args


def report(workers: list[dict]) -> None:
    """One line per device and per worker, the late devices of each round, and whether the workers kept up."""
    from fwdfed.memory import format_size

    records = []
    for w in workers:
        for r in w["devices"]:
            away = f", {r['went_offline']} lost to the end of its window" if r["went_offline"] else ""
            print(f"device {r['device_id']}: {r['updates_accepted']} updates accepted, {r['late']} late, simulated "
                  f"{r['simulated_seconds']:.3g} s (speed x{r['speed']:.2f}, {r['dropouts']} dropouts{away})",
                  flush=True)
            records.append(r)
        where = "" if w["node"] == "local" else f" on Ray node {w['node']}"
        budget = max(r["mem_budget_bytes"] or 0 for r in w["devices"])  # --mem, or its devices' largest profile's
        print(f"worker of {len(w['devices'])} device(s){where}: peak RSS {format_size(w['peak_rss'])} "
              f"(budget {format_size(budget) if budget else 'none'} per device)", flush=True)
    records.sort(key=lambda r: r["device_id"])
    late = sorted({(t["round"], r["device_id"]) for r in records for t in r["tasks"] if t["outcome"] == "late"})
    for number in sorted({n for n, _ in late}):
        names = [name for n, name in late if n == number]
        print(f"round {number}: {len(names)} late (the round closed without them): {', '.join(names)}", flush=True)
    lags = [t["lag_seconds"] for r in records for t in r["tasks"] if "lag_seconds" in t]
    if lags:
        behind = sum(lag > 0 for lag in lags)
        print(f"time scale: {behind} of {len(lags)} tasks trained after their update was due (the workers fell "
              f"behind the simulated clock), by at most {max(lags):.1f} s", flush=True)


def run_processes(groups: list[tuple[list, list]], timing, run_devices=None) -> tuple[list[dict], list[str]]:
    """Every group in its own process, `run_devices(configs, profiles, timing, sender)` (device_sdk.worker's); (the
    records of the workers that finished, the devices of those that failed)."""
    if run_devices is None:
        from device_sdk.worker import run_devices
    ctx = multiprocessing.get_context("spawn")
    # A pipe per worker, read before the worker is joined: a worker of hundreds of devices sends more records than a
    # pipe holds, and blocks until they are read.
    pipes = [ctx.Pipe(duplex=False) for _ in groups]
    processes = [ctx.Process(target=run_devices, args=(configs, profiles, timing, sender),
                             name=",".join(c.device_id for c in configs))
                 for (configs, profiles), (_, sender) in zip(groups, pipes)]
    for p, (_, sender) in zip(processes, pipes):
        p.start()
        sender.close()  # the worker's end: once the worker is gone, reading ours ends
    bar = progress(total=sum(len(configs) for configs, _ in groups), desc="devices", unit="device")
    finished, failed = [], []
    for p, (receiver, _), (configs, _) in zip(processes, pipes, groups):
        try:
            record = receiver.recv()
        except EOFError:  # it died before sending its records
            record = None
        p.join()
        if p.exitcode == 0 and record is not None:
            finished.append(record)
        else:
            failed += [c.device_id for c in configs]
        bar.update(len(configs))
    bar.close()
    return finished, failed


def credential_fields(value) -> dict | None:
    """An enrol file's entry as DeviceConfig fields: {"private_key": PEM} as it is, a string as a bearer token
    (`enrol --bearer`); None for anything else."""
    if isinstance(value, str):
        return {"token": value}
    if isinstance(value, dict) and set(value) == {"private_key"} and isinstance(value["private_key"], str):
        return {"private_key": value["private_key"]}
    return None


def read_credentials(path: Path, names: list[str]) -> dict[str, dict]:
    """Each emulated device's credential from `coordinator enrol`'s file, as DeviceConfig fields; every device
    must have one."""
    import json

    try:
        entries = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the credentials file {path}: {e}") from None
    credentials = {k: credential_fields(v) for k, v in entries.items()} if isinstance(entries, dict) else None
    if credentials is None or None in credentials.values():
        raise UserError(f"{path} must map device ids to {{\"private_key\": PEM}} or to tokens, as `python -m "
                        "coordinator enrol --out` writes")
    missing = [name for name in names if name not in credentials]
    if missing:
        raise UserError(f"{path} has no credential for {', '.join(missing[:5])}: enrol them first")
    return credentials


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    from collections import Counter

    from device_sdk.client import DeviceConfig
    from device_sdk.fleet_time import Timing
    from fwdfed.bundle.manifest import load_bundle
    from fwdfed.bundle.signing import fingerprint, load_public_key
    from fwdfed.memory import format_size
    from runtime.data import data_spec, partition, partition_of, read_examples, split

    # Check everything the devices share before starting any of them.
    trust_key = load_public_key(args.trust_key) if args.trust_key else None
    bundle = load_bundle(args.bundle, trust_key=trust_key)
    if args.teacher_bundle is not None:
        from runtime.teacher import check_teacher

        check_teacher(load_bundle(args.teacher_bundle, trust_key=trust_key), bundle)
    if trust_key is not None:
        print(f"bundle signed by the trusted key {fingerprint(trust_key)}", flush=True)
    spec, how = data_spec(args, bundle.manifest.model.num_labels), partition_of(args)
    examples = read_examples(args.data, spec)
    shards = partition(split(examples, "train"), args.devices, how)
    if min(map(len, shards)) == 0:
        raise UserError(f"{args.devices} devices are more than the {args.split} split of {args.data} can feed: "
                        "a device would have no examples")
    print(f"emulating {args.devices} devices, budget {args.mem} ({format_size(args.mem_bytes)}) each, "
          f"{len(examples)} examples in {args.data}, model {bundle.manifest.model.source} (bundle {args.bundle})",
          flush=True)
    described = f"{how.how}" + (f", alpha {how.alpha:g}" if how.how == "dirichlet" else "") + \
        (f", size skew {how.size_skew:g}" if how.size_skew else "") + f", data seed {spec.seed}"
    print(f"split {described}: shard sizes {[len(s) for s in shards]}", flush=True)
    if any(e.label is not None for e in examples):
        for i, s in enumerate(shards[:8]):
            counts = Counter(e.label for e in s if e.label is not None)
            unlabelled = sum(e.label is None for e in s)
            print(f"  {args.device_prefix}-{i} classes {dict(sorted(counts.items()))}"
                  + (f", {unlabelled} unlabelled" if unlabelled else ""), flush=True)
    names = [f"{args.device_prefix}-{i}" for i in range(args.devices)]
    tokens = read_credentials(args.credentials, names) if args.credentials else {}
    profile_spec = args.profile_spec
    profiles = [profile_spec.draw(name, args.mem_bytes) for name in names]
    print(profiles_line(profiles, profile_spec, args.time_scale), flush=True)
    configs = [DeviceConfig(device_id=name, coordinator=args.coordinator, bundle=str(args.bundle), data=str(args.data),
                            shard_index=i, shard_count=args.devices, mem_budget_bytes=profiles[i].mem_budget_bytes,
                            connect_timeout_s=args.connect_timeout, seed=args.seed, **tokens.get(name, {}),
                            ca_file=str(args.ca_file) if args.ca_file else None, data_spec=spec, partition=how,
                            teacher_bundle=str(args.teacher_bundle) if args.teacher_bundle else None,
                            trust_key=str(args.trust_key) if args.trust_key else None, isolate_load=args.isolate_load)
               for i, name in enumerate(names)]
    # Simulated time 0 for every worker: their devices' online windows and, at --time-scale, their clocks.
    timing = Timing(spec_seed=profile_spec.seed, start=time.time(), scale=args.time_scale, day=profile_spec.day)
    if args.ray is None:
        groups = [(configs[w :: args.workers], profiles[w :: args.workers]) for w in range(args.workers)]
        workers, failed = run_processes(groups, timing)
        failures = [f"{len(failed)} of {len(configs)} devices failed: {', '.join(failed)}"] if failed else []
    else:
        workers, failures = run_on_ray(args, configs, profiles, timing)
    report(workers)
    if args.profile_out is not None:
        from device_sdk.profiles import write_record

        write_record(args.profile_out, profile_spec, args.time_scale, workers)
    for line in failures:
        print(f"error: {line}", file=sys.stderr)
    return 1 if failures else 0


def run_on_ray(args, configs: list, profiles: list, timing) -> tuple[list[dict], list[str]]:
    import os

    from device_sdk import ray_fleet

    address = None if args.ray == LOCAL_RAY else args.ray
    local_cpus = math.ceil(args.workers * args.ray_cpus) if args.workers else (os.cpu_count() or 1)
    ray = ray_fleet.start(address, local_cpus)
    try:
        workers = args.workers or max(1, min(len(configs), int(ray_fleet.cluster_cpus(ray) // args.ray_cpus)))
        print(f"Ray cluster of {ray_fleet.cluster_cpus(ray):g} CPUs: {workers} worker(s) of {args.ray_cpus:g} CPU(s)",
              flush=True)
        groups = [(configs[w :: workers], profiles[w :: workers]) for w in range(workers)]
        return ray_fleet.run_workers(ray, groups, timing, args.ray_cpus)
    finally:
        ray.shutdown()


def profiles_line(profiles: list, spec, time_scale: float | None) -> str:
    from fwdfed.memory import format_size

    speeds = [p.speed for p in profiles]
    mems = [p.mem_budget_bytes or 0 for p in profiles]
    shares = [p.online_share for p in profiles]
    online = "always online" if min(shares) >= 1 else \
        f"online {min(shares):.0%}-{max(shares):.0%} of a {spec.day:g} s simulated day"
    scale = "simulated time apart from wall time" if time_scale is None else \
        f"{time_scale:g} wall s per simulated s"
    return (f"profiles (seed {spec.seed}): speed x{min(speeds):.2f}-x{max(speeds):.2f}, dropout {spec.dropout:g} per task, "
            f"budget {format_size(min(mems))}-{format_size(max(mems))}, {online}; {scale}")


if __name__ == "__main__":
    quiet_libraries()
    run_main(main)
