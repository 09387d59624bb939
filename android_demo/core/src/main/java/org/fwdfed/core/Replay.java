package org.fwdfed.core;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.HashSet;
import java.util.List;
import java.util.Set;

/**
 * The downlink in seed form (docs/protocol.md): a task's history replayed onto the adapter this device kept,
 * exactly as the coordinator computed each version (fwdfed/update.py `replay`): per version, from
 * w64 = (double) w, add C_s * z_s (the float32 direction, restricted to the block) for each seed in order (packed
 * sums: pool[j] for each index j whose sum is not 0, in index order), then S * w64 when S is not 0, round to
 * float32, and set the span's float32 values. Java's double arithmetic is IEEE-754's, so the bits are the
 * coordinator's wherever the directions are: Rademacher always; Gaussian where this platform's log, cos and sin
 * give the golden bits (docs/directions.md allows 1 ulp, which the task's sha256 then catches, and the device
 * asks for the dense adapter).
 */
public final class Replay {
    private Replay() {}

    /** The adapter after every step of `history`, from `w` (not changed), in a task without a seed pool. */
    public static float[] replay(float[] w, List<Message.HistoryStep> history, String kind) {
        return replay(w, history, kind, null);
    }

    /** The adapter after every step of `history`, from `w` (not changed); `pool`: the task's seed pool
     * ({@link SeedPool#fromHparams}), null when it names none. IllegalArgumentException for a step that cannot
     * apply (a seed twice in one version, a block or a span outside the adapter, packed sums in a task without a
     * pool or not 8 bytes a pool seed, or not finite). */
    public static float[] replay(float[] w, List<Message.HistoryStep> history, String kind, long[] pool) {
        float[] current = w.clone();
        for (Message.HistoryStep step : history) {
            current = apply(current, step, kind, pool);
        }
        return current;
    }

    private static float[] apply(float[] w, Message.HistoryStep step, String kind, long[] pool) {
        int start = 0;
        int end = w.length;
        if (step.block.length == 2) {
            if (!(0 <= step.block[0] && step.block[0] < step.block[1] && step.block[1] <= w.length)) {
                throw new IllegalArgumentException("block [" + step.block[0] + ", " + step.block[1]
                        + "] does not fit the adapter's " + w.length + " values");
            }
            start = (int) step.block[0];
            end = (int) step.block[1];
        }
        long[] seeds = step.seeds;
        double[] coefs = step.coefs;
        if (step.sums != null) {
            double[] packed = unpacked(step.sums, pool);
            int applied = 0;
            for (double c : packed) {
                applied += c != 0.0 ? 1 : 0;  // -0.0 too: a zero sum is no term
            }
            seeds = new long[applied];
            coefs = new double[applied];
            for (int j = 0, k = 0; j < packed.length; j++) {
                if (packed[j] != 0.0) {
                    seeds[k] = pool[j];
                    coefs[k++] = packed[j];
                }
            }
        }
        Set<Long> seen = new HashSet<>();
        double[] w64 = new double[w.length];
        for (int i = 0; i < w.length; i++) {
            w64[i] = w[i];
        }
        double[] next = w64.clone();
        for (int k = 0; k < seeds.length; k++) {
            if (!seen.add(seeds[k])) {
                throw new IllegalArgumentException("a version's seed sums name seed " + seeds[k] + " twice");
            }
            float[] z = Directions.slice(seeds[k], start, end, kind);
            double coef = coefs[k];
            for (int i = start; i < end; i++) {
                next[i] += coef * z[i - start];  // z is +-1 or a float32: the product is what numpy computes
            }
        }
        if (step.shrink != 0.0) {
            for (int i = 0; i < w.length; i++) {
                next[i] += step.shrink * w64[i];
            }
        }
        float[] out = new float[w.length];
        for (int i = 0; i < w.length; i++) {
            out[i] = (float) next[i];  // round to nearest even, as numpy's astype(float32)
        }
        if (step.span != null) {
            float[] span = floats(step.span);
            if (!(0 <= step.spanStart && step.spanStart + span.length <= w.length)) {
                throw new IllegalArgumentException("span [" + step.spanStart + ", " + (step.spanStart + span.length)
                        + ") does not fit the adapter's " + w.length + " values");
            }
            System.arraycopy(span, 0, out, (int) step.spanStart, span.length);  // the version's own float32 values
        }
        return out;
    }

    /** Packed sums (little-endian float64, one per pool index) as doubles, checked against the task's pool. */
    private static double[] unpacked(byte[] sums, long[] pool) {
        if (pool == null) {
            throw new IllegalArgumentException("a version's packed sums in a task without a seed pool");
        }
        if (sums.length != 8L * pool.length) {
            throw new IllegalArgumentException("a version's packed sums are " + sums.length + " bytes, not 8 x the "
                    + "pool's " + pool.length);
        }
        double[] out = new double[pool.length];
        ByteBuffer b = ByteBuffer.wrap(sums).order(ByteOrder.LITTLE_ENDIAN);
        for (int j = 0; j < out.length; j++) {
            out[j] = b.getDouble();
            if (!Double.isFinite(out[j])) {
                throw new IllegalArgumentException("a version's packed sums are not all finite");
            }
        }
        return out;
    }

    /** d float32 values, little-endian: the bytes a task's adapter_sha256 is taken over. */
    public static byte[] bytes(float[] w) {
        ByteBuffer b = ByteBuffer.allocate(4 * w.length).order(ByteOrder.LITTLE_ENDIAN);
        for (float x : w) {
            b.putFloat(x);
        }
        return b.array();
    }

    public static float[] floats(byte[] adapter) {
        ByteBuffer b = ByteBuffer.wrap(adapter).order(ByteOrder.LITTLE_ENDIAN);
        float[] w = new float[adapter.length / 4];
        for (int i = 0; i < w.length; i++) {
            w[i] = b.getFloat();
        }
        return w;
    }

    public static String sha256(byte[] data) {
        try {
            StringBuilder hex = new StringBuilder();
            for (byte x : MessageDigest.getInstance("SHA-256").digest(data)) {
                hex.append(String.format("%02x", x));
            }
            return hex.toString();
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException("every Java platform has SHA-256", e);
        }
    }
}
