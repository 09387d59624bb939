"""Regenerate docs/golden/directions.json from the Python implementation (run from the project root).

The file is committed; every implementation of the direction generator (Python, Java) is
tested against it. Regenerate only when the specification itself changes.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from fwdfed.directions import direction, pool_key, seed_pool, words

SEEDS = [0, 1, 42, 0x0123456789ABCDEF, (1 << 63) - 1]
POOL_JOBS = ["job-1", "agnews ü 1000"]  # the default --job-id, and one that is not ASCII
POOL_SIZE = 8


def golden() -> dict:
    return {
        "spec": "docs/directions.md",
        "words": {str(s): [str(int(w)) for w in words(s, 0, 8)] for s in SEEDS},
        "rademacher_256": {str(s): "".join("+" if x > 0 else "-" for x in direction(s, 256, "rademacher")) for s in SEEDS},
        "gaussian_256_float32_bits": {
            str(s): [f"{b:08x}" for b in direction(s, 256, "gaussian").view(np.uint32)] for s in SEEDS
        },
        "rademacher_1000000_sha256_of_int8": {
            str(s): hashlib.sha256(direction(s, 1_000_000, "rademacher").astype(np.int8).tobytes()).hexdigest() for s in SEEDS
        },
        "seed_pool": {
            job: {"key": f"{pool_key(job):016x}", "seeds": [str(int(s)) for s in seed_pool(pool_key(job), POOL_SIZE)]}
            for job in POOL_JOBS
        },
    }


if __name__ == "__main__":
    path = Path(__file__).with_name("directions.json")
    path.write_text(json.dumps(golden(), indent=1) + "\n")
    print(f"wrote {path}")
