package org.fwdfed.core;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;

/**
 * Replays docs/golden/replay.json's history with the Java implementation (Replay) and prints, as JSON, each
 * kind's versions: their float32 bits and sha256; tests/android_demo/test_java_core.py compares them with the
 * file. The history goes through the Codec first (a task frame encoded and decoded), as a device receives it.
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
            Map<String, Object> m = Json.object(entry, "a history entry");
            List<Object> seedList = Json.array(m.get("seeds"), "seeds");
            List<Object> coefList = Json.array(m.get("coefs"), "coefs");
            List<Object> blockList = Json.array(m.get("block"), "block");
            long[] seeds = new long[seedList.size()];
            double[] coefs = new double[coefList.size()];
            long[] block = new long[blockList.size()];
            for (int i = 0; i < seeds.length; i++) {
                seeds[i] = Long.parseLong((String) seedList.get(i));
                coefs[i] = ((Number) coefList.get(i)).doubleValue();
            }
            for (int i = 0; i < block.length; i++) {
                block[i] = ((Number) blockList.get(i)).longValue();
            }
            history.add(new Message.HistoryStep(((Number) m.get("version")).longValue(), seeds, coefs,
                    ((Number) m.get("shrink")).doubleValue(), block));
        }
        Message.Task task = new Message.Task("t", "j", 3, history.size(), "h", new byte[0], "", "mezo", Map.of(),
                1.0, new byte[0], history);
        history = ((Message.Task) Codec.decode(Codec.encode(task))).history;
        StringBuilder out = new StringBuilder("{");
        String[] kinds = {Directions.RADEMACHER, Directions.GAUSSIAN};
        for (int k = 0; k < kinds.length; k++) {
            out.append(k == 0 ? "" : ",").append('"').append(kinds[k]).append("\":[");
            float[] w = start;
            for (int v = 0; v < history.size(); v++) {
                w = Replay.replay(w, history.subList(v, v + 1), kinds[k]);
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
}
