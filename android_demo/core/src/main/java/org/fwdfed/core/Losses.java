package org.fwdfed.core;

import java.util.List;

/**
 * Losses as the Python device computes them from the program's output, in the same float32
 * operations and the same order, so that a Java device and a Python device given the same
 * program output produce the same bits (fwdfed/methods/estimate.py: `weighted_mean`,
 * `mean_loss`; runtime/engine.py: P split into calls of at most max_perturbations).
 */
public final class Losses {
    private Losses() {}

    /** Per-example losses [P][B] of `batch` under every row of `adapters`, P split into calls the program takes. */
    public static float[][] perExample(LossProgram program, Batch batch, float[][] adapters) {
        int limit = program.maxPerturbations();
        float[][] out = new float[adapters.length][];
        for (int start = 0; start < adapters.length; start += limit) {
            int count = Math.min(limit, adapters.length - start);
            float[][] chunk = new float[count][];
            System.arraycopy(adapters, start, chunk, 0, count);
            float[][] losses = program.loss(batch.ids, batch.mask, batch.labels, chunk);
            if (losses.length != count) {
                throw new ProgramException("the program returned " + losses.length + " rows of losses for " + count
                        + " adapters");
            }
            for (int p = 0; p < count; p++) {
                if (losses[p].length != batch.size()) {
                    throw new ProgramException("the program returned " + losses[p].length + " losses for a batch of "
                            + batch.size());
                }
                out[start + p] = losses[p];
            }
        }
        return out;
    }

    /**
     * numpy's float32 sum of a row (its pairwise summation: 8 accumulators in blocks of at most
     * 128, halves above that), so that sums agree to the bit with `array.sum(axis=-1)`.
     */
    public static float numpySum(float[] a, int from, int to) {
        int n = to - from;
        if (n < 8) {
            float r = 0.0f;
            for (int i = from; i < to; i++) {
                r += a[i];
            }
            return r;
        }
        if (n <= 128) {
            float[] r = new float[8];
            System.arraycopy(a, from, r, 0, 8);
            int i = 8;
            for (; i < n - (n % 8); i += 8) {
                for (int j = 0; j < 8; j++) {
                    r[j] += a[from + i + j];
                }
            }
            float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
            for (; i < n; i++) {
                res += a[from + i];
            }
            return res;
        }
        int half = n / 2;
        half -= half % 8;
        return numpySum(a, from, from + half) + numpySum(a, from + half, to);
    }

    /** Mean over the real examples of a batch, per row: `(losses * weights).sum(-1) / max(weights.sum(), 1)`. */
    public static float[] weightedMean(float[][] losses, float[] weights) {
        float count = Math.max(numpySum(weights, 0, weights.length), 1.0f);
        float[] out = new float[losses.length];
        for (int p = 0; p < losses.length; p++) {
            float[] weighted = new float[weights.length];
            for (int b = 0; b < weights.length; b++) {
                weighted[b] = losses[p][b] * weights[b];
            }
            out[p] = numpySum(weighted, 0, weighted.length) / count;
        }
        return out;
    }

    /** Example-weighted mean loss of one adapter over `batches` (loss_before / loss_after), in float64. */
    public static double meanLoss(LossProgram program, List<Batch> batches, float[] adapter) {
        double total = 0.0;
        long count = 0;
        for (Batch b : batches) {
            float[] row = perExample(program, b, new float[][] {adapter})[0];
            float[] weighted = new float[row.length];
            for (int i = 0; i < row.length; i++) {
                weighted[i] = row[i] * b.weights[i];
            }
            total += numpySum(weighted, 0, weighted.length);
            count += b.numExamples();
        }
        return total / Math.max(count, 1);
    }
}
