package org.fwdfed.core;

/** What the app's screen shows: a snapshot of the device, taken whenever something changed. */
public final class DeviceStatus {
    public enum State { CONNECTING, CONNECTED, TRAINING, DONE, STOPPED, FAILED }

    public final State state;
    public final long round;  // of the last task, 0 before the first
    public final double lossBefore;  // of the last task (NaN before the first)
    public final double lossAfter;
    public final long peakRssBytes;
    public final long bytesSent;
    public final long bytesReceived;
    public final int updatesAccepted;
    public final String message;  // the last error or news, for people

    public DeviceStatus(State state, long round, double lossBefore, double lossAfter, long peakRssBytes,
                        long bytesSent, long bytesReceived, int updatesAccepted, String message) {
        this.state = state;
        this.round = round;
        this.lossBefore = lossBefore;
        this.lossAfter = lossAfter;
        this.peakRssBytes = peakRssBytes;
        this.bytesSent = bytesSent;
        this.bytesReceived = bytesReceived;
        this.updatesAccepted = updatesAccepted;
        this.message = message;
    }

    /** Told every change of the device's status (on the device loop's thread). */
    public interface Listener {
        void onStatus(DeviceStatus status);

        Listener NONE = status -> { };
    }
}
