"""python -m benchmarks.setup_cost --bundle B --data FILE: what a device's set-up costs in a worker of many devices.

Each logical device of an emulator worker sets up before its first task (device_sdk.setup): the
bundle checked (its program hashed), the data file read, shuffled and dealt, the tokenizer loaded,
its own rows tokenised. Alone, a device does all of it; in a worker, its devices share what they
read alike (device_sdk.setup.Shared), read once. This times both, interleaved, for `--sample`
devices of a fleet of `--devices`, `--repeats` times, and prints per-device milliseconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fwdfed.cli import quiet_libraries, run_main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.setup_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=1000, help="the fleet the shards are dealt to")
    parser.add_argument("--sample", type=int, default=20, help="devices set up each way per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the figures here (JSON)")
    args = parser.parse_args(argv)
    if min(args.devices, args.sample, args.repeats) < 1 or args.sample > args.devices:
        parser.error("--devices, --sample and --repeats must be at least 1, and --sample at most --devices")
    quiet_libraries()
    from device_sdk.setup import DeviceConfig, Shared, set_up

    def config(i: int) -> DeviceConfig:
        return DeviceConfig(device_id=f"emu-{i}", coordinator="ws://127.0.0.1:1", bundle=str(args.bundle),
                            data=str(args.data), shard_index=i, shard_count=args.devices)

    runs = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        for i in range(args.sample):
            set_up(config(i))
        alone = (time.perf_counter() - started) / args.sample
        started = time.perf_counter()
        shared = Shared.read(config(0))
        read = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(args.sample):
            set_up(config(i), shared)
        each = (time.perf_counter() - started) / args.sample
        runs.append({"alone_ms": 1000 * alone, "shared_read_ms": 1000 * read, "shared_per_device_ms": 1000 * each})
        print(f"a device alone {1000 * alone:.0f} ms; in a worker: {1000 * read:.0f} ms once, then "
              f"{1000 * each:.1f} ms a device", flush=True)
    if args.out is not None:
        command = "python -m benchmarks.setup_cost " + " ".join(sys.argv[1:] if argv is None else argv)
        args.out.write_text(json.dumps({"command": command, "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    quiet_libraries()
    run_main(main)
