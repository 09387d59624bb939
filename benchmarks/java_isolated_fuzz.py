"""python -m benchmarks.java_isolated_fuzz --bundle B: corrupted programs through the Java device's probe.

benchmarks.isolated_fuzz for the Java device on the JVM: each of `--corruptions` random corruptions of the
bundle's `.pte` (benchmarks.signed_fuzz's generator and seed) is delivered as the attack that crashed the
runtime before bundles were signed (the program with the manifest's sha256 rewritten to match, to a device
without a trust key), read as the Java device reads it (Manifest.load, the program's sha256) and probed in
a child process (HelperProbe: loss_helper.py --probe, which loads the program and runs `forward` once on the
manifest's shapes: what the Java device runs). One JVM (`ProbeCheck`) stands for the device and probes
every corruption in turn: the counts are how many the child ran (ok), refused with an error, or died on
(crashed, by which signal); that the JVM reaches the end and prints `alive` is the figure that a crash cost
one probe. Each probe starts a Python process with the runtime: seconds each, not milliseconds as a fork.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks.isolated_fuzz import MATCHING_SHA256, parse_args
from benchmarks.signed_fuzz import corrupt, deliver
from fwdfed.cli import quiet_libraries, run_main


def main(argv=None) -> int:
    args = parse_args("python -m benchmarks.java_isolated_fuzz", __doc__, argv)
    from fwdfed.bundle.signing import SIGNATURE
    from tests.android_demo.support import HELPER_COMMAND, compile_core

    counts: Counter = Counter()
    crashes: list[dict] = []
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="java-isolated-fuzz-") as scratch:
        core = compile_core(Path(scratch) / "classes")
        folder = Path(shutil.copytree(args.bundle, Path(scratch) / "bundle"))
        program, manifest = (folder / "model.pte").read_bytes(), (folder / "manifest.json").read_bytes()
        device = core.popen("ProbeCheck", "--helper", HELPER_COMMAND, "--timeout", str(args.timeout),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        rng = np.random.default_rng(args.seed)
        for index in range(args.corruptions):
            deliver(folder, corrupt(program, rng), MATCHING_SHA256, manifest, b"", None)
            (folder / SIGNATURE).unlink()  # `deliver` writes one; a device without a trust key reads none
            device.stdin.write(f"{folder}\n")
            device.stdin.flush()
            outcome, _, _, detail = (device.stdout.readline().rstrip("\n") + "   ").split(" ", 3)
            counts[outcome] += 1
            if outcome == "crashed":
                counts[f"crashed: {detail.strip()}"] += 1
                crashes.append({"index": index, "how": detail.strip()})
        device.stdin.close()
        alive = device.stdout.read().strip()
        device.wait(timeout=60)
    seconds = time.monotonic() - start
    print(f"{args.corruptions} corruptions of {args.bundle}/model.pte ({len(program)} bytes), seed {args.seed}, "
          f"the manifest's sha256 rewritten to match, no trust key, each probed by the Java device's child "
          f"process, {seconds:.0f} s:")
    for row, n in sorted(counts.items()):
        print(f"  {row}: {n}")
    print(f"  crashing corruptions (index: how): {[(c['index'], c['how']) for c in crashes]}")
    survived = alive.startswith("alive ") and device.returncode == 0
    print(f"the device's JVM {'survived all ' + str(args.corruptions) if survived else 'did not survive'} "
          f"({alive or 'no answer'}, exit {device.returncode})")
    if args.out:
        args.out.write_text(json.dumps({"counts": dict(sorted(counts.items())), "crashes": crashes,
                                        "seconds": round(seconds, 1), "survived": survived}, indent=1))
    return 0 if survived else 1


if __name__ == "__main__":
    quiet_libraries()
    run_main(main)
