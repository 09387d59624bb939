"""python -m device_sdk.emulate: N emulated devices, each its own process with its own shard.

    python -m device_sdk.emulate --mem 1.5GB --coordinator ws://127.0.0.1:8765 --devices 3 \\
        --bundle bundles/stories --data ../shared/data/tinystories/train_head.txt

Each device runs the bundle's `.pte` through the ExecuTorch runtime, trains with MeZO and
uploads (seed, coefficient) pairs. `--mem` is the per-device budget; it is reported to the
coordinator, and each device warns when its measured peak passes it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import sys
from pathlib import Path

from fwdfed.cli import quiet_libraries, run_main
from fwdfed.errors import UserError


def parse_args(argv):
    from fwdfed.memory import parse_size

    parser = argparse.ArgumentParser(prog="python -m device_sdk.emulate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mem", required=True, help="memory budget per device, e.g. 1.5GB, 1500MB, 800MiB")
    parser.add_argument("--coordinator", required=True, help="ws://host:port of the coordinator")
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--workers", type=int, help="processes the devices are multiplexed over (default: one per "
                        "device); a worker loads the program once and trains one device at a time")
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
    from device_sdk.data import add_data_arguments, add_partition_arguments

    add_data_arguments(parser, "training data")
    add_partition_arguments(parser)
    args = parser.parse_args(argv)
    try:
        args.mem_bytes = parse_size(args.mem)
    except ValueError as e:
        parser.error(f"--mem: {e}")
    if args.devices < 1:
        parser.error("--devices must be at least 1")
    if args.workers is None:
        args.workers = args.devices
    if not 1 <= args.workers <= args.devices:
        parser.error("--workers must be between 1 and --devices")
    if not args.coordinator.startswith(("ws://", "wss://")):
        parser.error(f"--coordinator must be a ws:// or wss:// URL, got {args.coordinator!r}")
    if args.connect_timeout <= 0:
        parser.error("--connect-timeout must be positive")
    return args


def run_devices(configs: list) -> None:
    """Process entry: these logical devices, start to finish, sharing one loaded program and taking
    turns to train (each keeps its own shard, token, seeds and connection). Exit status 2 with one
    line on a user error."""
    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    from device_sdk.client import Device
    from device_sdk.engine import ProgramEngine
    from fwdfed.memory import format_size, peak_rss

    async def run_all() -> list[int]:
        lock = asyncio.Lock()
        # Every device labels its shard with its teacher (if given) before the shared student program is
        # loaded, so that no teacher is resident beside the student.
        devices = [Device(c, train_lock=lock, load_program=False) for c in configs]
        engine = ProgramEngine.for_bundle(devices[0].bundle)
        for d in devices:
            d.engine = engine
        return await asyncio.gather(*(d.run() for d in devices))

    def main(_argv):
        done = asyncio.run(run_all())
        budget = format_size(configs[0].mem_budget_bytes) if configs[0].mem_budget_bytes else "none"
        for config, tasks in zip(configs, done):
            print(f"device {config.device_id}: {tasks} updates accepted", flush=True)
        print(f"worker of {len(configs)} device(s): peak RSS {format_size(peak_rss())} (budget {budget} per process)",
              flush=True)
        return 0

    run_main(main)


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
    from device_sdk.data import data_spec, partition, partition_of, read_examples, split
    from fwdfed.bundle.manifest import load_bundle
    from fwdfed.bundle.signing import fingerprint, load_public_key
    from fwdfed.memory import format_size

    # Check everything the devices share before starting any of them.
    trust_key = load_public_key(args.trust_key) if args.trust_key else None
    bundle = load_bundle(args.bundle, trust_key=trust_key)
    if args.teacher_bundle is not None:
        from device_sdk.teacher import check_teacher

        check_teacher(load_bundle(args.teacher_bundle, trust_key=trust_key), bundle)
    if trust_key is not None:
        print(f"bundle signed by the trusted key {fingerprint(trust_key)}", flush=True)
    spec, how = data_spec(args, bundle.manifest.model.get("num_labels")), partition_of(args)
    examples = read_examples(args.data, spec)
    shards = partition(split(examples, "train"), args.devices, how)
    if min(map(len, shards)) == 0:
        raise UserError(f"{args.devices} devices are more than the {args.split} split of {args.data} can feed: "
                        "a device would have no examples")
    print(f"emulating {args.devices} devices, budget {args.mem} ({format_size(args.mem_bytes)}) each, "
          f"{len(examples)} examples in {args.data}, model {bundle.manifest.model['source']} (bundle {args.bundle})",
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
    configs = [DeviceConfig(device_id=name, coordinator=args.coordinator, bundle=str(args.bundle), data=str(args.data),
                            shard_index=i, shard_count=args.devices, mem_budget_bytes=args.mem_bytes,
                            connect_timeout_s=args.connect_timeout, seed=args.seed, **tokens.get(name, {}),
                            ca_file=str(args.ca_file) if args.ca_file else None, data_spec=spec, partition=how,
                            teacher_bundle=str(args.teacher_bundle) if args.teacher_bundle else None,
                            trust_key=str(args.trust_key) if args.trust_key else None)
               for i, name in enumerate(names)]
    ctx = multiprocessing.get_context("spawn")
    groups = [configs[w :: args.workers] for w in range(args.workers)]
    processes = [ctx.Process(target=run_devices, args=(g,), name=",".join(c.device_id for c in g)) for g in groups]
    for p in processes:
        p.start()
    for p in processes:
        p.join()
    failed = [c.device_id for p, g in zip(processes, groups) if p.exitcode != 0 for c in g]
    if failed:
        print(f"error: {len(failed)} of {len(configs)} devices failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    quiet_libraries()
    run_main(main)
