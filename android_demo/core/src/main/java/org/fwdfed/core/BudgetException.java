package org.fwdfed.core;

/** The memory budget cannot be kept; the message says by how much and what would fit. */
public final class BudgetException extends RuntimeException {
    private static final long serialVersionUID = 1L;

    public BudgetException(String message) {
        super(message);
    }
}
