package org.fwdfed.core;

import static org.fwdfed.core.UnitTests.check;
import static org.fwdfed.core.UnitTests.equal;
import static org.fwdfed.core.UnitTests.raises;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;

/** The data cut (docs/data.md), the tokenizer pipeline on a small vocabulary, and the batch shapes. */
final class DataTests {
    private DataTests() {}

    static void testDocumentsAreSplitStrippedShuffledAndDealt() throws Exception {
        Path dir = Files.createTempDirectory("data");
        Path file = dir.resolve("d.txt");
        StringBuilder text = new StringBuilder("\u00a0 first \r\n\r\n");
        for (int i = 1; i < 40; i++) {
            text.append("doc ").append(i).append("\n\n\n");
        }
        Files.writeString(file, text, StandardCharsets.UTF_8);
        List<String> docs = TrainingData.readDocuments(file);
        equal(40, docs.size(), "blank lines separate documents; empty ones are dropped");
        equal("first", docs.get(0), "Python's strip() removes the no-break space too");
        List<String> shuffled = TrainingData.shuffled(docs, 0);
        long[] keys = Directions.words(0, 0, docs.size());
        for (int i = 1; i < shuffled.size(); i++) {
            int a = docs.indexOf(shuffled.get(i - 1));
            int b = docs.indexOf(shuffled.get(i));
            check(Long.compareUnsigned(keys[a], keys[b]) < 0, "ordered by unsigned word(seed, i)");
        }
        List<String> s0 = TrainingData.shard(file, 0, 0, 3);
        List<String> s1 = TrainingData.shard(file, 0, 1, 3);
        List<String> s2 = TrainingData.shard(file, 0, 2, 3);
        equal(36, s0.size() + s1.size() + s2.size(), "every 10th (4 of 40) held out, the rest dealt");
        check(!s0.contains(shuffled.get(0)) && !s0.contains(shuffled.get(10)), "held-out examples are nobody's");
        raises(TrainingData.DataException.class, "does not exist", () -> TrainingData.shard(dir.resolve("x.txt"), 0, 0, 1));
        Files.write(dir.resolve("bad.txt"), new byte[] {(byte) 0xff, 'a'});
        raises(TrainingData.DataException.class, "not UTF-8", () -> TrainingData.readDocuments(dir.resolve("bad.txt")));
    }

    /** A tokenizer.json in the shape of stories260K's: Metaspace, BPE with byte fallback, <s> template. */
    static Tokenizer tinyTokenizer(String paddingSide) throws Exception {
        Path dir = Files.createTempDirectory("tok");
        StringBuilder vocab = new StringBuilder("\"<unk>\": 0, \"<s>\": 1, \"</s>\": 2");
        for (int b = 0; b < 256; b++) {
            vocab.append(String.format(", \"<0x%02X>\": %d", b, 3 + b));
        }
        vocab.append(", \"\u2581\": 259, \"a\": 260, \"b\": 261, \"\u2581a\": 262, \"ab\": 263, \"\u2581ab\": 264");
        String json = "{\"added_tokens\": [{\"id\": 0, \"content\": \"<unk>\"}, {\"id\": 1, \"content\": \"<s>\"},"
                + "{\"id\": 2, \"content\": \"</s>\"}], \"normalizer\": null,"
                + "\"pre_tokenizer\": {\"type\": \"Metaspace\", \"replacement\": \"\u2581\", \"prepend_scheme\": \"first\", \"split\": false},"
                + "\"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": [{\"SpecialToken\": {\"id\": \"<s>\"}},"
                + "{\"Sequence\": {\"id\": \"A\"}}], \"special_tokens\": {\"<s>\": {\"id\": \"<s>\", \"ids\": [1]}}},"
                + "\"model\": {\"type\": \"BPE\", \"byte_fallback\": true, \"fuse_unk\": true, \"vocab\": {" + vocab + "},"
                + "\"merges\": [[\"a\", \"b\"], [\"\u2581\", \"a\"], [\"\u2581a\", \"b\"], [\"\u2581\", \"ab\"]]}}";
        Files.writeString(dir.resolve("tokenizer.json"), json, StandardCharsets.UTF_8);
        Files.writeString(dir.resolve("tokenizer_config.json"), "{\"tokenizer_class\": \"LlamaTokenizer\", \"pad_token\": \"<unk>\""
                + (paddingSide == null ? "" : ", \"padding_side\": \"" + paddingSide + "\"") + "}", StandardCharsets.UTF_8);
        return Tokenizer.load(dir);
    }

    static void testBpeMergesByRankAndFallsBackToBytes() throws Exception {
        Tokenizer t = tinyTokenizer(null);
        // "ab ab": ▁ab ▁ab; (a,b) has the lowest rank, so ▁ + ab, then (▁, ab) -> ▁ab.
        check(java.util.Arrays.equals(new int[] {1, 264, 264}, t.encode("ab ab", 100)), "merges by rank");
        // "é" is not in the vocabulary: its two UTF-8 bytes.
        check(java.util.Arrays.equals(new int[] {1, 259, 3 + 0xC3, 3 + 0xA9}, t.encode("é", 100)), "byte fallback");
        // A special token written in the text stays whole; no ▁ before the piece after it.
        check(java.util.Arrays.equals(new int[] {1, 262, 2, 260}, t.encode("a</s>a", 100)), "added tokens split first");
        check(java.util.Arrays.equals(new int[] {1, 264}, t.encode("ab ab ab", 2)), "truncated to fit <s>");
        equal(0, t.padId, "pad is <unk>");
        check(t.padLeft, "LLaMA's tokenizer pads on the left");
        check(!tinyTokenizer("right").padLeft, "unless its config says right");
    }

    static void testBatchesHaveTheProgramsShapesAndFillerRows() throws Exception {
        Tokenizer t = tinyTokenizer(null);
        List<Batch> batches = BatchEncoder.encode(t, List.of("ab", "a b", "ab ab ab ab"), null, Manifest.CAUSAL_LM, 2, 4);
        equal(2, batches.size(), "3 examples in batches of 2");
        Batch first = batches.get(0);
        check(java.util.Arrays.equals(new int[] {0, 0, 1, 264}, first.ids[0]), "left padding with the pad id");
        check(java.util.Arrays.equals(new int[] {0, 0, 1, 1}, first.mask[0]), "mask 1 on tokens");
        check(java.util.Arrays.equals(new int[] {-100, -100, 1, 264}, first.labels[0]), "labels: ids where the mask is 1");
        Batch last = batches.get(1);
        check(java.util.Arrays.equals(new int[] {1, 264, 264, 264}, last.ids[0]), "truncated to L");
        check(java.util.Arrays.equals(new int[] {1, 0, 0, 0}, last.mask[1]), "a filler row attends to one token");
        check(java.util.Arrays.equals(new int[] {-100, -100, -100, -100}, last.labels[1]), "and is ignored by the loss");
        check(last.weights[0] == 1f && last.weights[1] == 0f, "weights 1 for examples, 0 for filler");
        List<Batch> cls = BatchEncoder.encode(t, List.of("a"), List.of(1), Manifest.SEQ_CLS, 2, 4);
        equal(1, cls.get(0).labels[0][0], "a classification label per example");
    }
}
