package org.fwdfed.core;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * Replays docs/golden/replay.json's history with the Java implementation (Replay) and prints, as JSON, each
 * kind's versions: their float32 bits and sha256; tests/android_demo/test_java_core.py compares them with the
 * file. The history goes through the Codec first (a task frame encoded and decoded), as a device receives it, and
 * its packed sums are unpacked against the pool the file's task hyperparameters name (SeedPool.fromHparams).
 */
public final class ReplayDump {
    public static void main(String[] args) throws Exception {
        Map<String, Object> golden = Json.object(Json.parse(
                new String(Files.readAllBytes(Path.of(args[0])), StandardCharsets.UTF_8)), "replay.json");
        List<Object> startBits = Json.array(golden.get("start_float32_bits"), "start_float32_bits");
        float[] start = new float[startBits.size()];
        for (int i = 0; i < start.length; i++) {
            start[i] = Float.intBitsToFloat((int) Long.parseLong((String) startBits.get(i), 16));
        }
        List<Message.HistoryStep> history = new ArrayList<>();
        for (Object entry : Json.array(golden.get("history"), "history")) {
            history.add(step(Json.object(entry, "a history entry")));
        }
        Map<String, Object> hparams = new LinkedHashMap<>();
        hparams.put("seed_pool", ((Number) golden.get("seed_pool")).longValue());
        hparams.put("seed_pool_key", golden.get("seed_pool_key"));
        Message.Task task = new Message.Task("t", "j", history.size() + 1, history.size(), "h", new byte[0], "",
                "mezo", hparams, 1.0, new byte[0], history);
        Message.Task decoded = (Message.Task) Codec.decode(Codec.encode(task));
        history = decoded.history;
        long[] pool = SeedPool.fromHparams(new Hparams(decoded.hparams));
        StringBuilder out = new StringBuilder("{");
        String[] kinds = {Directions.RADEMACHER, Directions.GAUSSIAN};
        for (int k = 0; k < kinds.length; k++) {
            out.append(k == 0 ? "" : ",").append('"').append(kinds[k]).append("\":[");
            float[] w = start;
            for (int v = 0; v < history.size(); v++) {
                w = Replay.replay(w, history.subList(v, v + 1), kinds[k], pool);
                out.append(v == 0 ? "" : ",").append("{\"version\":").append(history.get(v).version)
                        .append(",\"float32_bits\":[");
                for (int i = 0; i < w.length; i++) {
                    out.append(i == 0 ? "" : ",").append('"')
                            .append(String.format("%08x", Float.floatToRawIntBits(w[i]))).append('"');
                }
                out.append("],\"sha256\":\"").append(Replay.sha256(Replay.bytes(w))).append("\"}");
            }
            out.append(']');
        }
        System.out.println(out.append('}'));
    }

    /** One version of the file: seeds as decimal strings, the packed sums and the span as the hex of their bytes. */
    private static Message.HistoryStep step(Map<String, Object> m) {
        long[] seeds = new long[0];
        double[] coefs = new double[0];
        if (m.containsKey("seeds")) {
            List<Object> seedList = Json.array(m.get("seeds"), "seeds");
            List<Object> coefList = Json.array(m.get("coefs"), "coefs");
            seeds = new long[seedList.size()];
            coefs = new double[coefList.size()];
            for (int i = 0; i < seeds.length; i++) {
                seeds[i] = Long.parseLong((String) seedList.get(i));
                coefs[i] = ((Number) coefList.get(i)).doubleValue();
            }
        }
        List<Object> blockList = Json.array(m.get("block"), "block");
        long[] block = new long[blockList.size()];
        for (int i = 0; i < block.length; i++) {
            block[i] = ((Number) blockList.get(i)).longValue();
        }
        byte[] sums = m.containsKey("sums_hex") ? hex((String) m.get("sums_hex")) : null;
        byte[] span = m.containsKey("span_hex") ? hex((String) m.get("span_hex")) : null;
        long spanStart = m.containsKey("span_start") ? ((Number) m.get("span_start")).longValue() : 0;
        return new Message.HistoryStep(((Number) m.get("version")).longValue(), seeds, coefs, sums,
                ((Number) m.get("shrink")).doubleValue(), block, spanStart, span);
    }

    private static byte[] hex(String text) {
        byte[] out = new byte[text.length() / 2];
        for (int i = 0; i < out.length; i++) {
            out[i] = (byte) Integer.parseInt(text.substring(2 * i, 2 * i + 2), 16);
        }
        return out;
    }
}
