package org.fwdfed.core;

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Paths;
import java.util.Arrays;
import java.util.Locale;

/**
 * Test tool: the Java device's probe (HelperProbe) on bundles, in one long-lived JVM that stands for the
 * device (benchmarks/java_isolation.py: the probe's cost, and the corrupted-program fuzz through it).
 *
 *   ProbeCheck --helper "PYTHON loss_helper.py" [--timeout SECONDS]
 *
 * reads bundle folders from stdin, one a line, and for each prints one line: `ok|refused|crashed SECONDS
 * CHILD_PEAK_BYTES DETAIL` (the bundle read as a device without a trust key reads it, sha256 checked, then
 * probed; a bundle refused before the probe is `refused 0 -1 LINE`). At the end of stdin it prints
 * `alive PID PEAK_RSS_BYTES`: the device's process reached the end, and its own peak.
 */
public final class ProbeCheck {
    public static void main(String[] args) throws Exception {
        if (args.length < 2 || !"--helper".equals(args[0])) {
            System.err.println("error: usage: ProbeCheck --helper \"PYTHON loss_helper.py\" [--timeout SECONDS]");
            System.exit(1);
        }
        double timeout = args.length > 3 && "--timeout".equals(args[2]) ? Double.parseDouble(args[3]) : HelperProbe.TIMEOUT_S;
        HelperProbe probe = new HelperProbe(Arrays.asList(args[1].trim().split("\\s+")), timeout);
        BufferedReader lines = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        for (String folder; (folder = lines.readLine()) != null; ) {
            String row;
            try {
                Manifest manifest = Manifest.load(Paths.get(folder));
                manifest.checkProgram();
                long start = System.nanoTime();
                ProbeVerdict verdict = probe.probe(ProbeInputs.of(manifest));
                row = String.format(Locale.ROOT, "%s %.3f %d %s", verdict.outcome.name().toLowerCase(Locale.ROOT),
                        (System.nanoTime() - start) / 1e9, verdict.childPeakRssBytes, verdict.detail);
            } catch (BundleException | DeviceException e) {
                row = "refused 0 -1 " + e.getMessage();
            }
            System.out.println(row.strip());
            System.out.flush();
        }
        System.out.println("alive " + ProcessHandle.current().pid() + " " + ProcStatus.peakRss());
    }
}
