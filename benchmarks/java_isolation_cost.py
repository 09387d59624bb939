"""python -m benchmarks.java_isolation_cost --device-bundle STORIES --probe-bundle B [B ...]: what the Java
device's isolated loading costs on the JVM (docs/security.md, Isolated loading).

- **The device** (`--device-bundle`, a bundle whose tokenizer the Java device reads: stories260K): the Java
  device (`JvmDevice`, android_demo/core) joins a real coordinator for one round of one task, with its
  program tried first in a child process (the default) and without (`--no-isolate-load`), `--repeats`
  times each, alternating. Per run: seconds from the device's start to its `hello` being welcomed, to its
  first task, and to its update; the device process's peak resident memory (the JVM's VmHWM); the probe's
  seconds and its child's peak. On the JVM the program always runs in a helper process (loss_helper.py),
  started at the first task: the probe is one more such process, before the device connects.
- **The probe alone** (`--probe-bundle`): one long-lived JVM (`ProbeCheck`, standing for the device) probes
  each bundle `--repeats` times: seconds and the child's peak. For bundles the Java device cannot train on
  (the tiny-llama preset's byte-level BPE tokenizer, a classifier's .tsv data) this is the cost it adds.

The machine's load moves the seconds: run both ways in one command and compare them side by side.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from fwdfed.cli import quiet_libraries, run_main

WAYS = ("probe (default)", "--no-isolate-load")
EVENTS = {"welcomed": "enrolled in job", "task": " TRAINING ", "update": "update sent"}


def device_run(core, bundle: Path, data: Path, isolate: bool) -> dict:
    from tests.android_demo.support import HELPER_COMMAND
    from tests.support.fleet import Coordinator

    with tempfile.TemporaryDirectory(prefix="java-isolation-") as scratch:
        coordinator = Coordinator(Path(scratch) / "job.db", "--bundle", str(bundle), "--rounds", "1",
                                  "--devices-per-round", "1", "--local-steps", "2", "--round-deadline", "600")
        try:
            start = time.monotonic()
            device = core.popen("JvmDevice", "--coordinator", coordinator.url, "--device-id", "java-0", "--bundle",
                                bundle, "--data", data, "--helper", HELPER_COMMAND,
                                *(() if isolate else ("--no-isolate-load",)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace")
            seen, probe = {}, None
            for line in device.stderr:
                for event, words in EVENTS.items():
                    if words in line and event not in seen:
                        seen[event] = round(time.monotonic() - start, 2)
                if ": probe " in line:
                    probe = line.strip()
            out = device.stdout.read()
            device.wait(timeout=600)
            code, _, err = coordinator.wait(timeout=120)
        finally:
            coordinator.kill()
    if device.returncode != 0 or code != 0 or len(seen) != len(EVENTS):
        raise RuntimeError(f"the run failed (device {device.returncode}, coordinator {code}): {out[-500:]} "
                           f"{err[-1000:]}")
    row = {**seen, "device_peak": re.search(r"peak RSS (\S+ \S+)", out).group(1)}
    if probe:
        m = re.search(r"probe (\w+) in ([\d.]+) s, child peak (.+)$", probe)
        row.update(probe=m.group(1), probe_seconds=float(m.group(2)), child_peak=m.group(3))
    return row


def probe_runs(core, bundles: list[Path], repeats: int) -> dict:
    from tests.android_demo.support import HELPER_COMMAND

    folders = [str(b) for b in bundles for _ in range(repeats)]
    result = core.run("ProbeCheck", "--helper", HELPER_COMMAND, stdin="\n".join(folders).encode() + b"\n",
                      timeout=600 * len(folders))
    lines = result.stdout.decode().splitlines()
    rows: dict = {str(b): [] for b in bundles}
    for folder, line in zip(folders, lines):
        outcome, seconds, peak, *_ = line.split(" ", 3)
        rows[folder].append({"outcome": outcome, "seconds": float(seconds), "child_peak_mib": int(peak) / 2**20})
    return {"probes": rows, "device": lines[-1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.java_isolation_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device-bundle", type=Path, help="a bundle the Java device trains on (stories260K)")
    parser.add_argument("--data", type=Path, help="its training text (default: the shared TinyStories head)")
    parser.add_argument("--probe-bundle", type=Path, nargs="*", default=[], help="bundles to probe alone")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    from tests.android_demo.support import compile_core
    from tests.conftest import TINYSTORIES

    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="java-classes-") as classes:
        core = compile_core(Path(classes))
        if args.device_bundle:
            runs = {way: [] for way in WAYS}
            for _ in range(args.repeats):
                for way in WAYS:
                    runs[way].append(device_run(core, args.device_bundle, args.data or TINYSTORIES, way == WAYS[0]))
            figures["device"] = runs
            print(f"the Java device on {args.device_bundle}, one task; seconds from its start:")
            for way, rows in runs.items():
                for row in rows:
                    print(f"  {way}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
            for event in EVENTS:
                with_probe = statistics.median(r[event] for r in runs[WAYS[0]])
                without = statistics.median(r[event] for r in runs[WAYS[1]])
                print(f"  median to {event}: {with_probe:.2f} s with the probe, {without:.2f} s without "
                      f"(+{with_probe - without:.2f} s)")
        if args.probe_bundle:
            figures["probe"] = probe_runs(core, args.probe_bundle, args.repeats)
            print("the probe alone, in one JVM:")
            for folder, rows in figures["probe"]["probes"].items():
                print(f"  {folder}: " + "; ".join(f"{r['outcome']} {r['seconds']:.2f} s, child peak "
                                                   f"{r['child_peak_mib']:.0f} MiB" for r in rows))
            print(f"  {figures['probe']['device']}")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    quiet_libraries()
    run_main(main)
