package org.fwdfed.core;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;

/**
 * The process's resident memory as the kernel counts it (/proc/self/status): VmHWM, the peak,
 * counts native allocations (ExecuTorch's arena, the weights) that no Java API sees. Android
 * is Linux: the same file exists in an app's process.
 */
public final class ProcStatus {
    private ProcStatus() {}

    /** The field's value in bytes (the file says kB); -1 where /proc is not readable. */
    public static long field(String name) {
        try {
            for (String line : Files.readAllLines(Paths.get("/proc/self/status"), StandardCharsets.US_ASCII)) {
                if (line.startsWith(name + ":")) {
                    return Long.parseLong(line.substring(name.length() + 1).trim().split("\\s+")[0]) * 1024;
                }
            }
        } catch (IOException | NumberFormatException e) {
            return -1;
        }
        return -1;
    }

    /** The process's peak resident memory so far (VmHWM). */
    public static long peakRss() {
        return field("VmHWM");
    }

    public static long currentRss() {
        return field("VmRSS");
    }
}
