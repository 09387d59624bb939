"""python -m benchmarks.isolation_cost --bundle B [B ...]: what loading a program in a child first costs.

For each bundle, three ways of loading it, each in a fresh process that stands for the device
(the bundle read, the runtime started, then the load timed): `in process` (the program loaded
directly, as with `--no-isolate-load`); `forked child` (runtime.isolation: every method run once in
a fork of the device, then loaded); `fresh interpreter` (the same run in a new Python process,
which imports the runtime itself, then loaded). Printed per way: the load's seconds, the
device's resident memory before the load and its peak, and the child's peak (which counts the
pages a forked child shares with the device). docs/security.md has a run's figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from fwdfed.cli import quiet_libraries, run_main

WAYS = ("in process", "forked child", "fresh interpreter")
FRESH = "from fwdfed.bundle.manifest import load_bundle; from runtime.isolation import exercise; import sys; " \
        "exercise(load_bundle(sys.argv[1], check_program=False))"


def measure(folder: Path, way: str) -> dict:
    """One way's figures, in this process (a fresh one: its peak is the load's alone)."""
    from fwdfed.bundle.manifest import load_bundle
    from fwdfed.memory import current_rss, peak_rss
    from runtime.engine import ProgramEngine
    from runtime.executorch import runtime
    from runtime.isolation import OK, check_in_child

    bundle = load_bundle(folder)
    runtime()
    before, child_peak = current_rss(), None
    start = time.monotonic()
    if way == WAYS[1]:
        verdict = check_in_child(bundle)
        assert verdict.outcome == OK, verdict
        child_peak = verdict.child_peak_rss
    elif way == WAYS[2]:
        subprocess.run([sys.executable, "-c", FRESH, str(folder)], check=True, stderr=subprocess.DEVNULL)
        child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    engine = ProgramEngine.for_bundle(bundle)
    seconds = time.monotonic() - start
    assert engine is not None
    return {"seconds": round(seconds, 3), "device_rss_before": before, "device_peak": peak_rss(),
            "child_peak": child_peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.isolation_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, nargs="+", required=True, help="exported bundles")
    parser.add_argument("--one", choices=WAYS, help=argparse.SUPPRESS)  # the measuring process's own way
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.bundle[0], args.one)))
        return 0
    from fwdfed.memory import format_size

    figures = {}
    for folder in args.bundle:
        for way in WAYS:
            out = subprocess.run([sys.executable, "-m", "benchmarks.isolation_cost", "--bundle", str(folder), "--one",
                                  way], capture_output=True, text=True, check=True).stdout
            f = figures.setdefault(str(folder), {})[way] = json.loads(out.strip().splitlines()[-1])
            child = format_size(f["child_peak"]) if f["child_peak"] else "-"
            print(f"{folder} | {way}: load {f['seconds']:.2f} s, device {format_size(f['device_rss_before'])} "
                  f"before, peak {format_size(f['device_peak'])}; child peak {child}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    quiet_libraries()
    run_main(main)
