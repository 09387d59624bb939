package org.fwdfed.core;

import java.util.List;

/**
 * MeZO / SPSA (fwdfed/methods/mezo.py): each step draws n seeds, evaluates w +- eps z_k for all k
 * in one program call, and moves the fp32 master copy along every z_k by
 * coef_k = -lr_t * (L+ - L-) / (2 eps) / n, with MeZO's weight decay
 * w <- (1 - lr_t wd) w + sum_k coef_k z_k. A step whose coefficients are not finite is skipped
 * and recorded nowhere. Every step's (seed, coef) is recorded with the accumulated decay as
 * `scale`: the upload.
 */
public final class Mezo implements Optimizer {
    public static final class Config extends StepConfig {
        public final double weightDecay;
        public final String schedule;  // "constant", or "linear" to 0 over the local steps

        public Config(double lr, double eps, int directions, String kind, double weightDecay, String schedule,
                      Block block) {
            super(lr, eps, directions, kind, block);
            if (!(0 <= lr * weightDecay && lr * weightDecay < 1)) {
                throw new IllegalArgumentException("MeZO needs 0 <= lr * weight_decay < 1, got lr " + lr
                        + " and weight_decay " + weightDecay);
            }
            checkSchedule(schedule);
            this.weightDecay = weightDecay;
            this.schedule = schedule;
        }

        public static Config fromHparams(Hparams h) {
            StepConfig.Fields f = StepConfig.read(h, 1L, Directions.RADEMACHER);
            return new Config(f.lr(), f.eps(), f.directions(), f.kind(), h.number("weight_decay", 0.0),
                    h.text("schedule", "constant"), f.block());
        }

        @Override public int adapterCopies() { return 1 + 3 * Math.max(1, directions); }

        @Override
        public Optimizer optimizer(LossProgram program, float[] adapter, SeedSource seeds, float[] reference) {
            return new Mezo(program, adapter, this, seeds);
        }
    }

    /** mezo's and fzoo's `schedule` of the learning rate over the local steps. */
    static void checkSchedule(String schedule) {
        if (!schedule.equals("constant") && !schedule.equals("linear")) {
            throw new IllegalArgumentException("unknown schedule '" + schedule + "'; expected one of constant, linear");
        }
    }

    private final LossProgram program;
    private final Config config;
    private final SeedSource seeds;
    private float[] adapter;  // the fp32 master copy

    public Mezo(LossProgram program, float[] adapter, Config config, SeedSource seeds) {
        this.program = program;
        this.config = config;
        this.seeds = seeds;
        this.adapter = adapter.clone();
    }

    public float[] adapter() {
        return adapter;
    }

    void step(Batch batch, LocalRun run, double lr) {
        Config c = config;
        long[] stepSeeds = seeds.next(c.directions);
        CentralDifferences est = CentralDifferences.estimate(program, batch, adapter, stepSeeds, c);
        float minusLr = (float) -lr;
        float n = c.directions;
        float[] coefs = new float[c.directions];
        for (int k = 0; k < coefs.length; k++) {
            coefs[k] = minusLr * est.projected[k] / n;
            if (!Float.isFinite(coefs[k])) {
                return;  // a non-finite loss would poison the adapter: skip the step, record nothing
            }
        }
        double factor = 1.0 - lr * c.weightDecay;
        float factorF = (float) factor;
        float[] next = new float[adapter.length];
        for (int i = 0; i < next.length; i++) {
            float moved = 0.0f;  // sum_k coef_k z_k[i] in float32 (for n = 1 exactly numpy's product)
            for (int k = 0; k < coefs.length; k++) {
                moved = k == 0 ? coefs[k] * est.directions[k][i] : moved + coefs[k] * est.directions[k][i];
            }
            next[i] = factorF * adapter[i] + moved;
        }
        adapter = next;
        run.decay(factor);
        run.add(stepSeeds, coefs);
        run.recordLoss(est.loss);
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
