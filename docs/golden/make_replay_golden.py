"""Regenerate docs/golden/replay.json from the Python implementation (run from the project root).

A device replays the versions it missed from their seed sums (docs/protocol.md, Downlink in seed form;
docs/directions.md, Replaying versions); every implementation is tested against this file. Regenerate only
when the specification itself changes.

The history holds every wire form of a version (fwdfed/history.py): the sums as seeds and coefficients
(versions 1 and 2, the second with a block and a shrink), the same with a span of float32 values set after them
(version 3; one of them -0.0), the sums packed by the index of a seed pool of 6 (version 4, with zero sums of
both signs, a block and a span), and packed sums that are all zero (version 5: no term at all, so the -0.0 that
version 3 set stays -0.0; an implementation that applied zero sums would turn it into +0.0, which the
generator checks).
"""

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from fwdfed.directions import KINDS, pool_key, seed_pool
from fwdfed.history import entry_sums
from fwdfed.update import apply_sums, replay

D = 12
START = [0.5, -0.25, 1.0e-3, 3.0, -7.5, 0.1, 0.0, -0.0, 2.0**-20, 1234.5, -1.0 / 3.0, 0.7]  # float32-rounded
POOL_SIZE, POOL_KEY = 6, pool_key("golden replay")  # the task's seed_pool and seed_pool_key
ZEROS = [0.0, -0.0, 0.0, -0.0, 0.0, -0.0]
VERSIONS = [
    {"version": 1, "seeds": [0, 42, (1 << 63) - 1], "coefs": [1.0e-3 / 3.0, -2.5e-4, 7.0e-5], "shrink": 0.0,
     "block": []},
    {"version": 2, "seeds": [0x0123456789ABCDEF, 1, 0], "coefs": [-1.0e-2 / 7.0, 3.0e-3, 1.0e-6],
     "shrink": -1.0e-4 / 3.0, "block": [2, 9]},
    {"version": 3, "seeds": [5, 77], "coefs": [2.5e-3 / 3.0, -1.0e-3 / 7.0], "shrink": 0.0, "block": [],
     "span_start": 3, "span": [0.25, -0.0, 1.0e-3 / 3.0, 3.5]},
    {"version": 4, "sums": [0.0, 1.0e-3 / 9.0, -0.0, -4.0e-3 / 11.0, 0.0, 2.0e-4 / 3.0], "shrink": 0.0,
     "block": [5, 12], "span_start": 10, "span": [-2.0, 0.1]},
    {"version": 5, "sums": ZEROS, "shrink": 0.0, "block": []},
]


def bits(w: np.ndarray) -> list[str]:
    return [f"{b:08x}" for b in np.asarray(w, "<f4").view(np.uint32)]


def wire(v: dict) -> dict:
    """The version as a task's history carries it (msgpack: bin for the packed sums and the span)."""
    out = {k: v[k] for k in ("version", "shrink", "block")}
    if "sums" in v:
        out["sums"] = struct.pack(f"<{len(v['sums'])}d", *v["sums"])
    else:
        out |= {"seeds": v["seeds"], "coefs": v["coefs"]}
    if "span" in v:
        out |= {"span_start": v["span_start"], "span": np.asarray(v["span"], "<f4").tobytes()}
    return out


def as_json(v: dict) -> dict:
    """The version in the golden file: seeds as decimal strings, the bins as hex."""
    out = {k: v[k] for k in ("version", "shrink", "block")}
    if "sums" in v:
        out["sums_hex"] = struct.pack(f"<{len(v['sums'])}d", *v["sums"]).hex()
    else:
        out |= {"seeds": [str(s) for s in v["seeds"]], "coefs": [float(c) for c in v["coefs"]]}
    if "span" in v:
        out |= {"span_start": v["span_start"], "span_hex": np.asarray(v["span"], "<f4").tobytes().hex()}
    return out


def golden() -> dict:
    start = np.array(START, dtype=np.float32)
    pool = seed_pool(POOL_KEY, POOL_SIZE)
    out = {"spec": "docs/protocol.md#downlink-in-seed-form", "d": D, "start_float32_bits": bits(start),
           "start_sha256": hashlib.sha256(start.astype("<f4").tobytes()).hexdigest(),
           "seed_pool": POOL_SIZE, "seed_pool_key": f"{POOL_KEY:016x}", "pool_seeds": [str(s) for s in pool],
           "history": [as_json(v) for v in VERSIONS], "kinds": {}}
    for kind in KINDS:
        w, versions = start, []
        for v in VERSIONS:
            w = replay(w, [entry_sums(wire(v), pool)], kind)
            versions.append({"version": v["version"], "float32_bits": bits(w),
                             "sha256": hashlib.sha256(w.astype("<f4").tobytes()).hexdigest()})
        # The last version's zero sums are no terms: applied, they would turn version 3's -0.0 into +0.0.
        applied = apply_sums(w, dict(zip(pool.tolist(), ZEROS)), 0.0, kind).astype(np.float32)
        assert versions[-1]["float32_bits"] == versions[-2]["float32_bits"] != bits(applied), kind
        out["kinds"][kind] = versions
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("replay.json")
    path.write_text(json.dumps(golden(), indent=1) + "\n")
    print(f"wrote {path}")
