package org.fwdfed.core;

/**
 * A batch in the program's static input shapes, as the ExecuTorch program takes it: token ids
 * and attention mask [B][L], labels [B][L] (causal LM, -100 where ignored) or [B][1]
 * (classification), and per example a weight: 1 for a real example, 0 for filler that pads
 * the last batch.
 */
public final class Batch {
    public final int[][] ids;
    public final int[][] mask;
    public final int[][] labels;
    public final float[] weights;

    public Batch(int[][] ids, int[][] mask, int[][] labels, float[] weights) {
        this.ids = ids;
        this.mask = mask;
        this.labels = labels;
        this.weights = weights;
    }

    public int size() {
        return weights.length;
    }

    public int numExamples() {
        int n = 0;
        for (float w : weights) {
            n += (int) w;
        }
        return n;
    }
}
