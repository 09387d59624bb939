package org.fwdfed.core;

import java.math.BigInteger;
import java.util.Map;
import java.util.regex.Pattern;

/**
 * Reading a task's hyperparameters as the Python device does (fwdfed/methods/estimate.py's
 * `hparam`): a value is converted with Python's int(), float() or str() rules, so the same
 * task is accepted or refused by both devices. IllegalArgumentException says why.
 */
public final class Hparams {
    // Python's float() of a string: decimal or exponent forms, inf/infinity/nan, an optional sign, spaces around.
    private static final Pattern PY_FLOAT = Pattern.compile(
            "\\s*[+-]?((\\d(_?\\d)*)?\\.?\\d(_?\\d)*([eE][+-]?\\d(_?\\d)*)?|\\d(_?\\d)*\\.|inf|infinity|nan)\\s*",
            Pattern.CASE_INSENSITIVE);
    private static final Pattern PY_INT = Pattern.compile("\\s*[+-]?\\d(_?\\d)*\\s*");

    private final Map<String, Object> values;

    public Hparams(Map<String, Object> values) {
        this.values = values;
    }

    public boolean has(String name) {
        return values.containsKey(name);
    }

    private Object required(String name) {
        if (!values.containsKey(name)) {
            throw new IllegalArgumentException(name + " is missing");
        }
        return values.get(name);
    }

    /** int(hparams[name]); `fallback` when absent (null: required). */
    public long integer(String name, Long fallback) {
        if (!values.containsKey(name) && fallback != null) {
            return fallback;
        }
        Object v = required(name);
        String bad = name + " must be an integer, got " + v;
        if (v instanceof Long) {
            return (Long) v;
        }
        if (v instanceof BigInteger) {  // a valid Python int, past anything a range check allows
            return ((BigInteger) v).signum() > 0 ? Long.MAX_VALUE : Long.MIN_VALUE;
        }
        if (v instanceof Double) {  // int(2.7) == 2; int(inf) and int(nan) raise
            double d = (Double) v;
            if (!Double.isFinite(d)) {
                throw new IllegalArgumentException(bad);
            }
            return d >= 0 ? (long) Math.floor(d) : (long) Math.ceil(d);
        }
        if (v instanceof String && PY_INT.matcher((String) v).matches()) {
            try {
                return Long.parseLong(((String) v).trim().replace("_", ""));
            } catch (NumberFormatException tooBig) {
                return ((String) v).trim().startsWith("-") ? Long.MIN_VALUE : Long.MAX_VALUE;
            }
        }
        throw new IllegalArgumentException(bad);
    }

    /** float(hparams[name]); `fallback` when absent (null: required). */
    public double number(String name, Double fallback) {
        if (!values.containsKey(name) && fallback != null) {
            return fallback;
        }
        Object v = required(name);
        if (v instanceof Long || v instanceof Double || v instanceof BigInteger) {
            return Codec.asDouble(v);
        }
        if (v instanceof String && PY_FLOAT.matcher((String) v).matches()) {
            String s = ((String) v).trim().toLowerCase().replace("_", "");
            String unsigned = s.replaceFirst("^[+-]", "");
            boolean negative = s.startsWith("-");
            if (unsigned.equals("inf") || unsigned.equals("infinity")) {
                return negative ? Double.NEGATIVE_INFINITY : Double.POSITIVE_INFINITY;
            }
            if (unsigned.equals("nan")) {
                return Double.NaN;
            }
            return Double.parseDouble(s);
        }
        throw new IllegalArgumentException(name + " must be a number, got " + v);
    }

    /** hparams[name] as the codec decoded it (Long, Double, BigInteger, String), or null when absent. */
    public Object raw(String name) {
        return values.get(name);
    }

    /** str(hparams[name]); `fallback` when absent (null: required). */
    public String text(String name, String fallback) {
        if (!values.containsKey(name) && fallback != null) {
            return fallback;
        }
        return String.valueOf(required(name));
    }

    // ---- the checks every method shares (estimate.py) ----

    public static final int MAX_LOCAL_STEPS = 100_000;
    public static final int MAX_DIRECTIONS = 4096;
    public static final int MAX_CANDIDATES = 64;

    /** A learning rate or step size: finite and > 0. */
    public static void checkPositive(String name, double value) {
        if (!(Double.isFinite(value) && value > 0)) {
            throw new IllegalArgumentException(name + " must be a finite number > 0, got " + value);
        }
    }

    public static int checkCount(String name, long value, int limit) {
        if (!(1 <= value && value <= limit)) {
            throw new IllegalArgumentException(name + " must be between 1 and " + limit + ", got " + value);
        }
        return (int) value;
    }

    public static void checkKind(String kind) {
        if (!Directions.RADEMACHER.equals(kind) && !Directions.GAUSSIAN.equals(kind)) {
            throw new IllegalArgumentException("unknown direction kind '" + kind + "'; expected one of rademacher, gaussian");
        }
    }

    /** The local steps a task asks for (batches, for the forward gradient). */
    public int localSteps() {
        return checkCount("local_steps", integer("local_steps", null), MAX_LOCAL_STEPS);
    }

    /** The adapter block of a block-cyclic round, or null; its end is checked against d by the device. */
    public Block block() {
        if (!has("block_start")) {
            return null;
        }
        long start = integer("block_start", null);
        long end = integer("block_end", null);
        if (!(0 <= start && start < end)) {
            throw new IllegalArgumentException("the adapter block must have 0 <= block_start < block_end, got ["
                    + start + ", " + end + ")");
        }
        if (end > Integer.MAX_VALUE) {  // past any adapter a device holds; the device says so
            return new Block((int) Math.min(start, Integer.MAX_VALUE - 1), Integer.MAX_VALUE);
        }
        return new Block((int) start, (int) end);
    }
}
