package org.fwdfed.core;

/** A frame that does not follow docs/protocol.md; the message says which rule it broke. */
public final class ProtocolException extends Exception {
    private static final long serialVersionUID = 1L;

    public ProtocolException(String message) {
        super(message);
    }
}
