package org.fwdfed.core;

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.PriorityQueue;

/**
 * The BPE model of a Hugging Face tokenizer.json (the LLaMA/sentencepiece style of stories260K:
 * byte fallback, no continuing-subword prefix), applied as the `tokenizers` library applies it:
 * every character is a symbol (or its UTF-8 bytes as `<0xXX>` tokens when it is not in the
 * vocabulary), then the pair of lowest merge rank is merged, leftmost first, until none is
 * left; a priority queue keeps this O(n log n) on long documents.
 */
final class BpeModel {
    private final Map<String, Integer> vocab;
    private final Map<Long, int[]> merges = new HashMap<>();  // (left id, right id) -> {rank, merged id}
    private final boolean byteFallback;
    private final Integer unk;
    private final boolean fuseUnk;

    BpeModel(Map<String, Object> model) {
        this.vocab = new HashMap<>();
        for (Map.Entry<String, Object> e : Json.object(model.get("vocab"), "vocab").entrySet()) {
            vocab.put(e.getKey(), ((Long) e.getValue()).intValue());
        }
        List<Object> mergeList = Json.array(model.get("merges"), "merges");
        for (int rank = 0; rank < mergeList.size(); rank++) {
            Object m = mergeList.get(rank);
            String a;
            String b;
            if (m instanceof String) {  // older files write "a b"
                String s = (String) m;
                int space = s.indexOf(' ', 1);
                a = s.substring(0, space);
                b = s.substring(space + 1);
            } else {
                List<Object> pair = Json.array(m, "merge");
                a = (String) pair.get(0);
                b = (String) pair.get(1);
            }
            Integer left = vocab.get(a);
            Integer right = vocab.get(b);
            Integer merged = vocab.get(a + b);
            if (left == null || right == null || merged == null) {
                throw new IllegalArgumentException("merge " + a + " " + b + " names a token not in the vocabulary");
            }
            merges.putIfAbsent(key(left, right), new int[] {rank, merged});
        }
        this.byteFallback = Boolean.TRUE.equals(model.get("byte_fallback"));
        Object unkToken = model.get("unk_token");
        this.unk = unkToken == null ? null : vocab.get((String) unkToken);
        this.fuseUnk = Boolean.TRUE.equals(model.get("fuse_unk"));
        if (model.get("continuing_subword_prefix") != null || model.get("end_of_word_suffix") != null) {
            throw new IllegalArgumentException("BPE with a subword prefix or suffix is not supported");
        }
    }

    private static long key(int left, int right) {
        return ((long) left << 32) | (right & 0xffffffffL);
    }

    /** The ids of one pre-tokenized word. */
    void tokenize(String word, List<Integer> out) {
        // Symbols as a doubly linked list over arrays: id, prev, next; id -1 once merged away.
        List<Integer> initial = new ArrayList<>();
        int pendingUnk = -1;
        for (int i = 0; i < word.length(); ) {
            int cp = word.codePointAt(i);
            String ch = new String(Character.toChars(cp));
            i += Character.charCount(cp);
            Integer id = vocab.get(ch);
            if (id != null) {
                if (pendingUnk >= 0) {
                    initial.add(pendingUnk);
                    pendingUnk = -1;
                }
                initial.add(id);
                continue;
            }
            if (byteFallback) {
                List<Integer> bytes = new ArrayList<>();
                for (byte b : ch.getBytes(StandardCharsets.UTF_8)) {
                    Integer t = vocab.get(String.format("<0x%02X>", b & 0xff));
                    if (t == null) {
                        bytes = null;
                        break;
                    }
                    bytes.add(t);
                }
                if (bytes != null) {
                    initial.addAll(bytes);
                    continue;
                }
            }
            if (unk != null) {
                if (pendingUnk >= 0 && !fuseUnk) {
                    initial.add(pendingUnk);
                }
                pendingUnk = unk;
            }
        }
        if (pendingUnk >= 0) {
            initial.add(pendingUnk);
        }
        int n = initial.size();
        int[] ids = new int[n];
        int[] prev = new int[n];
        int[] next = new int[n];
        for (int i = 0; i < n; i++) {
            ids[i] = initial.get(i);
            prev[i] = i - 1;
            next[i] = i + 1 < n ? i + 1 : -1;
        }
        // Candidate merges ordered by rank, then position: {rank, pos, merged id}.
        PriorityQueue<int[]> queue = new PriorityQueue<>((x, y) -> x[0] != y[0] ? Integer.compare(x[0], y[0])
                : Integer.compare(x[1], y[1]));
        for (int i = 0; i + 1 < n; i++) {
            int[] m = merges.get(key(ids[i], ids[i + 1]));
            if (m != null) {
                queue.add(new int[] {m[0], i, m[1]});
            }
        }
        while (!queue.isEmpty()) {
            int[] top = queue.poll();
            int pos = top[1];
            if (ids[pos] < 0 || next[pos] < 0) {
                continue;  // merged away, or no right neighbour any more
            }
            int right = next[pos];
            int[] current = merges.get(key(ids[pos], ids[right]));
            if (current == null || current[1] != top[2]) {
                continue;  // the pair changed since this candidate was queued
            }
            ids[pos] = top[2];
            ids[right] = -1;
            next[pos] = next[right];
            if (next[pos] >= 0) {
                prev[next[pos]] = pos;
            }
            if (prev[pos] >= 0) {
                int[] m = merges.get(key(ids[prev[pos]], ids[pos]));
                if (m != null) {
                    queue.add(new int[] {m[0], prev[pos], m[1]});
                }
            }
            if (next[pos] >= 0) {
                int[] m = merges.get(key(ids[pos], ids[next[pos]]));
                if (m != null) {
                    queue.add(new int[] {m[0], pos, m[1]});
                }
            }
        }
        for (int i = 0; i >= 0 && n > 0; i = next[i]) {
            out.add(ids[i]);
        }
    }
}
