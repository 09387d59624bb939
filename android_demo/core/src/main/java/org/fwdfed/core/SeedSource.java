package org.fwdfed.core;

/** Where an optimizer draws the seeds of its directions: each in [0, 2^63). */
public interface SeedSource {
    long next();

    default long[] next(int n) {
        long[] out = new long[n];
        for (int i = 0; i < n; i++) {
            out[i] = next();
        }
        return out;
    }
}
