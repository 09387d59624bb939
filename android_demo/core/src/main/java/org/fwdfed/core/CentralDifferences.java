package org.fwdfed.core;

/**
 * The estimate MeZO and the forward gradient share (fwdfed/methods/estimate.py): for seeds
 * s_1..s_n, one program call evaluates the batch at w + eps z_k and w - eps z_k (P = 2n fresh
 * copies; w itself is never perturbed in place, which would drift), and
 * projected_k = (L+_k - L-_k) / (2 eps), in float32 as numpy computes it.
 */
final class CentralDifferences {
    final float[] projected;
    final float[][] directions;
    final float loss;  // mean over the 2n evaluations

    private CentralDifferences(float[] projected, float[][] directions, float loss) {
        this.projected = projected;
        this.directions = directions;
        this.loss = loss;
    }

    static CentralDifferences estimate(LossProgram program, Batch batch, float[] adapter, long[] seeds,
                                       StepConfig config) {
        double eps = config.eps;
        int n = seeds.length;
        int d = adapter.length;
        float epsF = (float) eps;  // numpy casts the Python float to the float32 array's type
        float[][] z = new float[n][];
        float[][] adapters = new float[2 * n][d];
        for (int k = 0; k < n; k++) {
            z[k] = config.direction(seeds[k], d);
            for (int i = 0; i < d; i++) {
                float step = epsF * z[k][i];
                adapters[k][i] = adapter[i] + step;
                adapters[n + k][i] = adapter[i] - step;
            }
        }
        float[] losses = Losses.weightedMean(Losses.perExample(program, batch, adapters), batch.weights);
        float twoEps = (float) (2.0 * eps);
        float[] projected = new float[n];
        for (int k = 0; k < n; k++) {
            projected[k] = (losses[k] - losses[n + k]) / twoEps;
        }
        return new CentralDifferences(projected, z, Losses.numpySum(losses, 0, losses.length) / losses.length);
    }
}
