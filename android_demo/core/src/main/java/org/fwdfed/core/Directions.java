package org.fwdfed.core;

/**
 * The direction generator of docs/directions.md: (seed, d, kind) -> z in R^d.
 *
 * word(seed, i) = mix64(seed + (i + 1) * GAMMA), the i-th SplitMix64 output, computed from the
 * counter alone. Java's long arithmetic wraps modulo 2^64 and >>> is the logical shift, so the
 * words are bit-identical to the Python implementation (fwdfed/directions.py).
 */
public final class Directions {
    private static final long GAMMA = 0x9E3779B97F4A7C15L;
    private static final double TWO_POW_MINUS_53 = 0x1.0p-53;
    public static final String RADEMACHER = "rademacher";
    public static final String GAUSSIAN = "gaussian";

    private Directions() {}

    static long mix64(long x) {
        x = (x ^ (x >>> 30)) * 0xBF58476D1CE4E5B9L;
        x = (x ^ (x >>> 27)) * 0x94D049BB133111EBL;
        return x ^ (x >>> 31);
    }

    /** word(seed, i): seed must be in [0, 2^63), so that it is a non-negative long. */
    public static long word(long seed, long i) {
        if (seed < 0) {
            throw new IllegalArgumentException("seed must be in [0, 2^63)");
        }
        return mix64(seed + (i + 1) * GAMMA);
    }

    /** Elements [start, stop) of the Rademacher direction: +1 where bit 63 of the word is 0. */
    public static float[] rademacher(long seed, int start, int stop) {
        float[] z = new float[stop - start];
        for (int i = start; i < stop; i++) {
            z[i - start] = word(seed, i) < 0 ? -1.0f : 1.0f;  // bit 63 set <=> negative as a signed long
        }
        return z;
    }

    /** Elements [start, stop) of the Gaussian direction (Box-Muller on pairs of words). */
    public static float[] gaussian(long seed, int start, int stop) {
        float[] z = new float[stop - start];
        for (int i = start; i < stop; i++) {
            long pair = i / 2;
            double u1 = ((word(seed, 2 * pair) >>> 11) + 1) * TWO_POW_MINUS_53;
            double u2 = (word(seed, 2 * pair + 1) >>> 11) * TWO_POW_MINUS_53;
            double r = Math.sqrt(-2.0 * StrictMath.log(u1));
            double t = 2.0 * Math.PI * u2;
            z[i - start] = (float) (i % 2 == 0 ? r * StrictMath.cos(t) : r * StrictMath.sin(t));
        }
        return z;
    }

    /** word(seed, i) for i in [start, start + count): the keys of the documented data shuffle (docs/data.md). */
    public static long[] words(long seed, long start, int count) {
        long[] out = new long[count];
        for (int i = 0; i < count; i++) {
            out[i] = word(seed, start + i);
        }
        return out;
    }

    /** Elements [start, stop) of the direction of `kind` ("rademacher" or "gaussian"). */
    public static float[] slice(long seed, int start, int stop, String kind) {
        if (RADEMACHER.equals(kind)) {
            return rademacher(seed, start, stop);
        }
        if (GAUSSIAN.equals(kind)) {
            return gaussian(seed, start, stop);
        }
        throw new IllegalArgumentException("unknown direction kind " + kind + "; expected rademacher or gaussian");
    }

    /** The direction in R^dim restricted to `block` (zero outside it); the whole direction when block is null. */
    public static float[] blockDirection(long seed, int dim, String kind, Block block) {
        if (block == null) {
            return slice(seed, 0, dim, kind);
        }
        float[] z = new float[dim];
        System.arraycopy(slice(seed, block.start, block.end, kind), 0, z, block.start, block.end - block.start);
        return z;
    }

    /** w += coef * direction(seed) for every pair: how a device or server replays an update. */
    public static void addPairs(float[] w, long[] seeds, double[] coefs, boolean gaussian) {
        double[] acc = new double[w.length];
        for (int k = 0; k < seeds.length; k++) {
            float[] z = gaussian ? gaussian(seeds[k], 0, w.length) : rademacher(seeds[k], 0, w.length);
            for (int i = 0; i < w.length; i++) {
                acc[i] += coefs[k] * z[i];
            }
        }
        for (int i = 0; i < w.length; i++) {
            w[i] = (float) (w[i] + acc[i]);
        }
    }
}
