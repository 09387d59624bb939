package org.fwdfed.core;

import static org.fwdfed.core.UnitTests.check;
import static org.fwdfed.core.UnitTests.equal;
import static org.fwdfed.core.UnitTests.raises;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;

/** MeZO, the forward gradient and one-sided MeZO on a program whose loss is known in closed form. */
final class TrainingTests {
    private TrainingTests() {}

    /** loss_b(w) = (b + 1) * ||w - target||^2 / d: per example, as the real program returns it. */
    static final class Quadratic implements LossProgram {
        final float[] target;
        final int maxP;
        final List<float[][]> calls = new ArrayList<>();
        float poison = Float.NaN;  // returned instead of the loss on the call numbered `poisonCall`
        int poisonCall = -1;

        Quadratic(float[] target, int maxP) {
            this.target = target;
            this.maxP = maxP;
        }

        @Override
        public float[][] loss(int[][] ids, int[][] mask, int[][] labels, float[][] adapters) {
            check(adapters.length <= maxP, "no call has more than max_perturbations adapters");
            float[][] copy = new float[adapters.length][];
            for (int p = 0; p < adapters.length; p++) {
                copy[p] = adapters[p].clone();
            }
            calls.add(copy);
            float[][] out = new float[adapters.length][ids.length];
            for (int p = 0; p < adapters.length; p++) {
                double s = 0;
                for (int i = 0; i < target.length; i++) {
                    double e = adapters[p][i] - target[i];
                    s += e * e;
                }
                for (int b = 0; b < ids.length; b++) {
                    out[p][b] = calls.size() - 1 == poisonCall ? poison : (float) ((b + 1) * s / target.length);
                }
            }
            return out;
        }

        @Override
        public int maxPerturbations() {
            return maxP;
        }
    }

    static List<Batch> batches(int count) {
        List<Batch> out = new ArrayList<>();
        for (int k = 0; k < count; k++) {
            out.add(new Batch(new int[2][3], new int[2][3], new int[2][3], new float[] {1.0f, k % 2 == 0 ? 1.0f : 0.0f}));
        }
        return out;
    }

    static SeedSource seeds(long... values) {
        int[] at = {0};
        return () -> values[at[0]++];
    }

    static float[] vector(int d, float scale) {
        float[] v = new float[d];
        for (int i = 0; i < d; i++) {
            v[i] = scale * (float) Math.sin(i + 1.0);
        }
        return v;
    }

    static void testMezoStepIsMinusLrTimesTheCentralDifferenceAlongFreshCopies() {
        int d = 16;
        float[] w = vector(d, 0.3f);
        Quadratic program = new Quadratic(vector(d, -0.2f), 8);
        Mezo.Config config = new Mezo.Config(0.01, 1e-2, 1, "rademacher", 0.0, "constant", null);
        Mezo mezo = new Mezo(program, w, config, seeds(7));
        float[] before = w.clone();
        LocalRun run = mezo.train(batches(1), 1, StepGuard.NONE);
        check(java.util.Arrays.equals(before, w), "the caller's adapter is never perturbed in place");
        float[][] call = program.calls.get(0);
        equal(2, call.length, "both signs of one direction in one call");
        float[] z = Directions.rademacher(7, 0, d);
        for (int i = 0; i < d; i++) {
            check(call[0][i] == w[i] + 0.01f * z[i] && call[1][i] == w[i] - 0.01f * z[i], "w +- eps z, element " + i);
        }
        float[] lp = Losses.weightedMean(program.loss(new int[2][3], null, null, new float[][] {call[0]}),
                new float[] {1, 1});
        float[] lm = Losses.weightedMean(program.loss(new int[2][3], null, null, new float[][] {call[1]}), new float[] {1, 1});
        float expected = (float) -0.01 * ((lp[0] - lm[0]) / (float) 0.02) / 1.0f;
        equal(7L, run.seeds()[0], "the seed is recorded");
        equal((double) expected, run.coefs()[0], "coef = -lr (L+ - L-) / (2 eps) / n");
        float[] master = mezo.adapter();
        for (int i = 0; i < d; i++) {
            check(master[i] == w[i] + expected * z[i], "the master copy moved by coef z, element " + i);
        }
        // The seed form reproduces the master copy: w + coef z.
        check(java.util.Arrays.equals(master, run.applyTo(w, "rademacher", null, null)), "applyTo(w) is the trained adapter");
    }

    static void testMezoWithWeightDecayAndLinearScheduleRecordsTheScale() {
        int d = 32;
        float[] w = vector(d, 0.5f);
        Quadratic program = new Quadratic(new float[d], 8);
        Mezo.Config config = new Mezo.Config(0.1, 1e-2, 2, "gaussian", 0.5, "linear", null);
        Mezo mezo = new Mezo(program, w, config, new SeedStream(1, 1, 0, "x"));
        LocalRun run = mezo.train(batches(3), 4, StepGuard.NONE);
        double scale = 1.0;
        for (int i = 0; i < 4; i++) {
            scale *= 1.0 - 0.1 * (1.0 - i / 4.0) * 0.5;
        }
        check(Math.abs(run.scale() - scale) < 1e-15, "scale = prod (1 - lr_t wd): " + run.scale() + " vs " + scale);
        equal(8, run.seeds().length, "4 steps x 2 directions");
        float[] replayed = run.applyTo(w, "gaussian", null, null);
        float[] master = mezo.adapter();
        for (int i = 0; i < d; i++) {
            check(Math.abs(replayed[i] - master[i]) <= 1e-6f * Math.max(1f, Math.abs(master[i])),
                    "the seed form rebuilds the master copy, element " + i);
        }
        double before = Losses.meanLoss(program, batches(1), w);
        double after = Losses.meanLoss(program, batches(1), master);
        check(after < before, "four steps on a quadratic lower the loss: " + before + " -> " + after);
    }

    static void testANonFiniteStepIsSkippedAndRecordsNothing() {
        int d = 8;
        Quadratic program = new Quadratic(new float[d], 8);
        program.poisonCall = 1;  // the second step's call returns NaN
        Mezo mezo = new Mezo(program, vector(d, 1f), new Mezo.Config(0.01, 0.01, 1, "rademacher", 0.1, "constant", null),
                seeds(1, 2, 3));
        int[] guarded = {0};
        LocalRun run = mezo.train(batches(1), 3, () -> guarded[0]++);
        check(java.util.Arrays.equals(run.seeds(), new long[] {1, 3}), "the NaN step's seed is not recorded");
        check(Math.abs(run.scale() - 0.999 * 0.999) < 1e-15, "nor its weight decay");
        equal(3, guarded[0], "the guard runs after every step, skipped ones too");
    }

    static void testCallsNeverExceedMaxPerturbations() {
        Quadratic program = new Quadratic(new float[4], 3);
        new Mezo(program, vector(4, 1f), new Mezo.Config(0.01, 0.01, 4, "rademacher", 0, "constant", null),
                seeds(1, 2, 3, 4)).train(batches(1), 1, StepGuard.NONE);
        equal(3, program.calls.size(), "P = 8 in calls of 3, 3 and 2");
    }

    static void testBlockDirectionsAreZeroOutsideTheBlock() {
        int d = 20;
        float[] w = vector(d, 1f);
        Quadratic program = new Quadratic(new float[d], 8);
        Mezo mezo = new Mezo(program, w, new Mezo.Config(0.1, 0.01, 1, "gaussian", 0, "constant", new Block(5, 9)),
                seeds(11));
        mezo.train(batches(1), 1, StepGuard.NONE);
        for (int i = 0; i < d; i++) {
            boolean inside = i >= 5 && i < 9;
            check(inside || mezo.adapter()[i] == w[i], "element " + i + " outside the block does not move");
            check(!inside || mezo.adapter()[i] != w[i], "element " + i + " inside the block moves");
        }
        float[] z = Directions.blockDirection(11, d, "gaussian", new Block(5, 9));
        float[] g = Directions.gaussian(11, 0, d);
        check(z[4] == 0 && z[9] == 0 && z[5] == g[5] && z[8] == g[8], "a block direction is the direction's slice");
    }

    static void testForwardGradientEvaluatesAtTheGlobalAdapterAndAverages() {
        int d = 8;
        float[] w = vector(d, 1f);
        Quadratic program = new Quadratic(new float[d], 8);
        ForwardGradient.Config config = new ForwardGradient.Config(0.1, 0.01, 2, "gaussian", 1, null);
        LocalRun run = new ForwardGradient(program, w, config, seeds(1, 2, 3, 4, 5, 6), null)
                .train(batches(2), 3, StepGuard.NONE);
        equal(6, run.seeds().length, "K pairs per batch");
        for (float[][] call : program.calls) {
            for (int i = 0; i < d; i++) {
                check(call[0][i] + call[2][i] == 2 * w[i] || Math.abs((call[0][i] + call[2][i]) / 2 - w[i]) < 1e-6,
                        "w is not moved between batches");
            }
        }
        // coef = -lr * projected / (K * steps): the sum of the coefficients' directions is -lr x the mean estimate.
        float[][] c0 = program.calls.get(0);
        float[] l = Losses.weightedMean(program.loss(new int[2][3], null, null, c0), new float[] {1, 1});
        float expected = (float) -0.1 * ((l[0] - l[2]) / (float) 0.02) / 6.0f;
        equal((double) expected, run.coefs()[0], "the first coefficient");
    }

    static void testForwardGradientKeepsTheDirectionsMostAlignedWithTheReference() {
        int d = 64;
        float[] reference = Directions.gaussian(5, 0, d);  // seed 5's direction is perfectly aligned
        Quadratic program = new Quadratic(new float[d], 8);
        ForwardGradient.Config config = new ForwardGradient.Config(0.1, 0.01, 1, "gaussian", 4, null);
        LocalRun run = new ForwardGradient(program, vector(d, 1f), config, seeds(1, 2, 5, 3), reference)
                .train(batches(1), 1, StepGuard.NONE);
        equal(5L, run.seeds()[0], "of 4 candidates, the one along the reference");
    }

    static void testOneSidedSharesOneEvaluationOfW() {
        int d = 8;
        float[] w = vector(d, 1f);
        Quadratic program = new Quadratic(new float[d], 8);
        OneSided.Config config = new OneSided.Config(0.01, 0.01, 3, "rademacher", null);
        LocalRun run = new OneSided(program, w, config, seeds(1, 2, 3)).train(batches(1), 1, StepGuard.NONE);
        equal(4, program.calls.get(0).length, "P = n + 1");
        check(java.util.Arrays.equals(program.calls.get(0)[0], w), "the first vector is w itself");
        equal(3, run.seeds().length, "n pairs");
    }

    static void testFzooDividesTheOneSidedDifferencesByTheirSpread() {
        int d = 16;
        float[] w = vector(d, 0.3f);
        Quadratic program = new Quadratic(vector(d, -0.2f), 8);
        Fzoo.Config config = new Fzoo.Config(0.01, 1e-2, 3, "rademacher", "constant", null);
        Fzoo fzoo = new Fzoo(program, w, config, seeds(4, 5, 6));
        LocalRun run = fzoo.train(batches(1), 1, StepGuard.NONE);
        float[][] call = program.calls.get(0);
        equal(4, call.length, "P = n + 1");
        check(java.util.Arrays.equals(call[0], w), "the first vector is w itself");
        float[] losses = Losses.weightedMean(program.loss(new int[2][3], null, null, call), new float[] {1, 1});
        double mean = ((double) losses[1] + losses[2] + losses[3]) / 3;
        double var = 0;
        for (int k = 1; k <= 3; k++) {
            var += (losses[k] - mean) * (losses[k] - mean);
        }
        double sigma = Math.sqrt(var / 3);
        float[] master = fzoo.adapter();
        float[] moved = new float[d];
        for (int k = 0; k < 3; k++) {
            double exact = -0.01 * (losses[k + 1] - (double) losses[0]) / (sigma * 3);
            equal(exact, run.coefs()[k], "coef_k = -lr (L_k - L_0) / (sigma n) in double, direction " + k);
            float coef = (float) exact;
            float[] z = Directions.rademacher(4 + k, 0, d);
            for (int i = 0; i < d; i++) {
                moved[i] = k == 0 ? coef * z[i] : moved[i] + coef * z[i];
            }
        }
        for (int i = 0; i < d; i++) {
            check(master[i] == w[i] + moved[i], "the master copy moved by sum coef z, element " + i);
        }
        // The step does not depend on the loss's scale (the point of dividing by sigma, not eps).
        float[] steeper = new float[losses.length];
        for (int k = 0; k < losses.length; k++) {
            steeper[k] = 1024f * losses[k];
        }
        double[] a = Fzoo.normalisedCoefficients(losses, 0.01);
        double[] b = Fzoo.normalisedCoefficients(steeper, 0.01);
        for (int k = 0; k < 3; k++) {
            check(Math.abs(a[k] - b[k]) <= 1e-12 * Math.abs(a[k]) + 1e-15, "the same step for 1024 x the loss, " + k);
        }
        raises(IllegalArgumentException.class, "at least 2 directions",
                () -> new Fzoo.Config(0.01, 1e-2, 1, "rademacher", "constant", null));
    }

    static void testFzooSkipsAStepWhoseLossesDoNotSpread() {
        int d = 4;
        float[] w = vector(d, 0.3f);
        LossProgram flat = new LossProgram() {
            @Override
            public float[][] loss(int[][] ids, int[][] mask, int[][] labels, float[][] adapters) {
                return new float[adapters.length][ids.length];
            }

            @Override
            public int maxPerturbations() {
                return 8;
            }
        };
        Fzoo fzoo = new Fzoo(flat, w, new Fzoo.Config(0.01, 1e-2, 2, "rademacher", "constant", null), seeds(1, 2));
        LocalRun run = fzoo.train(batches(1), 1, StepGuard.NONE);
        equal(0, run.seeds().length, "sigma = 0: no step, no pairs");
        check(java.util.Arrays.equals(fzoo.adapter(), w), "and the adapter unchanged");
    }

    static void testSeedStreamIsReproducibleAndDiffersAcrossRoundsAndDevices() {
        long[] a = new SeedStream(0, 1, 0, "java-1").next(5);
        check(java.util.Arrays.equals(a, new SeedStream(0, 1, 0, "java-1").next(5)), "the same task, the same seeds");
        Set<Long> all = new HashSet<>();
        for (long[] s : List.of(a, new SeedStream(0, 2, 0, "java-1").next(5), new SeedStream(0, 1, 1, "java-1").next(5),
                new SeedStream(0, 1, 0, "java-2").next(5), new SeedStream(1, 1, 0, "java-1").next(5))) {
            for (long x : s) {
                check(x >= 0, "seeds are in [0, 2^63)");
                all.add(x);
            }
        }
        equal(25, all.size(), "no seed repeats across rounds, waves, devices and device seeds");
    }

    static void testHyperparametersAreReadWithPythonsRules() {
        Map<String, Object> h = new LinkedHashMap<>();
        h.put("lr", "1e-3");
        h.put("eps", 1L);
        h.put("local_steps", 2.7);
        h.put("directions", " 3 ");
        Hparams p = new Hparams(h);
        equal(1e-3, p.number("lr", null), "float('1e-3')");
        equal(1.0, p.number("eps", null), "an int where a float is meant");
        equal(2L, p.integer("local_steps", null), "int(2.7) == 2");
        equal(3L, p.integer("directions", null), "int(' 3 ')");
        equal(0L, p.integer("wave", 0L), "a default when absent");
        raises(IllegalArgumentException.class, "h is missing", () -> p.number("h", null));
        h.put("lr", "inf");
        raises(IllegalArgumentException.class, "lr must be a finite number > 0",
                () -> Methods.config("mezo", new Hparams(h)));
        h.put("lr", 0.1);
        h.put("weight_decay", 10L);
        raises(IllegalArgumentException.class, "lr * weight_decay < 1", () -> Methods.config("mezo", new Hparams(h)));
        h.put("weight_decay", 0.0);
        h.put("kind", "uniform");
        raises(IllegalArgumentException.class, "unknown direction kind", () -> Methods.config("mezo", new Hparams(h)));
        h.put("kind", "gaussian");
        h.put("directions", 5000L);
        raises(IllegalArgumentException.class, "directions must be between 1 and 4096",
                () -> Methods.config("mezo", new Hparams(h)));
        h.put("directions", "x");
        raises(IllegalArgumentException.class, "directions must be an integer", () -> Methods.config("mezo", new Hparams(h)));
    }

    /** A bundle folder holding only what the trainer reads: manifest.json and the initial adapter. */
    static Manifest manifest(int d) throws Exception {
        Path dir = Files.createTempDirectory("bundle");
        String json = "{\"task\": \"causal-lm\", \"model\": {\"hash\": \"h0\", \"num_labels\": null},"
                + "\"adapter\": {\"dim\": " + d + ", \"initial\": \"adapter_init.f32\"},"
                + "\"layout\": [{\"name\": \"a\", \"shape\": [" + d + "], \"offset\": 0}], \"tokenizer\": \"tokenizer\","
                + "\"inputs\": {\"batch_size\": 2, \"seq_len\": 3, \"max_perturbations\": 8},"
                + "\"program\": {\"file\": \"model.pte\", \"bytes\": 1000000, \"planned_memory_bytes\": {\"forward\": 2000000},"
                + "\"workspace_bytes\": 3000000}, \"format_version\": 1}";
        Files.writeString(dir.resolve("manifest.json"), json, StandardCharsets.UTF_8);
        Files.write(dir.resolve("adapter_init.f32"), Manifest.Float32.toBytes(new float[d]));
        Files.write(dir.resolve("model.pte"), new byte[1]);
        return Manifest.load(dir);
    }

    static Message.Task task(float[] adapter, String method, Map<String, Object> hparams, byte[] reference) {
        byte[] bytes = Manifest.Float32.toBytes(adapter);
        return new Message.Task("t1", "j", 2, 1, "h0", bytes, TaskTrainer.sha256Hex(bytes), method, hparams, 10.0,
                reference);
    }

    static void testAHostileTaskIsRefusedBeforeTheProgramRuns() throws Exception {
        int d = 6;
        Manifest m = manifest(d);
        Quadratic program = new Quadratic(new float[d], 8);
        TaskTrainer trainer = new TaskTrainer(m, program, batches(2), 4, 400_000_000L, 0L,
                (round, wave) -> seeds(1, 2, 3, 4, 5, 6, 7, 8, 9, 10), () -> 1L);
        Map<String, Object> h = new LinkedHashMap<>();
        h.put("lr", 0.01);
        h.put("eps", 0.01);
        h.put("local_steps", 2L);
        float[] w = vector(d, 1f);
        Message.Task good = task(w, "mezo", h, new byte[0]);
        byte[] truncated = java.util.Arrays.copyOf(good.adapter, 4 * d - 1);
        List<Map.Entry<Message.Task, String>> cases = new ArrayList<>();
        cases.add(Map.entry(new Message.Task("t1", "j", 2, 1, "other", good.adapter, good.adapterSha256, "mezo", h, 1,
                new byte[0]), "is for base model other"));
        cases.add(Map.entry(new Message.Task("t1", "j", 2, 1, "h0", truncated, TaskTrainer.sha256Hex(truncated), "mezo", h, 1,
                new byte[0]), "carries 23 adapter bytes, expected 24"));
        cases.add(Map.entry(new Message.Task("t1", "j", 2, 1, "h0", good.adapter, "0".repeat(64), "mezo", h, 1,
                new byte[0]), "does not match its sha256"));
        cases.add(Map.entry(task(w, "backprop", h, new byte[0]), "asks for method 'backprop'"));
        float[] nan = w.clone();
        nan[3] = Float.NaN;
        cases.add(Map.entry(task(nan, "mezo", h, new byte[0]), "NaN or infinite"));
        cases.add(Map.entry(task(w, "fwdgrad", h, new byte[5]), "a reference of 5 bytes"));
        Map<String, Object> noLr = new LinkedHashMap<>(h);
        noLr.remove("lr");
        cases.add(Map.entry(task(w, "mezo", noLr, new byte[0]), "lr is missing"));
        Map<String, Object> block = new LinkedHashMap<>(h);
        block.put("block_start", 2L);
        block.put("block_end", 7L);
        cases.add(Map.entry(task(w, "mezo", block, new byte[0]), "passes the adapter's dimension 6"));
        Map<String, Object> pairs = new LinkedHashMap<>(h);
        pairs.put("local_steps", 100_000L);
        pairs.put("directions", 11L);
        cases.add(Map.entry(task(w, "mezo", pairs, new byte[0]), "more (seed, coefficient) pairs"));
        Map<String, Object> big = new LinkedHashMap<>(h);
        big.put("directions", 4096L);
        big.put("local_steps", 1L);
        TaskTrainer small = new TaskTrainer(m, program, batches(2), 4, 6_200_000L, 0L,
                (round, wave) -> seeds(1), () -> 1L);
        for (Map.Entry<Message.Task, String> c : cases) {
            raises(DeviceException.class, c.getValue(), () -> trainer.train(c.getKey(), StepGuard.NONE));
        }
        raises(DeviceException.class, "budget", () -> small.train(task(w, "mezo", big, new byte[0]), StepGuard.NONE));
        equal(0, program.calls.size(), "no task above reached the program");
        Message.Update u = trainer.train(good, StepGuard.NONE);
        equal(2, u.seeds.length, "the good task trains");
        equal(4L, u.numExamples, "and reports the shard's examples");
        check(u.lossAfter < u.lossBefore, "and lowers the probe loss on a quadratic");
    }

    static void testTheBudgetGuardStopsTheFirstStepPastTheBudget() {
        long[] peak = {100};
        BudgetGuard guard = new BudgetGuard(1000L, () -> peak[0]);
        guard.afterStep();
        peak[0] = 1001;
        raises(BudgetException.class, "at training step 2", guard::afterStep);
        new BudgetGuard(null, () -> Long.MAX_VALUE).afterStep();  // no budget, no check
        check(ProcStatus.peakRss() > 0 && ProcStatus.currentRss() > 0, "VmHWM and VmRSS are readable here");
        long current = ProcStatus.currentRss();
        check(ProcStatus.peakRss() >= current, "the peak is at least the current");
    }

    static void testTheMemoryPlanAddsUpAndRefusesWithWhatWouldFit() throws Exception {
        Manifest m = manifest(1000);
        MemoryPlan plan = MemoryPlan.plan(m, 100_000_000L, 10, 2, 7, 50_000_000L);
        equal(50_000_000L + 1_000_000 + 2_000_000 + 3_000_000 + 7 * 1000 * 4 + 10 * 3 * 24, plan.total(), "the sum");
        raises(BudgetException.class, "runtime and weights alone", () -> MemoryPlan.plan(m, 50_500_000L, 10, 2, 7, 50_000_000L));
        raises(BudgetException.class, "nothing: the runtime alone", () -> MemoryPlan.plan(m, 1_000L, 10, 2, 7, 50_000_000L));
        equal(1_500_000_000L, MemorySize.parse("1.5GB"), "decimal units");
        equal(800L << 20, MemorySize.parse("800MiB"), "binary units");
        raises(IllegalArgumentException.class, "cannot read memory size", () -> MemorySize.parse("lots"));
    }
}
