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
 * w64 = (double) w, add C_s * z_s (the float32 direction, restricted to the block) for each seed in order, then
 * S * w64 when S is not 0, and round to float32 at the version's end. Java's double arithmetic is IEEE-754's,
 * so the bits are the coordinator's wherever the directions are: Rademacher always; Gaussian where this
 * platform's log, cos and sin give the golden bits (docs/directions.md allows 1 ulp, which the task's sha256
 * then catches, and the device asks for the dense adapter).
 */
public final class Replay {
    private Replay() {}

    /** The adapter after every step of `history`, from `w` (not changed); IllegalArgumentException for a step that
     * cannot apply (a seed twice in one version, a block outside the adapter). */
    public static float[] replay(float[] w, List<Message.HistoryStep> history, String kind) {
        float[] current = w.clone();
        for (Message.HistoryStep step : history) {
            current = apply(current, step, kind);
        }
        return current;
    }

    private static float[] apply(float[] w, Message.HistoryStep step, String kind) {
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
        Set<Long> seen = new HashSet<>();
        double[] w64 = new double[w.length];
        for (int i = 0; i < w.length; i++) {
            w64[i] = w[i];
        }
        double[] next = w64.clone();
        for (int k = 0; k < step.seeds.length; k++) {
            if (!seen.add(step.seeds[k])) {
                throw new IllegalArgumentException("a version's seed sums name seed " + step.seeds[k] + " twice");
            }
            float[] z = Directions.slice(step.seeds[k], start, end, kind);
            double coef = step.coefs[k];
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
