package org.fwdfed.core;

import java.io.File;
import java.io.IOException;
import java.security.PublicKey;
import java.util.List;

/**
 * A device put together from a bundle folder and a file of training text, in the order the
 * Python device (and {@code JvmDevice}) uses: the manifest, the shard (refused when empty), the
 * memory plan (refused, saying what would fit, before the program is opened), the tokenizer and
 * batches, then the program (tried first by a {@link ProgramProbe} in a process of its own, when one is
 * given), then the connection.
 *
 * <p>This is the app's way into the core. Its public signatures use only types that Android has
 * had since its first releases ({@link File}, {@link String}, the core's own classes), because the
 * app is compiled against API 23's android.jar, which lacks the java.nio.file and
 * java.util.function types the rest of the core's signatures use; javac must not meet them.
 */
public final class BundleDevice {
    /** How the device's seeds are keyed when nobody chooses: device_sdk's default --seed. */
    public static final long DEVICE_SEED = 0;

    /** Opens the bundle's program (on a phone, ExecuTorch's Module) once the plan has passed. */
    public interface ProgramOpener {
        LossProgram open(String programPath, int maxPerturbations, boolean labelsPerExample) throws DeviceException;
    }

    private final Manifest manifest;
    private final TaskTrainer trainer;
    private final MemoryPlan plan;
    private final String deviceId;
    private final Long budget;
    private final ProbedProgram probed;  // null: opened without a probe

    private BundleDevice(Manifest manifest, TaskTrainer trainer, MemoryPlan plan, String deviceId, Long budget,
                         ProbedProgram probed) {
        this.manifest = manifest;
        this.probed = probed;
        this.trainer = trainer;
        this.plan = plan;
        this.deviceId = deviceId;
        this.budget = budget;
    }

    /**
     * The whole file is this device's data (shard 0 of 1, data seed 0: docs/data.md still holds
     * out every 10th document). `budget` null: no memory budget. Every failure is a
     * {@link DeviceException} whose message says what to fix.
     */
    public static BundleDevice open(File bundle, File trainingText, String deviceId, Long budget,
                                    ProgramOpener opener) throws DeviceException {
        return open(bundle, trainingText, deviceId, budget, null, opener);
    }

    /**
     * As above, and with `trustKeyPem` (the operator's trust_key.pem; null: bundles unchecked, the unsafe
     * default of docs/security.md) the bundle must be signed by it and intact, checked before anything else
     * of it is read and long before the program is opened.
     */
    public static BundleDevice open(File bundle, File trainingText, String deviceId, Long budget, byte[] trustKeyPem,
                                    ProgramOpener opener) throws DeviceException {
        return open(bundle, trainingText, deviceId, budget, trustKeyPem, null, opener);
    }

    /**
     * As above, and with `probe` (null: the program is opened in this process at once, as before) the program
     * is first run by the probe in a process of its own. A program the probe refuses is this method's
     * DeviceException; one that crashes the probe is not opened: {@link #programUnavailable()} says so, and
     * the device loop declines its tasks and stays up until the bundle is replaced ({@link ProbedProgram}).
     */
    public static BundleDevice open(File bundle, File trainingText, String deviceId, Long budget, byte[] trustKeyPem,
                                    ProgramProbe probe, ProgramOpener opener) throws DeviceException {
        if (deviceId == null || deviceId.isEmpty()) {
            throw new DeviceException("a device id is needed (the one the device was enrolled with)");
        }
        Manifest manifest;
        List<String> texts;
        PublicKey trustKey;
        try {
            trustKey = trustKeyPem == null ? null : BundleSignature.readTrustKey(trustKeyPem, "the trust key");
            manifest = Manifest.load(bundle.toPath(), trustKey);
            texts = TrainingData.shard(trainingText.toPath(), 0, 0, 1);
        } catch (BundleException | TrainingData.DataException e) {
            throw new DeviceException(e.getMessage());
        }
        if (texts.isEmpty()) {
            throw new DeviceException("device " + deviceId + ": " + trainingText + " holds no training example");
        }
        long runtime = ProcStatus.currentRss();
        MemoryPlan plan = null;
        if (budget != null) {
            int directions = manifest.maxPerturbations / 2;
            try {
                plan = MemoryPlan.plan(manifest, budget, texts.size(), directions, 1 + 3 * Math.max(1, directions),
                        runtime);
            } catch (BudgetException e) {
                throw new DeviceException(e.getMessage());
            }
        }
        List<Batch> batches;
        try {
            Tokenizer tokenizer = Tokenizer.load(manifest.tokenizerPath());
            batches = BatchEncoder.encode(tokenizer, texts, null, manifest.task, manifest.batchSize, manifest.seqLen);
        } catch (IOException e) {
            throw new DeviceException("the bundle's tokenizer (" + manifest.tokenizerPath() + "): " + e.getMessage());
        }
        ProbedProgram probed = probe == null ? null : ProbedProgram.open(manifest, trustKey, probe, opener);
        LossProgram program = probed != null ? probed : opener.open(manifest.programPath().toString(),
                manifest.maxPerturbations, Manifest.SEQ_CLS.equals(manifest.task));
        TaskTrainer trainer = new TaskTrainer(manifest, program, batches, texts.size(), budget, runtime,
                (round, wave) -> new SeedStream(DEVICE_SEED, round, wave, deviceId), ProcStatus::peakRss);
        return new BundleDevice(manifest, trainer, plan, deviceId, budget, probed);
    }

    /** Why the program is not loaded (it crashed the probe's process), in one line; null when it is. */
    public String programUnavailable() {
        return probed == null ? null : probed.crashed();
    }

    /** The memory plan the budget was checked against, for people; null without a budget. */
    public String planDescription() {
        return plan == null ? null : plan.describe();
    }

    /** How many training examples the device holds (what its updates count). */
    public long numExamples() {
        return trainer.numExamples();
    }

    /** The device loop for this coordinator; `caPem` null: the system's CAs only. */
    public DeviceClient client(String url, String token, byte[] caPem, long connectTimeoutMs,
                               DeviceStatus.Listener listener) throws DeviceException {
        DeviceClient.Config config = new DeviceClient.Config(url, token, caPem, deviceId, budget, connectTimeoutMs);
        return new DeviceClient(config, manifest, trainer, listener, DeviceClient.FrameRecorder.NONE).program(probed);
    }
}
