package org.fwdfed.app;

import org.fwdfed.core.LossProgram;
import org.fwdfed.core.ProgramException;
import org.pytorch.executorch.EValue;
import org.pytorch.executorch.Module;
import org.pytorch.executorch.Tensor;

/**
 * The bundle's `.pte` through ExecuTorch's Java API: `forward(input_ids, attention_mask, labels,
 * adapters)` with the adapter as the program's input, so one loaded program serves every
 * perturbation of every round. The tensors are the ones the JVM tests hand the same program
 * (tests/android_demo/loss_helper.py): int64 [B, L] ids and mask, int64 labels ([B, L], or [B]
 * for a classifier), float32 [P, d] adapters; the output is the float32 [P, B] per-example loss.
 */
final class ExecuTorchLossProgram implements LossProgram {
    private final Module module;
    private final int maxPerturbations;
    private final boolean labelsPerExample;

    ExecuTorchLossProgram(String ptePath, int maxPerturbations, boolean labelsPerExample) {
        // Memory-mapped: the weights stay file-backed pages the kernel can drop, not anonymous memory.
        this.module = Module.load(ptePath, Module.LOAD_MODE_MMAP);
        this.maxPerturbations = maxPerturbations;
        this.labelsPerExample = labelsPerExample;
    }

    @Override
    public int maxPerturbations() {
        return maxPerturbations;
    }

    @Override
    public float[][] loss(int[][] ids, int[][] mask, int[][] labels, float[][] adapters) {
        int b = ids.length;
        int l = ids[0].length;
        int p = adapters.length;
        int d = adapters[0].length;
        float[] flat = new float[p * d];
        for (int i = 0; i < p; i++) {
            System.arraycopy(adapters[i], 0, flat, i * d, d);
        }
        Tensor labelTensor = labelsPerExample
                ? Tensor.fromBlob(column(labels), new long[] {b})
                : Tensor.fromBlob(widen(labels), new long[] {b, l});
        EValue[] out;
        try {
            out = module.forward(
                    EValue.from(Tensor.fromBlob(widen(ids), new long[] {b, l})),
                    EValue.from(Tensor.fromBlob(widen(mask), new long[] {b, l})),
                    EValue.from(labelTensor),
                    EValue.from(Tensor.fromBlob(flat, new long[] {p, d})));
        } catch (RuntimeException e) {
            throw new ProgramException("the ExecuTorch program's forward failed: " + e.getMessage(), e);
        }
        float[] losses = out[0].toTensor().getDataAsFloatArray();
        if (losses.length != p * b) {
            throw new ProgramException("the program returned " + losses.length + " losses for " + p + " x " + b);
        }
        float[][] result = new float[p][b];
        for (int i = 0; i < p; i++) {
            System.arraycopy(losses, i * b, result[i], 0, b);
        }
        return result;
    }

    /** int32 token ids as the program's int64. */
    private static long[] widen(int[][] rows) {
        long[] out = new long[rows.length * rows[0].length];
        int k = 0;
        for (int[] row : rows) {
            for (int v : row) {
                out[k++] = v;
            }
        }
        return out;
    }

    private static long[] column(int[][] rows) {
        long[] out = new long[rows.length];
        for (int i = 0; i < rows.length; i++) {
            out[i] = rows[i][0];
        }
        return out;
    }

    void close() {
        module.destroy();
    }
}
