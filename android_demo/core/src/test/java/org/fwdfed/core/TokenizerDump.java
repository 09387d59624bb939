package org.fwdfed.core;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.util.List;

/**
 * Test tool: `TokenizerDump FOLDER TEXTS.json MAX_LENGTH` prints, one line per text of the JSON
 * array, the ids the Java tokenizer gives (comma-separated); tests/android_demo compares them
 * with Hugging Face's and with docs/golden/tokenizer_*.json.
 */
public final class TokenizerDump {
    public static void main(String[] args) throws Exception {
        Tokenizer tokenizer = Tokenizer.load(Paths.get(args[0]));
        List<Object> texts = Json.array(Json.parse(Files.readString(Paths.get(args[1]), StandardCharsets.UTF_8)), "texts");
        int maxLength = Integer.parseInt(args[2]);
        StringBuilder out = new StringBuilder();
        out.append("{\"pad_id\":").append(tokenizer.padId).append(",\"pad_left\":").append(tokenizer.padLeft)
                .append(",\"ids\":[");
        for (int t = 0; t < texts.size(); t++) {
            int[] ids = tokenizer.encode((String) texts.get(t), maxLength);
            out.append(t == 0 ? "[" : ",[");
            for (int i = 0; i < ids.length; i++) {
                out.append(i == 0 ? "" : ",").append(ids[i]);
            }
            out.append(']');
        }
        System.out.println(out.append("]}"));
    }
}
