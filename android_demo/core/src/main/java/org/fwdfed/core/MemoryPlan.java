package org.fwdfed.core;

import java.util.ArrayList;
import java.util.List;

/**
 * What a training step holds, added up from the manifest before anything is loaded
 * (fwdfed/memory_plan.py): the runtime as measured now, the program's weights, its planned
 * activation arena, what the backend holds beyond the plan (measured at export), the adapter
 * copies the method needs, and the tokenized data. Over the budget, the device refuses with
 * the sum and what would fit.
 */
public final class MemoryPlan {
    public final long budget;
    public final long runtime;
    public final long weights;
    public final long activations;
    public final long workspace;
    public final long adapters;
    public final long data;
    public final int directions;

    private MemoryPlan(long budget, long runtime, long weights, long activations, long workspace, long adapters,
                       long data, int directions) {
        this.budget = budget;
        this.runtime = runtime;
        this.weights = weights;
        this.activations = activations;
        this.workspace = workspace;
        this.adapters = adapters;
        this.data = data;
        this.directions = directions;
    }

    public long total() {
        return runtime + weights + activations + workspace + adapters + data;
    }

    public String describe() {
        return "memory plan: runtime " + MemorySize.format(runtime) + ", weights " + MemorySize.format(weights)
                + ", activations " + MemorySize.format(activations) + ", backend beyond the plan "
                + MemorySize.format(workspace) + ", adapters " + MemorySize.format(adapters) + ", data "
                + MemorySize.format(data) + " = " + MemorySize.format(total()) + " of the " + MemorySize.format(budget)
                + " budget (" + directions + " direction(s) per step)";
    }

    /**
     * The plan for a step of `adapterCopies` adapter vectors, or BudgetException.
     * `runtime`: the process's resident memory before the program is loaded (on a phone, the
     * app's own; measured with {@link ProcStatus#currentRss()}).
     */
    public static MemoryPlan plan(Manifest m, long budget, long numExamples, int directions, int adapterCopies,
                                  long runtime) {
        MemoryPlan plan = new MemoryPlan(budget, runtime, m.programBytes, m.plannedMemoryBytes, m.workspaceBytes,
                (long) adapterCopies * m.adapterDim * 4, numExamples * m.seqLen * 8 * 3, Math.max(1, directions));
        if (plan.total() > budget) {
            long over = plan.total() - budget;
            List<String> hints = new ArrayList<>(List.of("a smaller base model", "a lower LoRA rank",
                    "a smaller --batch-size or --seq-len at export", "a quantized export"));
            if (plan.runtime > budget) {
                hints = List.of("nothing: the runtime alone needs " + MemorySize.format(plan.runtime));
            } else if (plan.runtime + plan.weights > budget) {
                hints = List.of("a smaller or quantized base model: the runtime and weights alone need "
                        + MemorySize.format(plan.runtime + plan.weights));
            }
            throw new BudgetException(plan.describe() + ": " + MemorySize.format(over) + " over. Would fit: "
                    + String.join("; or ", hints));
        }
        return plan;
    }
}
