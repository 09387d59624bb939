"""Regenerate docs/golden/tensor_scales.json from the Python implementation (run from the project root).

A task's per-tensor scales (`tensor_scales`, docs/directions.md, Per-tensor scales) multiply every direction;
every implementation is tested against this file: the scaled directions' float32 bits, and one aggregation
with them (docs/protocol.md, Aggregation). Regenerate only when the specification itself changes.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from fwdfed.directions import KINDS, block_direction
from fwdfed.tensor_scale import check_ranges, scaled
from fwdfed.update import apply_sums

D = 16
# Three ranges with a gap (elements 9..11 keep scale 1), scales that are not powers of two, one past 1.
RANGES = [[0, 5, 0.5], [5, 9, 3.0999999046325684], [12, 16, 0.0010000000474974513]]
BLOCK = [2, 14]
SEEDS = [0, 42, (1 << 63) - 1]
COEFS = [1.0e-3 / 3.0, -2.5e-4, 7.0e-5]
START = [0.5, -0.25, 1.0e-3, 3.0, -7.5, 0.1, 0.0, -0.0, 2.0**-20, 1234.5, -1.0 / 3.0, 0.7, 5.0, -2.0, 1e-7, 9.0]


def bits(w: np.ndarray) -> list[str]:
    return [f"{b:08x}" for b in np.asarray(w, "<f4").view(np.uint32)]


def golden() -> dict:
    ranges = check_ranges(RANGES)
    start = np.array(START, dtype=np.float32)
    out = {"spec": "docs/directions.md#per-tensor-scales", "d": D, "tensor_scales": RANGES, "seeds": [str(s) for s in SEEDS],
           "block": BLOCK, "coefs": COEFS, "start_float32_bits": bits(start), "kinds": {}}
    for kind in KINDS:
        whole = [bits(scaled(block_direction(s, D, kind), ranges)) for s in SEEDS]
        blocked = [bits(scaled(block_direction(s, D, kind, tuple(BLOCK)), ranges)) for s in SEEDS]
        after = apply_sums(start, dict(zip(SEEDS, COEFS)), 0.0, kind, tuple(BLOCK), None, ranges).astype(np.float32)
        out["kinds"][kind] = {"directions_float32_bits": whole, "block_directions_float32_bits": blocked,
                              "aggregated_float32_bits": bits(after),
                              "aggregated_sha256": hashlib.sha256(after.astype("<f4").tobytes()).hexdigest()}
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("tensor_scales.json")
    path.write_text(json.dumps(golden(), indent=1) + "\n")
    print(f"wrote {path}")
