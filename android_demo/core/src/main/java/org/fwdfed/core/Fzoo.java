package org.fwdfed.core;

import java.util.List;

/**
 * FZOO (fwdfed/methods/fzoo.py): n >= 2 one-sided directions against one shared evaluation of w in
 * one call (P = n + 1), the step divided by the population std sigma of the n perturbed losses:
 * coef_k = -lr_t (L_k - L_0) / (sigma n), lr_t constant or linear to 0 over the local steps. A step
 * whose sigma is 0 or not finite (the directions do not change the loss) is skipped and recorded
 * nowhere. The losses are float32 (as the program gives them); sigma and the coefficients are
 * computed in double, as numpy does, and uploaded as doubles; the master copy moves by their
 * float32 roundings, as the Python device's does.
 */
public final class Fzoo implements Optimizer {
    public static final class Config extends StepConfig {
        public final String schedule;  // "constant", or "linear" to 0 over the local steps

        public Config(double lr, double eps, int directions, String kind, String schedule, Block block) {
            super(lr, eps, directions, kind, block);
            if (directions < 2) {
                throw new IllegalArgumentException("fzoo needs at least 2 directions per step (the spread of their "
                        + "losses), got " + directions);
            }
            Mezo.checkSchedule(schedule);
            this.schedule = schedule;
        }

        public static Config fromHparams(Hparams h) {
            StepConfig.Fields f = StepConfig.read(h, 8L, Directions.RADEMACHER);
            return new Config(f.lr(), f.eps(), f.directions(), f.kind(), h.text("schedule", "constant"), f.block());
        }

        @Override public int adapterCopies() { return 2 + 2 * Math.max(1, directions); }

        @Override
        public Optimizer optimizer(LossProgram program, float[] adapter, SeedSource seeds, float[] reference) {
            return new Fzoo(program, adapter, this, seeds);
        }
    }

    private final LossProgram program;
    private final Config config;
    private final SeedSource seeds;
    private float[] adapter;  // the fp32 master copy

    public Fzoo(LossProgram program, float[] adapter, Config config, SeedSource seeds) {
        this.program = program;
        this.config = config;
        this.seeds = seeds;
        this.adapter = adapter.clone();
    }

    public float[] adapter() {
        return adapter;
    }

    /** -lr (L_k - L_0) / (sigma n) for losses [L_0, L_1..L_n]; null when sigma is 0 or not finite. */
    static double[] normalisedCoefficients(float[] losses, double lr) {
        int n = losses.length - 1;
        double shared = losses[0];
        double mean = 0;
        for (int k = 1; k <= n; k++) {
            mean += losses[k];
        }
        mean /= n;
        double squares = 0;
        for (int k = 1; k <= n; k++) {
            double e = losses[k] - mean;
            squares += e * e;
        }
        double sigma = Math.sqrt(squares / n);
        if (!(Double.isFinite(sigma) && sigma > 0 && Double.isFinite(shared))) {
            return null;
        }
        double[] coefs = new double[n];
        for (int k = 0; k < n; k++) {
            coefs[k] = -lr * (losses[k + 1] - shared) / (sigma * n);
        }
        return coefs;
    }

    void step(Batch batch, LocalRun run, double lr) {
        Config c = config;
        int n = c.directions;
        int d = adapter.length;
        long[] stepSeeds = seeds.next(n);
        float epsF = (float) c.eps;
        float[][] z = new float[n][];
        for (int k = 0; k < n; k++) {
            z[k] = c.direction(stepSeeds[k], d);
        }
        float[][] adapters = OneSided.sharedAndPerturbed(adapter, z, epsF);
        float[] losses = Losses.weightedMean(Losses.perExample(program, batch, adapters), batch.weights);
        double[] exact = normalisedCoefficients(losses, lr);
        if (exact == null) {
            return;
        }
        float[] coefs = new float[n];
        for (int k = 0; k < n; k++) {
            coefs[k] = (float) exact[k];
        }
        adapter = OneSided.moved(adapter, coefs, z);
        run.add(stepSeeds, exact);  // the doubles, as the Python device uploads them; the adapter moved by floats
        run.recordLoss(losses[0]);
    }

    @Override
    public LocalRun train(List<Batch> batches, int steps, StepGuard guard) {
        LocalRun run = new LocalRun();
        for (int i = 0; i < steps; i++) {
            double lr = config.lr * (config.schedule.equals("linear") ? 1.0 - (double) i / steps : 1.0);
            step(batches.get(i % batches.size()), run, lr);
            guard.afterStep();
        }
        return run;
    }
}
