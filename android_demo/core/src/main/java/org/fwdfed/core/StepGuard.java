package org.fwdfed.core;

/** Called after every local step: the memory budget and the user's "stop" are checked here. */
public interface StepGuard {
    void afterStep();

    StepGuard NONE = () -> { };
}
