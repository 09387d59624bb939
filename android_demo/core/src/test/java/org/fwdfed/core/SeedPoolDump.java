package org.fwdfed.core;

/**
 * Prints, as JSON, pool[0..7] of each key given (16 hex digits, as a task carries it), computed by the
 * Java implementation; tests/android_demo/test_java_core.py compares them with docs/golden/directions.json.
 */
public final class SeedPoolDump {
    public static void main(String[] args) {
        StringBuilder out = new StringBuilder("{");
        for (int a = 0; a < args.length; a++) {
            out.append(a == 0 ? "" : ",").append('"').append(args[a]).append("\":[");
            long[] pool = SeedPool.seeds(Long.parseLong(args[a], 16), 8);
            for (int j = 0; j < pool.length; j++) {
                out.append(j == 0 ? "" : ",").append('"').append(pool[j]).append('"');
            }
            out.append(']');
        }
        System.out.println(out.append('}'));
    }
}
