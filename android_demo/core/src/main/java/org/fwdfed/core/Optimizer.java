package org.fwdfed.core;

import java.util.List;

/** A forward-only training method's local run: `steps` steps cycling over `batches`. */
public interface Optimizer {
    LocalRun train(List<Batch> batches, int steps, StepGuard guard);
}
