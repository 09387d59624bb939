package org.fwdfed.core;

/**
 * This task cannot run because the program crashed the process that tried it (and the bundle on disk is
 * still not one the device can load): the device declines the task and stays up. The message is the
 * decline's reason.
 */
public final class ProgramUnavailable extends Exception {
    private static final long serialVersionUID = 1L;

    public ProgramUnavailable(String message) {
        super(message);
    }
}
