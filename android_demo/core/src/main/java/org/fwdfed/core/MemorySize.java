package org.fwdfed.core;

import java.util.Locale;
import java.util.Map;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/** Memory budgets as people write them (fwdfed/memory.py): 1.5GB, 1500MB, 800MiB, or bytes. */
public final class MemorySize {
    private static final Map<String, Long> UNITS = Map.of("", 1L, "B", 1L, "KB", 1000L, "MB", 1000_000L,
            "GB", 1000_000_000L, "TB", 1000_000_000_000L, "KIB", 1L << 10, "MIB", 1L << 20, "GIB", 1L << 30,
            "TIB", 1L << 40);
    private static final Pattern SIZE = Pattern.compile("^\\s*(\\d+(?:\\.\\d+)?)\\s*([A-Za-z]*)\\s*$");

    private MemorySize() {}

    public static long parse(String text) {
        Matcher m = SIZE.matcher(text);
        String unit = m.matches() ? m.group(2).toUpperCase(Locale.ROOT) : null;
        if (unit == null || !UNITS.containsKey(unit)) {
            throw new IllegalArgumentException("cannot read memory size '" + text
                    + "': use a number with a unit such as 1.5GB, 1500MB or 800MiB");
        }
        long size = (long) (Double.parseDouble(m.group(1)) * UNITS.get(unit));
        if (size <= 0) {
            throw new IllegalArgumentException("memory size '" + text + "' must be positive");
        }
        return size;
    }

    public static String format(long n) {
        return n < (1L << 30) ? String.format(Locale.ROOT, "%.0f MiB", n / (double) (1L << 20))
                : String.format(Locale.ROOT, "%.2f GiB", n / (double) (1L << 30));
    }
}
