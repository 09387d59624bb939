package org.fwdfed.core;

/** A bundle that is missing, corrupt or inconsistent; the message is meant for the user. */
public final class BundleException extends Exception {
    private static final long serialVersionUID = 1L;

    public BundleException(String message) {
        super(message);
    }
}
