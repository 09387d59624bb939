"""python -m benchmarks.signed_fuzz --bundle B: corrupted programs against a device with and without a trust key.

The bundle is copied and signed with a fresh key. Each of `--corruptions` random corruptions of its
`.pte` (a truncation, or 1 to 8 random bytes overwritten, seeded) is delivered three ways, as an
attacker on the channel that delivers bundles could: the program alone (the signed manifest
untouched); the program with the manifest's sha256 rewritten to match (the attack that crashed
the runtime in 4 of 460 tries before bundles were signed); and that, signed again with the
attacker's own key. Every delivery is read as a device reads it (`load_bundle`, then the
program's engine) with the operator's trust key and without, the ExecuTorch loader replaced by a
counter: the figures are how many were refused and how many would have reached the runtime,
which is never run. docs/security.md has a run's figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from fwdfed.cli import quiet_libraries, run_main

DELIVERIES = ("program only", "program + matching sha256", "program + sha256, signed by another key")


def corrupt(program: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(program)
    if rng.random() < 0.2:
        return bytes(data[: int(rng.integers(1, len(data)))])
    for at in rng.choice(len(data), int(rng.integers(1, 9)), replace=False):
        data[at] = (data[at] + int(rng.integers(1, 256))) % 256  # always a different byte
    return bytes(data)


def deliver(folder: Path, program: bytes, how: str, signed_manifest: bytes, signed_sig: bytes, attacker) -> None:
    """`folder` (a signed copy) as the attacker leaves it: its program `program`, delivered `how`."""
    from fwdfed.bundle.manifest import sha256_file
    from fwdfed.bundle.signing import SIGNATURE

    (folder / "manifest.json").write_bytes(signed_manifest)
    (folder / SIGNATURE).write_bytes(signed_sig)
    (folder / "model.pte").write_bytes(program)
    if how == DELIVERIES[0]:
        return
    manifest = json.loads(signed_manifest)
    manifest["program"]["sha256"] = sha256_file(folder / "model.pte")
    text = (json.dumps(manifest, indent=2) + "\n").encode()
    (folder / "manifest.json").write_bytes(text)
    if how == DELIVERIES[2]:
        (folder / SIGNATURE).write_bytes(attacker.sign(text))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.signed_fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="an exported bundle with one program (model.pte)")
    parser.add_argument("--corruptions", type=int, default=460)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the counts here as JSON")
    args = parser.parse_args(argv)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fwdfed.bundle.manifest import BundleError, load_bundle, sign_bundle
    from fwdfed.bundle.signing import SIGNATURE
    from runtime.engine import ProgramEngine

    reached = []

    def count_load(self, program, max_perturbations):  # where the runtime would load the program
        reached.append(program)
        raise BundleError("not loaded: counted")

    ProgramEngine.__init__ = count_load
    operator, attacker = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    counts: Counter = Counter()
    with tempfile.TemporaryDirectory(prefix="signed-fuzz-") as scratch:
        folder = Path(shutil.copytree(args.bundle, Path(scratch) / "bundle"))
        if load_bundle(folder).manifest.streamed:
            raise BundleError(f"{args.bundle} is streamed: give a bundle with one program")
        sign_bundle(folder, operator)
        program = (folder / "model.pte").read_bytes()
        signed_manifest, signed_sig = (folder / "manifest.json").read_bytes(), (folder / SIGNATURE).read_bytes()
        rng = np.random.default_rng(args.seed)
        for _ in range(args.corruptions):
            bad = corrupt(program, rng)
            for how in DELIVERIES:
                deliver(folder, bad, how, signed_manifest, signed_sig, attacker)
                for key_name, key in (("trust key", operator.public_key()), ("no trust key", None)):
                    before = len(reached)
                    try:
                        ProgramEngine.for_bundle(load_bundle(folder, trust_key=key))
                    except BundleError:
                        pass
                    outcome = "reached the runtime" if len(reached) > before else "refused before loading"
                    counts[f"{how} | {key_name} | {outcome}"] += 1
    print(f"{args.corruptions} corruptions of {args.bundle}/model.pte ({len(program)} bytes), seed {args.seed}:")
    for row, n in sorted(counts.items()):
        print(f"  {row}: {n}")
    if args.out:
        args.out.write_text(json.dumps(dict(sorted(counts.items())), indent=1))
    return 0


if __name__ == "__main__":
    quiet_libraries()
    run_main(main)
