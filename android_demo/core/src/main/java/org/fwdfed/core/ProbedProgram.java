package org.fwdfed.core;

import java.nio.file.Path;
import java.security.PublicKey;
import java.util.Objects;

/**
 * The device's program, opened only after a {@link ProgramProbe} ran it in a process of its own without
 * crashing (device_sdk/program.py's DeviceProgram, for the Java device; docs/security.md, Isolated loading).
 *
 * <ul>
 * <li>The probe's `ok`: the program is opened here, through the app's opener, once the probe's process
 *     has let it go.
 * <li>A refusal (the runtime's error, in one line): {@link #open} throws it, and the device stops before
 *     it connects, as it always did for a program it cannot load.
 * <li>A crash (the probe's process killed by a signal, or gone without a verdict): nothing is opened. The
 *     device stays up, connects and declines each task ({@link #ready} throws {@link ProgramUnavailable}
 *     with the decline's reason). Before each task it reads the bundle from disk again (its signature with
 *     the trust key, when it has one, and the program's sha256) and probes it again: a bundle the operator
 *     replaced is then opened and the task trained; one that no longer takes the model, adapter, inputs or
 *     classes this device set up for is declined with "restart the device".
 * </ul>
 */
public final class ProbedProgram implements LossProgram {
    private final Path folder;
    private final PublicKey trustKey;  // null: bundles unchecked
    private final ProgramProbe probe;
    private final BundleDevice.ProgramOpener opener;
    private Manifest manifest;  // the bundle this device set up for (its shapes), or the replacement that took
    private LossProgram program;  // null while the program crashes the probe
    private String crashed;  // the last probe's crash, as the device says it; null once opened
    private ProbeVerdict lastVerdict;
    private double lastProbeSeconds;

    private ProbedProgram(Manifest manifest, PublicKey trustKey, ProgramProbe probe, BundleDevice.ProgramOpener opener) {
        this.folder = manifest.folder;
        this.manifest = manifest;
        this.trustKey = trustKey;
        this.probe = probe;
        this.opener = opener;
    }

    /**
     * The program of `manifest` (read with `trustKey`, null for none), probed first. DeviceException: the
     * program does not match its sha256, the probe refused it (its line), the opener failed, or the probe
     * could not run. A crash is not an exception: {@link #crashed()} says it and tasks are declined.
     */
    public static ProbedProgram open(Manifest manifest, PublicKey trustKey, ProgramProbe probe,
                                     BundleDevice.ProgramOpener opener) throws DeviceException {
        ProbedProgram p = new ProbedProgram(manifest, trustKey, Objects.requireNonNull(probe), opener);
        try {
            manifest.checkProgram();
        } catch (BundleException e) {
            throw new DeviceException(e.getMessage());
        }
        p.load();
        return p;
    }

    /** Why the program is not loaded: the probe's crash, in the device's words; null once it is loaded. */
    public String crashed() {
        return crashed;
    }

    /** The last probe's verdict and how long it took (fork to verdict), for the device's log and its cost. */
    public ProbeVerdict lastVerdict() {
        return lastVerdict;
    }

    public double lastProbeSeconds() {
        return lastProbeSeconds;
    }

    /**
     * Nothing when the program is loaded. After a crash: the bundle read and checked again, probed again,
     * and opened if the probe ran it; otherwise ProgramUnavailable with the line to decline `taskId` with.
     */
    public void ready(String taskId) throws ProgramUnavailable {
        if (program != null) {
            return;
        }
        Manifest fresh;
        try {
            fresh = Manifest.load(folder, trustKey);
            fresh.checkProgram();
        } catch (BundleException e) {
            throw new ProgramUnavailable("task " + taskId + ": " + e.getMessage());
        }
        if (!sameShapes(manifest, fresh)) {
            throw new ProgramUnavailable("task " + taskId + ": the bundle " + folder + " was replaced by one of other "
                    + "shapes (model, adapter, inputs or classes) than this device set up for: restart the device");
        }
        manifest = fresh;
        try {
            load();
        } catch (DeviceException e) {
            throw new ProgramUnavailable("task " + taskId + ": " + e.getMessage());
        }
        if (program == null) {
            throw new ProgramUnavailable("task " + taskId + ": " + crashed);
        }
    }

    /** Whether `b` takes what the device prepared for `a`: its hello (model, adapter) and its shard's batches. */
    static boolean sameShapes(Manifest a, Manifest b) {
        return a.baseModelHash.equals(b.baseModelHash) && a.adapterDim == b.adapterDim && a.task.equals(b.task)
                && a.batchSize == b.batchSize && a.seqLen == b.seqLen && a.maxPerturbations == b.maxPerturbations
                && Objects.equals(a.numLabels, b.numLabels);
    }

    private void load() throws DeviceException {
        long start = System.nanoTime();
        ProbeVerdict verdict = probe.probe(ProbeInputs.of(manifest));
        lastProbeSeconds = (System.nanoTime() - start) / 1e9;
        lastVerdict = verdict;
        switch (verdict.outcome) {
            case REFUSED:
                throw new DeviceException(verdict.detail);
            case CRASHED:
                crashed = "the program " + manifest.programPath() + " crashed the ExecuTorch runtime in the child "
                        + "process that tried it (" + verdict.detail + "): not loaded";
                return;
            default:
                program = opener.open(manifest.programPath().toString(), manifest.maxPerturbations,
                        Manifest.SEQ_CLS.equals(manifest.task));
                crashed = null;
        }
    }

    @Override
    public float[][] loss(int[][] ids, int[][] mask, int[][] labels, float[][] adapters) {
        if (program == null) {  // the device loop declines tasks before training while this holds
            throw new ProgramException(crashed);
        }
        return program.loss(ids, mask, labels, adapters);
    }

    @Override
    public int maxPerturbations() {
        return manifest.maxPerturbations;
    }
}
