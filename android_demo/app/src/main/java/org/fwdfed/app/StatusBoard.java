package org.fwdfed.app;

import android.content.Context;
import android.content.SharedPreferences;

import java.util.Locale;

import org.fwdfed.core.DeviceStatus;
import org.fwdfed.core.MemorySize;

/**
 * What the job tells the screen, kept in the app's private preferences: the job and the screen
 * run in one process, the screen is told of each change (OnSharedPreferenceChangeListener, on
 * its main thread), and the last status is still there when the screen is opened again.
 */
final class StatusBoard {
    static final String NAME = "status";
    private static final String STATE = "state";
    private static final String ROUND = "round";
    private static final String LOSS_BEFORE = "loss_before";  // doubles kept as their bits
    private static final String LOSS_AFTER = "loss_after";
    private static final String PEAK = "peak";
    private static final String SENT = "sent";
    private static final String RECEIVED = "received";
    private static final String ACCEPTED = "accepted";
    private static final String MESSAGE = "message";

    private StatusBoard() {}

    static SharedPreferences of(Context context) {
        return context.getSharedPreferences(NAME, Context.MODE_PRIVATE);
    }

    static void publish(Context context, DeviceStatus s) {
        of(context).edit()
                .putString(STATE, s.state.name().toLowerCase(Locale.ROOT))
                .putLong(ROUND, s.round)
                .putLong(LOSS_BEFORE, Double.doubleToRawLongBits(s.lossBefore))
                .putLong(LOSS_AFTER, Double.doubleToRawLongBits(s.lossAfter))
                .putLong(PEAK, s.peakRssBytes)
                .putLong(SENT, s.bytesSent)
                .putLong(RECEIVED, s.bytesReceived)
                .putInt(ACCEPTED, s.updatesAccepted)
                .putString(MESSAGE, s.message)
                .apply();
    }

    /** Before the job first runs: it waits for the constraints. */
    static void waiting(Context context, String why) {
        of(context).edit().clear().putString(STATE, why).apply();
    }

    /** The lines the screen shows, in the order of its text views: state, round, loss, memory, traffic, message. */
    static String[] lines(SharedPreferences p) {
        String state = p.getString(STATE, null);
        if (state == null || !p.contains(ROUND)) {
            return new String[] {state == null ? "" : state, "", "", "", "", ""};
        }
        return new String[] {
            state + " (" + p.getInt(ACCEPTED, 0) + " updates accepted)",
            "round " + p.getLong(ROUND, 0),
            String.format(Locale.ROOT, "local loss %.4f -> %.4f", Double.longBitsToDouble(p.getLong(LOSS_BEFORE, 0)),
                    Double.longBitsToDouble(p.getLong(LOSS_AFTER, 0))),
            "peak memory " + MemorySize.format(p.getLong(PEAK, 0)),
            String.format(Locale.ROOT, "sent %,d B, received %,d B", p.getLong(SENT, 0), p.getLong(RECEIVED, 0)),
            p.getString(MESSAGE, ""),
        };
    }
}
