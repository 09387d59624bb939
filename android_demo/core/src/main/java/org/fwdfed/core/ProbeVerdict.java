package org.fwdfed.core;

/** How a {@link ProgramProbe}'s process ended: it ran the program, refused it with one line, or died. */
public final class ProbeVerdict {
    public enum Outcome { OK, REFUSED, CRASHED }

    public final Outcome outcome;
    /** REFUSED: the one-line refusal (the same words loading it in the device would give); CRASHED: how the
     * process died ("killed by SIGSEGV", "did not finish within 600 s (killed)"); OK: "". */
    public final String detail;
    /** The probe process's peak resident memory in bytes, as it reported it; -1 when it could not say. */
    public final long childPeakRssBytes;

    private ProbeVerdict(Outcome outcome, String detail, long childPeakRssBytes) {
        this.outcome = outcome;
        this.detail = detail;
        this.childPeakRssBytes = childPeakRssBytes;
    }

    public static ProbeVerdict ok(long childPeakRssBytes) {
        return new ProbeVerdict(Outcome.OK, "", childPeakRssBytes);
    }

    public static ProbeVerdict refused(String line, long childPeakRssBytes) {
        return new ProbeVerdict(Outcome.REFUSED, line, childPeakRssBytes);
    }

    public static ProbeVerdict crashed(String how) {
        return new ProbeVerdict(Outcome.CRASHED, how, -1);
    }

    @Override
    public String toString() {
        return outcome.name().toLowerCase(java.util.Locale.ROOT) + (detail.isEmpty() ? "" : " " + detail);
    }
}
