package org.fwdfed.core;

import java.security.MessageDigest;

/**
 * Prints, as JSON, what docs/golden/directions.json holds, computed by the Java implementation;
 * tests/android_demo/test_java_core.py compares the two.
 */
public final class GoldenDump {
    public static void main(String[] args) throws Exception {
        StringBuilder out = new StringBuilder("{");
        for (int a = 0; a < args.length; a++) {
            long seed = Long.parseUnsignedLong(args[a]);
            out.append(a == 0 ? "" : ",").append('"').append(args[a]).append("\":{\"words\":[");
            for (int i = 0; i < 8; i++) {
                out.append(i == 0 ? "" : ",").append('"').append(Long.toUnsignedString(Directions.word(seed, i))).append('"');
            }
            out.append("],\"rademacher_256\":\"");
            for (float x : Directions.rademacher(seed, 0, 256)) {
                out.append(x > 0 ? '+' : '-');
            }
            out.append("\",\"gaussian_256_float32_bits\":[");
            float[] g = Directions.gaussian(seed, 0, 256);
            for (int i = 0; i < g.length; i++) {
                out.append(i == 0 ? "" : ",").append('"').append(String.format("%08x", Float.floatToRawIntBits(g[i]))).append('"');
            }
            float[] r = Directions.rademacher(seed, 0, 1_000_000);
            byte[] bytes = new byte[r.length];
            for (int i = 0; i < r.length; i++) {
                bytes[i] = (byte) r[i];
            }
            StringBuilder hex = new StringBuilder();
            for (byte b : MessageDigest.getInstance("SHA-256").digest(bytes)) {
                hex.append(String.format("%02x", b));
            }
            out.append("],\"rademacher_1000000_sha256_of_int8\":\"").append(hex).append("\"}");
        }
        System.out.println(out.append("}"));
    }
}
