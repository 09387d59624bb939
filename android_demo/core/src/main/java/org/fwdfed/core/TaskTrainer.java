package org.fwdfed.core;

import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.List;
import java.util.function.LongSupplier;

/**
 * One task, start to finish, as device_sdk/client.py's `Device.train` does it: check the task
 * (base model, adapter size and sha256, method, finite values), read and check every
 * hyperparameter and the memory plan before the first allocation the task sizes, rotate the
 * shard's batches by round, measure loss_before on the first 4 batches, train, measure
 * loss_after on the same batches at the adapter the update describes, and answer in seed form.
 */
public final class TaskTrainer {
    public static final int LOSS_PROBE_BATCHES = 4;

    /** Where a task's seeds come from: the device's {@link SeedStream}, or given ones in tests. */
    public interface SeedSourceFactory {
        SeedSource forTask(long round, long wave);
    }

    private final Manifest manifest;
    private final LossProgram program;
    private final List<Batch> batches;
    private final long numExamples;
    private final Long budget;
    private final long runtimeBytes;
    private final SeedSourceFactory seedFactory;
    private final LongSupplier peakRss;

    /**
     * `runtimeBytes`: the process's resident memory before the program was loaded (the plan's
     * runtime term); `budget` null: no budget.
     */
    public TaskTrainer(Manifest manifest, LossProgram program, List<Batch> batches, long numExamples, Long budget,
                       long runtimeBytes, SeedSourceFactory seedFactory, LongSupplier peakRss) {
        if (batches.isEmpty()) {
            throw new IllegalArgumentException("a device needs at least one batch of data");
        }
        this.manifest = manifest;
        this.program = program;
        this.batches = batches;
        this.numExamples = numExamples;
        this.budget = budget;
        this.runtimeBytes = runtimeBytes;
        this.seedFactory = seedFactory;
        this.peakRss = peakRss;
    }

    public long numExamples() {
        return numExamples;
    }

    /** The task's adapter, or DeviceException saying why the task is unusable. */
    public float[] checkTask(Message.Task task) throws DeviceException {
        Manifest m = manifest;
        if (!task.baseModelHash.equals(m.baseModelHash)) {
            throw new DeviceException("task " + task.taskId + " is for base model " + prefix(task.baseModelHash)
                    + ", this device holds " + prefix(m.baseModelHash));
        }
        if (task.adapter.length != 4L * m.adapterDim) {
            throw new DeviceException("task " + task.taskId + " carries " + task.adapter.length
                    + " adapter bytes, expected " + 4L * m.adapterDim);
        }
        if (!sha256Hex(task.adapter).equals(task.adapterSha256)) {
            throw new DeviceException("task " + task.taskId
                    + ": the adapter does not match its sha256 (corrupted in transit)");
        }
        if (!Methods.known(task.method)) {
            throw new DeviceException("task " + task.taskId + " asks for method '" + task.method
                    + "'; this device runs " + Methods.NAMES);
        }
        if (task.reference.length != 0 && task.reference.length != 4L * m.adapterDim) {
            throw new DeviceException("task " + task.taskId + " carries a reference of " + task.reference.length
                    + " bytes");
        }
        float[] adapter = Manifest.Float32.fromBytes(task.adapter, m.adapterDim, "the adapter");
        // A sha256 only says the bytes arrived as sent: NaN or infinity would poison every loss.
        if (!allFinite(adapter)) {
            throw new DeviceException("task " + task.taskId + ": its adapter holds NaN or infinite values");
        }
        if (task.reference.length > 0
                && !allFinite(Manifest.Float32.fromBytes(task.reference, m.adapterDim, "the reference"))) {
            throw new DeviceException("task " + task.taskId + ": its reference holds NaN or infinite values");
        }
        return adapter;
    }

    /** Train on one task; `guard` runs after every step (the user's stop). */
    public Message.Update train(Message.Task task, StepGuard stop) throws DeviceException {
        float[] adapter = checkTask(task);
        Hparams hparams = new Hparams(task.hparams);
        MethodConfig config;
        int steps;
        long wave;
        long[] pool;
        try {
            config = Methods.config(task.method, hparams);
            steps = hparams.localSteps();
            wave = hparams.integer("wave", 0L);
            pool = SeedPool.fromHparams(hparams);
            if (wave < 0) {
                throw new IllegalArgumentException("wave must be >= 0, got " + wave);
            }
            if (config.block() != null && config.block().end > adapter.length) {
                throw new IllegalArgumentException("the adapter block [" + config.block().start + ", "
                        + config.block().end + ") passes the adapter's dimension " + adapter.length);
            }
            if (config.scales() != null) {
                config.scales().checkDim(adapter.length);
            }
            if ((long) steps * config.directions() > Message.MAX_PAIRS) {
                throw new IllegalArgumentException(steps + " steps of " + config.directions()
                        + " directions make more (seed, coefficient) pairs than an update may carry ("
                        + Message.MAX_PAIRS + ")");
            }
        } catch (IllegalArgumentException e) {
            throw new DeviceException("task " + task.taskId + " has an unusable hyperparameter: " + e.getMessage());
        }
        if (budget != null) {  // a task may ask for more directions per step than the device planned for
            try {
                MemoryPlan.plan(manifest, budget, numExamples, config.directions(), config.adapterCopies(), runtimeBytes);
            } catch (BudgetException e) {
                throw new DeviceException(e.getMessage());
            }
        }
        float[] reference = task.reference.length == 0 ? null
                : Manifest.Float32.fromBytes(task.reference, manifest.adapterDim, "the reference");
        // A different slice of the shard every round.
        int start = (int) ((task.round * steps) % batches.size());
        List<Batch> rotated = new ArrayList<>(batches.subList(start, batches.size()));
        rotated.addAll(batches.subList(0, start));
        List<Batch> probe = rotated.subList(0, Math.min(LOSS_PROBE_BATCHES, rotated.size()));
        BudgetGuard memory = new BudgetGuard(budget, peakRss);
        StepGuard guard = () -> {
            memory.afterStep();
            stop.afterStep();
        };
        try {
            double lossBefore = Losses.meanLoss(program, probe, adapter);
            SeedSource seeds = seedFactory.forTask(task.round, wave);
            if (pool != null) {  // FedKSeed: every direction one of the job's pool
                seeds = new SeedPool(pool, seeds);
            }
            Optimizer optimizer = config.optimizer(program, adapter, seeds, reference);
            LocalRun run = optimizer.train(rotated, steps, guard);
            double lossAfter = Losses.meanLoss(program, probe, run.applyTo(adapter, config.kind(), config.block(), config.scales()));
            memory.check();  // the probe evaluations count too
            return new Message.Update(task.taskId, task.jobId, task.round, task.globalVersion, run.seeds(), run.coefs(),
                    run.scale(), new byte[0], numExamples, lossBefore, lossAfter, Math.max(0, peakRss.getAsLong()));
        } catch (BudgetException e) {
            throw new DeviceException(e.getMessage());
        }
    }

    private static boolean allFinite(float[] v) {
        for (float x : v) {
            if (!Float.isFinite(x)) {
                return false;
            }
        }
        return true;
    }

    private static String prefix(String hash) {
        return hash.substring(0, Math.min(12, hash.length()));
    }

    static String sha256Hex(byte[] bytes) {
        try {
            StringBuilder hex = new StringBuilder();
            for (byte b : MessageDigest.getInstance("SHA-256").digest(bytes)) {
                hex.append(String.format("%02x", b));
            }
            return hex.toString();
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException("every Java platform has SHA-256", e);
        }
    }
}
