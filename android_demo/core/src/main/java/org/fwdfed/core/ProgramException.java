package org.fwdfed.core;

/** The program could not be loaded or run (a corrupt `.pte`, a runtime error, a helper that died). */
public final class ProgramException extends RuntimeException {
    private static final long serialVersionUID = 1L;

    public ProgramException(String message) {
        super(message);
    }

    public ProgramException(String message, Throwable cause) {
        super(message, cause);
    }
}
