"""Aggregation time against the number of updates, with a shared seed pool (FedKSeed) and without.

    python -m benchmarks.aggregation [--bundle BUNDLE | --dim D] [--pool 4096] [--pairs 80] \
        [--updates 100 10000] [--free-updates 100 1000]

The coordinator's own rule (coordinator.strategies.SeedFedAvg.aggregate, by seed) on synthetic
seed-form updates of `--pairs` pairs each (MiniLM's AG News jobs: 20 local steps x 4 directions),
for an adapter of d values (the bundle's manifest's, or `--dim`; MiniLM's LoRA adapter with its
4-class head is 75,268). With the pool every seed is one of the job's K; without it seeds are free,
so every pair is a direction of its own. Each line: the updates, the distinct seeds (the directions
made), the aggregation's seconds, and the seconds at d = 1 (the per-seed sums alone, with K
one-value directions). Runs in this process, one core; no model, no network.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from fwdfed import task_keys as keys
from fwdfed.cli import run_main
from fwdfed.errors import UserError

MINILM_DIM = 75_268  # all-MiniLM-L6-v2, LoRA r = 8 on query and value + the 4-class head (docs/BENCHMARKS.md)


def make_updates(n: int, pairs: int, pool: np.ndarray | None, rng: np.random.Generator) -> list:
    from coordinator.strategies import AcceptedUpdate
    from fwdfed.directions import SEED_LIMIT

    seeds = (rng.choice(pool, size=(n, pairs)) if pool is not None
             else rng.integers(0, SEED_LIMIT, size=(n, pairs), dtype=np.int64))
    coefs = rng.normal(0.0, 1e-4, size=(n, pairs))
    return [AcceptedUpdate.of(f"d{i}", list(zip(seeds[i].tolist(), coefs[i].tolist())), int(rng.integers(50, 500)))
            for i in range(n)]


def timed(strategy, w: np.ndarray, updates: list) -> float:
    start = time.perf_counter()
    new = strategy.aggregate(w, updates)
    seconds = time.perf_counter() - start
    if not np.isfinite(new).all():
        raise RuntimeError("the aggregate is not finite")
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="read d from this bundle's manifest")
    parser.add_argument("--dim", type=int, default=MINILM_DIM, help="d, without --bundle (default %(default)s)")
    parser.add_argument("--pool", type=int, default=4096, help="K, the pool's seeds")
    parser.add_argument("--pairs", type=int, default=80, help="(seed, coefficient) pairs per update")
    parser.add_argument("--updates", type=int, nargs="+", default=[100, 10_000], help="round sizes with the pool")
    parser.add_argument("--free-updates", type=int, nargs="*", default=[100],
                        help="round sizes with free seeds (each pair a direction: 10,000 x 80 pairs are 800,000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from coordinator.strategies import SeedFedAvg
    from fwdfed.directions import MAX_SEED_POOL, pool_key, seed_pool

    if not 1 <= args.pool <= MAX_SEED_POOL or min(args.pairs, args.dim, *args.updates, *args.free_updates, 1) < 1:
        raise UserError(f"--pool must be in [1, {MAX_SEED_POOL}]; --dim, --pairs and round sizes at least 1")
    dim = args.dim
    if args.bundle is not None:
        from fwdfed.bundle.manifest import load_bundle

        dim = load_bundle(args.bundle, check_program=False).manifest.adapter_dim
    strategy, rng = SeedFedAvg(hparams={keys.KIND: "rademacher"}), np.random.default_rng(args.seed)
    pool = seed_pool(pool_key("benchmark"), args.pool)
    w = rng.normal(0.0, 0.02, dim).astype(np.float32)
    print(f"d = {dim:,}, {args.pairs} pairs per update, rademacher; pool K = {args.pool:,}", flush=True)
    print(f"{'seeds':>6} {'updates':>8} {'pairs':>10} {'directions':>11} {'aggregate s':>12} {'sums s (d=1)':>13}")
    for label, sizes, which in (("pool", args.updates, pool), ("free", args.free_updates, None)):
        for n in sizes:
            updates = make_updates(n, args.pairs, which, rng)
            distinct = len({s for u in updates for s, _ in u.pairs})
            sums = timed(strategy, w[:1], updates)
            seconds = timed(strategy, w, updates)
            print(f"{label:>6} {n:>8,} {n * args.pairs:>10,} {distinct:>11,} {seconds:>12.2f} {sums:>13.2f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
