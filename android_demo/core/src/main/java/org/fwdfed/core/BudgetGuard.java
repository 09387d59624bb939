package org.fwdfed.core;

import java.util.function.LongSupplier;

/**
 * The budget enforced while training (device_sdk/budget.py): after every step the kernel's
 * high-water mark (VmHWM) is read; the first step whose peak passed the budget stops the
 * device with an error. A check after the step cannot stop the allocation that passed it; the
 * plan is what keeps steps under.
 */
public final class BudgetGuard implements StepGuard {
    private final Long budget;
    private final LongSupplier peak;
    private int steps;

    public BudgetGuard(Long budget) {
        this(budget, ProcStatus::peakRss);
    }

    /** `peak`: where the peak is read (tests give their own). */
    public BudgetGuard(Long budget, LongSupplier peak) {
        this.budget = budget;
        this.peak = peak;
    }

    @Override
    public void afterStep() {
        steps++;
        if (budget != null) {
            long p = peak.getAsLong();
            if (p > budget) {
                throw new BudgetException("peak memory " + MemorySize.format(p) + " passed the "
                        + MemorySize.format(budget) + " budget at training step " + steps + ": stopping");
            }
        }
    }

    /** The check outside the steps (the probe evaluations count too). */
    public void check() {
        if (budget != null && peak.getAsLong() > budget) {
            throw new BudgetException("peak memory " + MemorySize.format(peak.getAsLong()) + " passed the "
                    + MemorySize.format(budget) + " budget: stopping");
        }
    }
}
