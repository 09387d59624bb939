package org.fwdfed.core;

import java.util.List;

/**
 * One-sided MeZO (fwdfed/methods/onesided.py): forward differences against one shared
 * evaluation of w, g_k = (L(w + eps z_k) - L(w)) / eps; w and the n perturbed copies in one call
 * (P = n + 1); w <- w - lr sum_k g_k z_k / n. Uploads as MeZO.
 */
public final class OneSided implements Optimizer {
    public static final class Config extends StepConfig {
        public Config(double lr, double eps, int directions, String kind, Block block) {
            super(lr, eps, directions, kind, block);
        }

        public static Config fromHparams(Hparams h) {
            StepConfig.Fields f = StepConfig.read(h, 1L, Directions.RADEMACHER);
            return new Config(f.lr(), f.eps(), f.directions(), f.kind(), f.block());
        }

        @Override public int adapterCopies() { return 2 + 2 * Math.max(1, directions); }

        @Override
        public Optimizer optimizer(LossProgram program, float[] adapter, SeedSource seeds, float[] reference) {
            return new OneSided(program, adapter, this, seeds);
        }
    }

    private final LossProgram program;
    private final Config config;
    private final SeedSource seeds;
    private float[] adapter;

    public OneSided(LossProgram program, float[] adapter, Config config, SeedSource seeds) {
        this.program = program;
        this.config = config;
        this.seeds = seeds;
        this.adapter = adapter.clone();
    }

    @Override
    public LocalRun train(List<Batch> batches, int steps, StepGuard guard) {
        Config c = config;
        LocalRun run = new LocalRun();
        int n = c.directions;
        int d = adapter.length;
        float epsF = (float) c.eps;
        float minusLr = (float) -c.lr;
        for (int i = 0; i < steps; i++) {
            Batch batch = batches.get(i % batches.size());
            long[] stepSeeds = seeds.next(n);
            float[][] z = new float[n][];
            for (int k = 0; k < n; k++) {
                z[k] = c.direction(stepSeeds[k], d);
            }
            float[][] adapters = sharedAndPerturbed(adapter, z, epsF);
            float[] losses = Losses.weightedMean(Losses.perExample(program, batch, adapters), batch.weights);
            float[] coefs = new float[n];
            boolean finite = true;
            for (int k = 0; k < n; k++) {
                coefs[k] = minusLr * (losses[k + 1] - losses[0]) / epsF / (float) n;
                finite &= Float.isFinite(coefs[k]);
            }
            if (finite) {
                adapter = moved(adapter, coefs, z);
                run.add(stepSeeds, coefs);
                run.recordLoss(losses[0]);
            }
            guard.afterStep();
        }
        return run;
    }

    /** [w, w + eps z_1, ..., w + eps z_n]: one call's vectors for a one-sided step (w itself shared). */
    static float[][] sharedAndPerturbed(float[] adapter, float[][] z, float eps) {
        float[][] adapters = new float[z.length + 1][];
        adapters[0] = adapter;
        for (int k = 0; k < z.length; k++) {
            adapters[k + 1] = new float[adapter.length];
            for (int j = 0; j < adapter.length; j++) {
                adapters[k + 1][j] = adapter[j] + eps * z[k][j];
            }
        }
        return adapters;
    }

    /** w + sum_k coef_k z_k, the sum in float32 in k's order (as numpy's coefs @ z for these sizes). */
    static float[] moved(float[] adapter, float[] coefs, float[][] z) {
        float[] next = new float[adapter.length];
        for (int j = 0; j < next.length; j++) {
            float sum = coefs[0] * z[0][j];
            for (int k = 1; k < coefs.length; k++) {
                sum += coefs[k] * z[k][j];
            }
            next[j] = adapter[j] + sum;
        }
        return next;
    }
}
