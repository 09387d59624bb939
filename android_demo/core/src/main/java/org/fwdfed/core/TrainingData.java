package org.fwdfed.core;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;

/**
 * A device's training examples, cut as docs/data.md defines and runtime/data.py implements:
 * read the file's documents, shuffle them by the direction generator's words, hold out every
 * 10th, and take this device's IID shard (every N-th of the rest). Plain text (`.txt`:
 * documents separated by blank lines) is what the Java device reads.
 */
public final class TrainingData {
    public static final int HELDOUT_EVERY = 10;

    private TrainingData() {}

    /** Device `index` of `count`'s shard of `path`'s training examples (data seed `seed`). */
    public static List<String> shard(Path path, long seed, int index, int count) throws DataException {
        if (count < 1 || index < 0 || index >= count) {
            throw new DataException("shard " + index + " of " + count + " does not exist");
        }
        List<String> train = train(shuffled(readDocuments(path), seed));
        List<String> mine = new ArrayList<>();
        for (int i = index; i < train.size(); i += count) {
            mine.add(train.get(i));
        }
        return mine;
    }

    /** The documents of a `.txt` file, in file order: separated by blank lines, each stripped, empty ones dropped. */
    public static List<String> readDocuments(Path path) throws DataException {
        if (!Files.isRegularFile(path)) {
            throw new DataException("data file " + path + " does not exist");
        }
        if (!path.toString().endsWith(".txt")) {
            throw new DataException(path + ": the Java device reads plain text (.txt) training data");
        }
        String text;
        try {
            text = StandardCharsets.UTF_8.newDecoder().onMalformedInput(CodingErrorAction.REPORT)
                    .onUnmappableCharacter(CodingErrorAction.REPORT)
                    .decode(ByteBuffer.wrap(Files.readAllBytes(path))).toString();
        } catch (CharacterCodingException e) {
            throw new DataException(path + " is not UTF-8 text");
        } catch (IOException e) {
            throw new DataException("cannot read " + path + ": " + e.getMessage());
        }
        // Python reads text files with universal newlines: \r\n and \r become \n.
        text = text.replace("\r\n", "\n").replace('\r', '\n');
        List<String> docs = new ArrayList<>();
        for (String doc : text.split("\n\n", -1)) {
            String stripped = pythonStrip(doc);
            if (!stripped.isEmpty()) {
                docs.add(stripped);
            }
        }
        if (docs.isEmpty()) {
            throw new DataException(path + " holds no examples");
        }
        return docs;
    }

    /** Items ordered by their keys word(seed, i), ascending as unsigned 64-bit integers; ties keep file order. */
    public static <T> List<T> shuffled(List<T> items, long seed) {
        long[] keys = Directions.words(seed, 0, items.size());
        Integer[] order = new Integer[items.size()];
        for (int i = 0; i < order.length; i++) {
            order[i] = i;
        }
        Arrays.sort(order, (a, b) -> Long.compareUnsigned(keys[a], keys[b]));  // a stable sort
        List<T> out = new ArrayList<>(items.size());
        for (int i : order) {
            out.add(items.get(i));
        }
        return out;
    }

    /** Every position but 0, 10, 20, ... (those are the coordinator's held-out examples). */
    public static <T> List<T> train(List<T> examples) {
        List<T> out = new ArrayList<>();
        for (int i = 0; i < examples.size(); i++) {
            if (i % HELDOUT_EVERY != 0) {
                out.add(examples.get(i));
            }
        }
        return out;
    }

    /** Python's str.strip(): the whitespace of str.isspace(), which is wider than Java's. */
    static String pythonStrip(String s) {
        int start = 0;
        int end = s.length();
        while (start < end && isPythonSpace(s.charAt(start))) {
            start++;
        }
        while (end > start && isPythonSpace(s.charAt(end - 1))) {
            end--;
        }
        return s.substring(start, end);
    }

    static boolean isPythonSpace(char c) {
        return (c >= '\t' && c <= '\r') || (c >= '\u001c' && c <= ' ') || c == '\u0085' || c == '\u00a0'
                || c == '\u1680' || (c >= '\u2000' && c <= '\u200a') || c == '\u2028' || c == '\u2029'
                || c == '\u202f' || c == '\u205f' || c == '\u3000';
    }

    /** A data file that cannot be used; the message is meant for the user. */
    public static final class DataException extends Exception {
        private static final long serialVersionUID = 1L;

        public DataException(String message) {
            super(message);
        }
    }
}
