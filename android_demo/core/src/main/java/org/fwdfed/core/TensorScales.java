package org.fwdfed.core;

import java.util.List;

/**
 * A task's per-tensor perturbation scales (`tensor_scales`, fwdfed/tensor_scale.py, docs/directions.md):
 * ranges [start, stop) each with a float32 scale, 1 outside every range. The scaled direction is
 * d[i] = z[i] * scale(i), one float product (IEEE single, rounded once, as numpy's float32 `*`).
 * The checks are the Python device's (`check_ranges`), so both refuse the same tasks.
 */
public final class TensorScales {
    static final int MAX_RANGES = Codec.MAX_SCALE_RANGES;

    private final int[] starts;
    private final int[] stops;
    private final float[] scales;
    private float[] expanded;  // made once for the adapter's dimension (every direction of the task uses it)

    private TensorScales(int[] starts, int[] stops, float[] scales) {
        this.starts = starts;
        this.stops = stops;
        this.scales = scales;
    }

    /** The task's scales, or null when it carries none; IllegalArgumentException naming the first fault. */
    public static TensorScales fromHparams(Hparams h) {
        if (!h.has(Codec.TENSOR_SCALES)) {
            return null;
        }
        Object v = h.raw(Codec.TENSOR_SCALES);
        if (!(v instanceof List) || ((List<?>) v).isEmpty() || ((List<?>) v).size() > MAX_RANGES) {
            throw new IllegalArgumentException("tensor_scales must be a list of 1 to " + MAX_RANGES
                    + " [start, stop, scale] ranges");
        }
        List<?> items = (List<?>) v;
        int[] starts = new int[items.size()];
        int[] stops = new int[items.size()];
        float[] scales = new float[items.size()];
        long last = 0;
        for (int k = 0; k < items.size(); k++) {
            Object item = items.get(k);
            if (!(item instanceof List) || ((List<?>) item).size() != 3) {
                throw new IllegalArgumentException("tensor_scales: each range must be [start, stop, scale], got " + item);
            }
            List<?> r = (List<?>) item;
            if (!(r.get(0) instanceof Long) || !(r.get(1) instanceof Long)) {
                throw new IllegalArgumentException("tensor_scales: start and stop must be integers, got " + r);
            }
            long start = (Long) r.get(0);
            long stop = (Long) r.get(1);
            if (!(last <= start && start < stop) || stop > Integer.MAX_VALUE) {
                throw new IllegalArgumentException("tensor_scales: ranges must have 0 <= start < stop, in increasing "
                        + "order without overlapping, got [" + start + ", " + stop + ") after one ending at " + last);
            }
            Object s = r.get(2);
            if (!(s instanceof Number)) {
                throw new IllegalArgumentException("tensor_scales: a scale must be a number, got " + s);
            }
            double scale = Codec.asDouble(s);
            float single = (float) scale;
            if (!(Double.isFinite(scale) && scale > 0 && Float.isFinite(single) && single > 0)) {
                throw new IllegalArgumentException("tensor_scales: a scale must be a finite number > 0 in float32, got "
                        + s);
            }
            starts[k] = (int) start;
            stops[k] = (int) stop;
            scales[k] = single;
            last = stop;
        }
        return new TensorScales(starts, stops, scales);
    }

    /** The ranges end within the adapter; IllegalArgumentException otherwise. */
    public void checkDim(int dim) {
        int end = stops[stops.length - 1];
        if (end > dim) {
            throw new IllegalArgumentException("tensor_scales: the range ending at " + end
                    + " passes the adapter's dimension " + dim);
        }
    }

    /** z (a direction of the adapter's dimension) multiplied in place by the scales; returns z. */
    public float[] apply(float[] z) {
        if (expanded == null || expanded.length != z.length) {
            checkDim(z.length);
            float[] e = new float[z.length];
            java.util.Arrays.fill(e, 1.0f);
            for (int k = 0; k < scales.length; k++) {
                java.util.Arrays.fill(e, starts[k], stops[k], scales[k]);
            }
            expanded = e;
        }
        for (int i = 0; i < z.length; i++) {
            z[i] = z[i] * expanded[i];
        }
        return z;
    }
}
