package org.fwdfed.core;

import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

/**
 * The WordPiece model of a BERT tokenizer.json: each word greedily split into the longest
 * vocabulary pieces from the left, pieces after the first carrying the `##` prefix; a word
 * with a part no piece covers (or longer than max_input_chars_per_word) is one [UNK].
 */
final class WordPieceModel {
    private final Map<String, Integer> vocab = new HashMap<>();
    private final int unk;
    private final String prefix;
    private final int maxChars;

    WordPieceModel(Map<String, Object> model) {
        for (Map.Entry<String, Object> e : Json.object(model.get("vocab"), "vocab").entrySet()) {
            vocab.put(e.getKey(), ((Long) e.getValue()).intValue());
        }
        Integer unkId = vocab.get((String) model.get("unk_token"));
        if (unkId == null) {
            throw new IllegalArgumentException("WordPiece's unk_token is not in its vocabulary");
        }
        this.unk = unkId;
        this.prefix = model.get("continuing_subword_prefix") == null ? "##" : (String) model.get("continuing_subword_prefix");
        this.maxChars = model.get("max_input_chars_per_word") == null ? 100
                : ((Long) model.get("max_input_chars_per_word")).intValue();
    }

    void tokenize(String word, List<Integer> out) {
        int[] cps = word.codePoints().toArray();
        if (cps.length > maxChars) {
            out.add(unk);
            return;
        }
        List<Integer> pieces = new ArrayList<>();
        int start = 0;
        while (start < cps.length) {
            int end = cps.length;
            Integer found = null;
            while (start < end) {
                String piece = new String(cps, start, end - start);
                if (start > 0) {
                    piece = prefix + piece;
                }
                found = vocab.get(piece);
                if (found != null) {
                    break;
                }
                end--;
            }
            if (found == null) {
                out.add(unk);
                return;
            }
            pieces.add(found);
            start = end;
        }
        out.addAll(pieces);
    }
}
