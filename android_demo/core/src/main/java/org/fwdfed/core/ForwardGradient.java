package org.fwdfed.core;

import java.util.ArrayList;
import java.util.Comparator;
import java.util.List;

/**
 * The forward gradient of FwdLLM (fwdfed/methods/fwdgrad.py): for every local batch, K directions
 * v_k and their finite-difference JVPs (L(w + h v_k) - L(w - h v_k)) / 2h, all 2K evaluations in
 * one call, at the global adapter (w does not move: FedSGD). The upload is -lr times the
 * estimate sum_k jvp_k v_k / K averaged over the batches, in seed form.
 *
 * With a reference (the previous round's global update) and candidates m > 1, each batch draws
 * m*K seeds and keeps the K whose directions are most aligned (cosine) with the reference.
 */
public final class ForwardGradient implements Optimizer {
    public static final class Config extends StepConfig {  // eps is FwdLLM's finite-difference step h
        public final int candidates;

        public Config(double lr, double eps, int directions, String kind, int candidates, Block block) {
            super(lr, eps, directions, kind, block);
            Hparams.checkCount("candidates", candidates, Hparams.MAX_CANDIDATES);
            this.candidates = candidates;
        }

        public static Config fromHparams(Hparams h) {
            StepConfig.Fields f = StepConfig.read(h, 4L, Directions.GAUSSIAN);
            long candidates = Hparams.checkCount("candidates", h.integer("candidates", 1L), Hparams.MAX_CANDIDATES);
            return new Config(f.lr(), f.eps(), f.directions(), f.kind(), (int) candidates, f.block());
        }

        @Override public int adapterCopies() { return 1 + 3 * Math.max(1, directions); }

        @Override
        public Optimizer optimizer(LossProgram program, float[] adapter, SeedSource seeds, float[] reference) {
            return new ForwardGradient(program, adapter, this, seeds, reference);
        }
    }

    private final LossProgram program;
    private final Config config;
    private final SeedSource seeds;
    private final float[] adapter;
    private final float[] reference;  // null: no selection

    public ForwardGradient(LossProgram program, float[] adapter, Config config, SeedSource seeds, float[] reference) {
        this.program = program;
        this.config = config;
        this.seeds = seeds;
        this.adapter = adapter.clone();
        boolean any = false;
        if (reference != null) {
            for (float r : reference) {
                any |= r != 0.0f;
            }
        }
        this.reference = any ? reference : null;
    }

    long[] select() {
        Config c = config;
        if (reference == null || c.candidates <= 1) {
            return seeds.next(c.directions);
        }
        long[] pool = seeds.next(c.candidates * c.directions);
        double refNorm = 0.0;
        for (float r : reference) {
            refNorm += (double) r * r;
        }
        refNorm = Math.sqrt(refNorm);
        double[] cosines = new double[pool.length];
        for (int j = 0; j < pool.length; j++) {
            float[] z = c.direction(pool[j], adapter.length);
            double dot = 0.0;
            double norm = 0.0;
            for (int i = 0; i < z.length; i++) {
                dot += z[i] * (reference[i] / refNorm);
                norm += (double) z[i] * z[i];
            }
            cosines[j] = dot / Math.sqrt(norm);
        }
        // numpy: argsort(cosines)[::-1][:K]: the largest first; of equal ones, the later index first.
        List<Integer> order = new ArrayList<>();
        for (int j = 0; j < pool.length; j++) {
            order.add(j);
        }
        order.sort(Comparator.<Integer>comparingDouble(j -> -cosines[j]).thenComparing(j -> -j));
        long[] chosen = new long[c.directions];
        for (int k = 0; k < chosen.length; k++) {
            chosen[k] = pool[order.get(k)];
        }
        return chosen;
    }

    @Override
    public LocalRun train(List<Batch> batches, int steps, StepGuard guard) {
        Config c = config;
        LocalRun run = new LocalRun();
        float minusLr = (float) -c.lr;
        float divisor = (float) ((long) c.directions * steps);
        for (int i = 0; i < steps; i++) {
            long[] stepSeeds = select();
            CentralDifferences est = CentralDifferences.estimate(program, batches.get(i % batches.size()), adapter,
                    stepSeeds, c);
            float[] coefs = new float[c.directions];
            boolean finite = true;
            for (int k = 0; k < coefs.length; k++) {
                coefs[k] = minusLr * est.projected[k] / divisor;
                finite &= Float.isFinite(coefs[k]);
            }
            if (finite) {
                run.add(stepSeeds, coefs);
                run.recordLoss(est.loss);
            }
            guard.afterStep();
        }
        return run;
    }
}
