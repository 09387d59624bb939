package org.fwdfed.core;

import java.io.IOException;
import java.io.OutputStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;

/**
 * For tests: the {@link ProgramProbe} of the Java device on the JVM. A child process
 * (tests/android_demo/loss_helper.py --probe PROGRAM, the runtime the tests' {@link PipeLossProgram}
 * runs) gets one request of {@link ProbeInputs}, loads the program, runs `forward` once and writes one
 * line, `ok PEAK` or `error PEAK LINE`, then exits 0. Anything else is a crash: killed by a signal (the
 * JVM reports 128 + the signal's number), another exit status, or no line; a child still running after
 * the timeout is killed and counts as one that hung the runtime (runtime/isolation.py's verdicts).
 */
public final class HelperProbe implements ProgramProbe {
    public static final double TIMEOUT_S = 600;  // one call of forward; as runtime/isolation.py's CHECK_TIMEOUT_S
    private static final Map<Integer, String> SIGNALS = Map.of(4, "SIGILL", 6, "SIGABRT", 7, "SIGBUS", 8, "SIGFPE",
            9, "SIGKILL", 11, "SIGSEGV", 15, "SIGTERM");

    private final List<String> command;
    private final double timeoutS;

    /** `command`: the helper's command line (`PYTHON loss_helper.py`); `--probe PROGRAM` is added to it. */
    public HelperProbe(List<String> command, double timeoutS) {
        this.command = new ArrayList<>(command);
        this.timeoutS = timeoutS;
    }

    @Override
    public ProbeVerdict probe(ProbeInputs inputs) throws DeviceException {
        byte[] request;
        try {
            request = PipeLossProgram.request(inputs.ids(), inputs.mask(), inputs.labels(), inputs.adapters(),
                    inputs.labelsPerExample);
        } catch (IOException e) {
            throw new DeviceException(e.getMessage());
        }
        List<String> argv = new ArrayList<>(command);
        argv.add("--probe");
        argv.add(inputs.programPath);
        Process child;
        try {
            child = new ProcessBuilder(argv).redirectError(ProcessBuilder.Redirect.INHERIT).start();
        } catch (IOException e) {
            throw new DeviceException("cannot start the program's probe (" + String.join(" ", argv) + "): "
                    + e.getMessage());
        }
        try (OutputStream in = child.getOutputStream()) {
            in.write(request);
        } catch (IOException e) {
            // It died before it read the request: its exit says how.
        }
        try {
            if (!child.waitFor((long) (timeoutS * 1000), TimeUnit.MILLISECONDS)) {
                child.destroyForcibly().waitFor();
                return ProbeVerdict.crashed("did not finish within " + (timeoutS == Math.rint(timeoutS)
                        ? String.valueOf((long) timeoutS) : String.valueOf(timeoutS)) + " s (killed)");
            }
            String out = new String(child.getInputStream().readAllBytes(), StandardCharsets.UTF_8);
            return verdict(child.exitValue(), out);
        } catch (InterruptedException e) {
            child.destroyForcibly();
            Thread.currentThread().interrupt();
            throw new DeviceException("interrupted while the program's probe ran");
        } catch (IOException e) {
            throw new DeviceException("cannot read the program's probe: " + e.getMessage());
        }
    }

    /** The verdict of a child that exited with `status` having written `out`. */
    static ProbeVerdict verdict(int status, String out) {
        if (status > 128) {
            return ProbeVerdict.crashed("killed by " + SIGNALS.getOrDefault(status - 128, "signal " + (status - 128)));
        }
        String[] words = out.strip().split(" ", 3);
        if (status != 0 || words.length < 2 || !words[1].matches("[0-9]{1,18}")
                || !("ok".equals(words[0]) || "error".equals(words[0]) && words.length == 3)) {
            return ProbeVerdict.crashed("exited with status " + status + " before its verdict");
        }
        long peak = Long.parseLong(words[1]);
        return "ok".equals(words[0]) ? ProbeVerdict.ok(peak) : ProbeVerdict.refused(words[2], peak);
    }
}
