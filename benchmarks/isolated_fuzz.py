"""python -m benchmarks.isolated_fuzz --bundle B: corrupted programs through the isolated loader.

Each of `--corruptions` random corruptions of the bundle's `.pte` (benchmarks.signed_fuzz's
generator and seed) is delivered as the attack that crashed the runtime before bundles were
signed: the program with the manifest's sha256 rewritten to match, to a device without a trust
key. Each is read as such a device reads it (`load_bundle`) and tried in a forked child
(`runtime.isolation.check_in_child`): the counts are how many the child ran (ok), refused with an
error, or died on (crashed, by which signal); the corruptions that crashed are listed by index.
This process is the device: it tries every one, and that it reaches the end is the figure that
a crash cost one check. docs/security.md has a run's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks.signed_fuzz import DELIVERIES, corrupt, deliver
from fwdfed.cli import quiet_libraries, run_main

MATCHING_SHA256 = DELIVERIES[1]


def parse_args(prog: str, description: str, argv) -> argparse.Namespace:
    """The flags of a fuzz through an isolated loader (this one, and the Java device's)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="an exported bundle with one program (model.pte)")
    parser.add_argument("--corruptions", type=int, default=460)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a child may run before it counts as hung")
    parser.add_argument("--out", type=Path, help="write the counts and the crashing indices here as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args("python -m benchmarks.isolated_fuzz", __doc__, argv)
    from fwdfed.bundle.manifest import BundleError, load_bundle
    from fwdfed.bundle.signing import SIGNATURE
    from runtime.isolation import CRASHED, check_in_child

    counts: Counter = Counter()
    crashes: list[dict] = []
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="isolated-fuzz-") as scratch:
        folder = Path(shutil.copytree(args.bundle, Path(scratch) / "bundle"))
        if load_bundle(folder).manifest.streamed:
            raise BundleError(f"{args.bundle} is streamed: give a bundle with one program")
        program, manifest = (folder / "model.pte").read_bytes(), (folder / "manifest.json").read_bytes()
        rng = np.random.default_rng(args.seed)
        for index in range(args.corruptions):
            deliver(folder, corrupt(program, rng), MATCHING_SHA256, manifest, b"", None)
            (folder / SIGNATURE).unlink()  # `deliver` writes one; a device without a trust key reads none
            verdict = check_in_child(load_bundle(folder), timeout_s=args.timeout)
            counts[verdict.outcome] += 1
            if verdict.outcome == CRASHED:
                counts[f"{CRASHED}: {verdict.detail}"] += 1
                crashes.append({"index": index, "how": verdict.detail})
    seconds = time.monotonic() - start
    print(f"{args.corruptions} corruptions of {args.bundle}/model.pte ({len(program)} bytes), seed {args.seed}, "
          f"the manifest's sha256 rewritten to match, no trust key, each tried in a forked child, {seconds:.0f} s:")
    for row, n in sorted(counts.items()):
        print(f"  {row}: {n}")
    print(f"  crashing corruptions (index: how): {[(c['index'], c['how']) for c in crashes]}")
    print(f"the device process (pid {os.getpid()}) survived all {args.corruptions}")
    if args.out:
        args.out.write_text(json.dumps({"counts": dict(sorted(counts.items())), "crashes": crashes,
                                        "seconds": round(seconds, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    quiet_libraries()
    run_main(main)
