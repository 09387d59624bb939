package org.fwdfed.core;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;

/**
 * The scaled directions of docs/golden/tensor_scales.json made by the Java implementation (TensorScales, and
 * StepConfig.direction as a task's config makes them), printed as JSON per kind: the whole and the block's
 * directions' float32 bits; tests/android_demo/test_java_core.py compares them with the file. The scales go
 * through the Codec first (a task frame encoded and decoded), as a device receives them.
 */
public final class TensorScalesDump {
    public static void main(String[] args) throws Exception {
        Map<String, Object> golden = Json.object(Json.parse(
                new String(Files.readAllBytes(Path.of(args[0])), StandardCharsets.UTF_8)), "tensor_scales.json");
        int d = ((Number) golden.get("d")).intValue();
        List<Object> block = Json.array(golden.get("block"), "block");
        Map<String, Object> sent = Map.of("lr", 1e-3, "eps", 1e-3, "directions", 2L,
                "tensor_scales", golden.get("tensor_scales"));
        Message.Task task = new Message.Task("t", "j", 1, 0, "h", new byte[0], "", "fzoo", sent, 1.0, new byte[0], null);
        Map<String, Object> received = ((Message.Task) Codec.decode(Codec.encode(task))).hparams;
        StringBuilder out = new StringBuilder("{");
        String[] kinds = {Directions.RADEMACHER, Directions.GAUSSIAN};
        for (int k = 0; k < kinds.length; k++) {
            out.append(k == 0 ? "" : ",").append('"').append(kinds[k]).append("\":{");
            for (int b = 0; b < 2; b++) {
                Map<String, Object> h = new java.util.LinkedHashMap<>(received);
                h.put("kind", kinds[k]);
                if (b == 1) {
                    h.put("block_start", block.get(0));
                    h.put("block_end", block.get(1));
                }
                MethodConfig config = Methods.config("fzoo", new Hparams(h));
                out.append(b == 0 ? "\"directions_float32_bits\":[" : ",\"block_directions_float32_bits\":[");
                List<Object> seeds = Json.array(golden.get("seeds"), "seeds");
                for (int s = 0; s < seeds.size(); s++) {
                    float[] z = ((StepConfig) config).direction(Long.parseLong((String) seeds.get(s)), d);
                    out.append(s == 0 ? "[" : ",[");
                    for (int i = 0; i < z.length; i++) {
                        out.append(i == 0 ? "" : ",").append('"')
                                .append(String.format("%08x", Float.floatToRawIntBits(z[i]))).append('"');
                    }
                    out.append(']');
                }
                out.append(']');
            }
            out.append('}');
        }
        System.out.println(out.append('}'));
    }
}
