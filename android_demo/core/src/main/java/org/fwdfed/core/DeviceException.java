package org.fwdfed.core;

/** The device cannot go on; the message is meant for the user (shown on the app's screen). */
public final class DeviceException extends Exception {
    private static final long serialVersionUID = 1L;

    public DeviceException(String message) {
        super(message);
    }
}
