package org.fwdfed.core;

import java.io.DataInputStream;
import java.io.File;
import java.io.FileInputStream;
import java.io.IOException;

/**
 * What a {@link ProgramProbe} runs: the program's `forward` once on inputs of the manifest's shapes, as
 * runtime/isolation.py's `exercise` does for the Python device: token ids 0, a full attention mask, labels
 * 0 ([B][L], or [B][1] for a classifier), and the bundle's initial adapter P times ([P][d], P the
 * manifest's max_perturbations): the largest call the device's tasks make.
 *
 * <p>Plain fields (paths as strings, java.io only), so that the app can hand them to its probe process
 * and build them again there: API 23's android.jar has no java.nio.file.
 */
public final class ProbeInputs {
    public final String programPath;
    public final String initialAdapterPath;
    public final int batchSize;
    public final int seqLen;
    public final int maxPerturbations;
    public final int adapterDim;
    public final boolean labelsPerExample;  // a classifier: labels [B][1]

    public ProbeInputs(String programPath, String initialAdapterPath, int batchSize, int seqLen,
                       int maxPerturbations, int adapterDim, boolean labelsPerExample) {
        this.programPath = programPath;
        this.initialAdapterPath = initialAdapterPath;
        this.batchSize = batchSize;
        this.seqLen = seqLen;
        this.maxPerturbations = maxPerturbations;
        this.adapterDim = adapterDim;
        this.labelsPerExample = labelsPerExample;
    }

    public static ProbeInputs of(Manifest m) {
        return new ProbeInputs(m.programPath().toString(), m.folder.resolve(m.initialAdapterFile).toString(),
                m.batchSize, m.seqLen, m.maxPerturbations, m.adapterDim, Manifest.SEQ_CLS.equals(m.task));
    }

    public int[][] ids() {
        return new int[batchSize][seqLen];
    }

    public int[][] mask() {
        int[][] mask = new int[batchSize][seqLen];
        for (int[] row : mask) {
            java.util.Arrays.fill(row, 1);
        }
        return mask;
    }

    public int[][] labels() {
        return new int[batchSize][labelsPerExample ? 1 : seqLen];
    }

    /** The initial adapter, P times; IOException when its file cannot be read or has another size. */
    public float[][] adapters() throws IOException {
        File file = new File(initialAdapterPath);
        if (file.length() != 4L * adapterDim) {
            throw new IOException("the bundle's initial adapter " + file + " holds " + file.length()
                    + " bytes; an adapter of dimension " + adapterDim + " needs " + 4L * adapterDim);
        }
        byte[] raw = new byte[4 * adapterDim];
        try (DataInputStream in = new DataInputStream(new FileInputStream(file))) {
            in.readFully(raw);
        }
        float[] adapter = Manifest.Float32.fromBytes(raw, adapterDim, initialAdapterPath);
        float[][] out = new float[maxPerturbations][];
        for (int i = 0; i < maxPerturbations; i++) {
            out[i] = adapter.clone();
        }
        return out;
    }

    /** One call of the program on these inputs, in this process: what a probe's process does. */
    public float[][] runOnce(LossProgram program) throws IOException {
        float[][] losses = program.loss(ids(), mask(), labels(), adapters());
        if (losses.length != maxPerturbations || losses[0].length != batchSize) {
            throw new ProgramException("the program returned losses of shape [" + losses.length + ", "
                    + losses[0].length + "] for [" + maxPerturbations + ", " + batchSize + "]");
        }
        return losses;
    }
}
