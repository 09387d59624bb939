package org.fwdfed.core;

import java.util.regex.Pattern;

/**
 * FedKSeed's shared seed pool (docs/directions.md, "The seed pool"): a task of a job served with
 * `--seed-pool K` names K and the pool's key, and every seed of the device's update must be one of
 *
 *   pool[j] = word(key, j) >>> 1,   j = 0 .. K-1.
 *
 * As a {@link SeedSource} it wraps the device's own stream: each seed is pool[next mod K], so the
 * Java device's draws stay a function of its task (round, wave, id), as without a pool. The
 * hyperparameters are checked as the Python device checks them (fwdfed/methods/estimate.py
 * `parse_seed_pool`), with the same messages.
 */
public final class SeedPool implements SeedSource {
    public static final int MAX_SIZE = 1 << 20;
    private static final Pattern KEY = Pattern.compile("[0-9a-f]{16}");

    private final long[] pool;
    private final SeedSource stream;

    public SeedPool(long[] pool, SeedSource stream) {
        this.pool = pool;
        this.stream = stream;
    }

    @Override
    public long next() {
        return pool[(int) (stream.next() % pool.length)];  // the stream's seeds are in [0, 2^63): never negative
    }

    /** The pool of `size` seeds under `key` (a seed itself, in [0, 2^63)). */
    public static long[] seeds(long key, long size) {
        if (size < 1 || size > MAX_SIZE) {
            throw new IllegalArgumentException("a seed pool holds 1 to " + MAX_SIZE + " seeds, got " + size);
        }
        long[] out = new long[(int) size];
        for (int j = 0; j < out.length; j++) {
            out[j] = Directions.word(key, j) >>> 1;
        }
        return out;
    }

    /** The pool a task names (`seed_pool`, `seed_pool_key`), or null when it names none. */
    public static long[] fromHparams(Hparams hparams) {
        if (!hparams.has("seed_pool") && !hparams.has("seed_pool_key")) {
            return null;
        }
        long size = hparams.integer("seed_pool", null);
        Object key = hparams.has("seed_pool_key") ? hparams.raw("seed_pool_key") : null;
        // 16 hex digits below 8000...: a number below 2^63, so a non-negative long.
        if (!(key instanceof String) || !KEY.matcher((String) key).matches() || ((String) key).charAt(0) > '7') {
            throw new IllegalArgumentException("seed_pool_key must be 16 lowercase hex digits of a number below "
                    + "2^63, got " + key);
        }
        return seeds(Long.parseLong((String) key, 16), size);
    }
}
