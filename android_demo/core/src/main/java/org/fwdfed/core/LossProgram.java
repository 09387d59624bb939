package org.fwdfed.core;

/**
 * The exported program's `forward` method: the per-example loss of one batch under each of P
 * adapter vectors, in one call. On a phone it is ExecuTorch's `Module.forward` (see
 * android_demo/app); in the tests here, the same `.pte` run by ExecuTorch in a helper process.
 *
 * Inputs as the program takes them: input_ids and attention_mask [B][L] (int64 in the
 * program), labels [B][L] or [B][1] (int64), adapters [P][d] (float32), P at most
 * {@link #maxPerturbations()}. Output: losses [P][B].
 */
public interface LossProgram {
    float[][] loss(int[][] ids, int[][] mask, int[][] labels, float[][] adapters);

    /** The largest P one call takes (the manifest's inputs.max_perturbations). */
    int maxPerturbations();
}
