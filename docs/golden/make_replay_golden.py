"""Regenerate docs/golden/replay.json from the Python implementation (run from the project root).

A device replays the versions it missed from their seed sums (docs/protocol.md, Downlink in seed form;
docs/directions.md, Replaying versions); every implementation is tested against this file. Regenerate only
when the specification itself changes.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from fwdfed.directions import KINDS
from fwdfed.update import SeedSums, replay

D = 12
START = [0.5, -0.25, 1.0e-3, 3.0, -7.5, 0.1, 0.0, -0.0, 2.0**-20, 1234.5, -1.0 / 3.0, 0.7]  # float32-rounded
VERSIONS = [
    {"version": 1, "seeds": [0, 42, (1 << 63) - 1], "coefs": [1.0e-3 / 3.0, -2.5e-4, 7.0e-5], "shrink": 0.0,
     "block": []},
    {"version": 2, "seeds": [0x0123456789ABCDEF, 1, 0], "coefs": [-1.0e-2 / 7.0, 3.0e-3, 1.0e-6],
     "shrink": -1.0e-4 / 3.0, "block": [2, 9]},
]


def bits(w: np.ndarray) -> list[str]:
    return [f"{b:08x}" for b in np.asarray(w, "<f4").view(np.uint32)]


def golden() -> dict:
    start = np.array(START, dtype=np.float32)
    out = {"spec": "docs/protocol.md#downlink-in-seed-form", "d": D, "start_float32_bits": bits(start),
           "start_sha256": hashlib.sha256(start.astype("<f4").tobytes()).hexdigest(),
           "history": [dict(v, coefs=[float(c) for c in v["coefs"]], seeds=[str(s) for s in v["seeds"]])
                       for v in VERSIONS],
           "kinds": {}}
    for kind in KINDS:
        w, versions = start, []
        for v in VERSIONS:
            w = replay(w, [SeedSums(v["seeds"], v["coefs"], v["shrink"], tuple(v["block"]) or None)], kind)
            versions.append({"version": v["version"], "float32_bits": bits(w),
                             "sha256": hashlib.sha256(w.astype("<f4").tobytes()).hexdigest()})
        out["kinds"][kind] = versions
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("replay.json")
    path.write_text(json.dumps(golden(), indent=1) + "\n")
    print(f"wrote {path}")
