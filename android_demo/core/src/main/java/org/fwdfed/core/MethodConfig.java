package org.fwdfed.core;

/**
 * A method's settings, read and checked from a task's hyperparameters before anything is
 * allocated (fwdfed/methods/: each method's config dataclass), and the optimizer they make.
 */
public interface MethodConfig {
    /** Directions per step: what the memory plan and the pair limit count. */
    int directions();

    String kind();

    /** The adapter slice perturbed, or null for all of it. */
    Block block();

    /** The per-tensor scales of the directions, or null. */
    TensorScales scales();

    /** Adapter-sized float vectors a step holds (the memory plan): fwdfed/methods/base.py's adapter_copies. */
    int adapterCopies();

    Optimizer optimizer(LossProgram program, float[] adapter, SeedSource seeds, float[] reference);
}
