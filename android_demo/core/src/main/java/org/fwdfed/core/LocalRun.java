package org.fwdfed.core;

import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * A device's local result in seed form: w_final = scale * w_start + sum_k coef_k * z(seed_k).
 *
 * `scale` is 1 unless weight decay shrank the adapter. Coefficients are stored divided by the
 * decay accumulated when they were made, so later decay applies to all of them in O(1)
 * (the same bookkeeping as fwdfed/methods/estimate.py's LocalRun, so the same doubles come out).
 */
public final class LocalRun {
    private final List<Long> seeds = new ArrayList<>();
    private final List<Double> raw = new ArrayList<>();
    private double scale = 1.0;
    private final List<Float> stepLosses = new ArrayList<>();

    void add(long[] stepSeeds, float[] coefs) {
        for (int k = 0; k < stepSeeds.length; k++) {
            seeds.add(stepSeeds[k]);
            raw.add((double) coefs[k] / scale);
        }
    }

    /** Coefficients made in double (fzoo's, as fwdfed/methods/fzoo.py records them), kept as they are. */
    void add(long[] stepSeeds, double[] coefs) {
        for (int k = 0; k < stepSeeds.length; k++) {
            seeds.add(stepSeeds[k]);
            raw.add(coefs[k] / scale);
        }
    }

    void decay(double factor) {
        scale *= factor;
    }

    void recordLoss(float loss) {
        stepLosses.add(loss);
    }

    public double scale() {
        return scale;
    }

    public List<Float> stepLosses() {
        return stepLosses;
    }

    public long[] seeds() {
        long[] out = new long[seeds.size()];
        for (int i = 0; i < out.length; i++) {
            out[i] = seeds.get(i);
        }
        return out;
    }

    public double[] coefs() {
        double[] out = new double[raw.size()];
        for (int i = 0; i < out.length; i++) {
            out[i] = raw.get(i) * scale;
        }
        return out;
    }

    /**
     * w' as float32, exactly as fwdfed/update.py's SeedUpdate.apply computes it: coefficients of a
     * repeated seed summed first (in order of first appearance); each coef * z formed in float32
     * (numpy casts the Python float to the array's float32) and accumulated in float64; then the
     * (scale - 1) w term; then rounded to float32. With per-tensor `scales` (or null), z is the scaled
     * direction the steps moved along.
     */
    public float[] applyTo(float[] w, String kind, Block block, TensorScales scales) {
        Map<Long, Double> bySeed = new LinkedHashMap<>();
        double[] coefs = coefs();
        long[] s = seeds();
        for (int k = 0; k < s.length; k++) {
            bySeed.merge(s[k], coefs[k], Double::sum);
        }
        int start = block == null ? 0 : block.start;
        int stop = block == null ? w.length : block.end;
        double[] change = new double[w.length];
        for (Map.Entry<Long, Double> e : bySeed.entrySet()) {
            float c = (float) (double) e.getValue();
            float[] z = Directions.slice(e.getKey(), start, stop, kind);
            if (scales != null) {  // the scaled direction d_s, element by element as a step made it
                float[] whole = new float[w.length];
                System.arraycopy(z, 0, whole, start, stop - start);
                z = java.util.Arrays.copyOfRange(scales.apply(whole), start, stop);
            }
            for (int i = start; i < stop; i++) {
                change[i] += c * z[i - start];
            }
        }
        if (scale != 1.0) {
            for (int i = 0; i < w.length; i++) {
                change[i] += (scale - 1.0) * (double) w[i];
            }
        }
        float[] out = new float[w.length];
        for (int i = 0; i < w.length; i++) {
            out[i] = (float) ((double) w[i] + change[i]);
        }
        return out;
    }
}
