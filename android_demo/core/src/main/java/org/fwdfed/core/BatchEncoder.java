package org.fwdfed.core;

import java.util.ArrayList;
import java.util.List;

/**
 * Examples to batches in the program's static shapes [B][L], as runtime/data.py's `encode`
 * makes them: each text tokenized and truncated to L, padded to L (on the tokenizer's side)
 * with its pad id and a 0 mask; the last batch filled up with rows of pad ids that attend to
 * one token (so that no softmax row is empty), weight 0 and labels all ignored. Causal LM
 * labels are the ids where the mask is 1, -100 elsewhere; classification labels are [B][1].
 */
public final class BatchEncoder {
    public static final int IGNORE_INDEX = -100;

    private BatchEncoder() {}

    public static List<Batch> encode(Tokenizer tokenizer, List<String> texts, List<Integer> labels, String task,
                                     int batchSize, int seqLen) {
        boolean classify = Manifest.SEQ_CLS.equals(task);
        if (classify && labels == null) {
            throw new IllegalArgumentException("classification needs labelled data");
        }
        List<Batch> batches = new ArrayList<>();
        for (int start = 0; start < texts.size(); start += batchSize) {
            int count = Math.min(batchSize, texts.size() - start);
            int[][] ids = new int[batchSize][seqLen];
            int[][] mask = new int[batchSize][seqLen];
            int[][] lab = new int[batchSize][classify ? 1 : seqLen];
            float[] weights = new float[batchSize];
            for (int b = 0; b < batchSize; b++) {
                java.util.Arrays.fill(ids[b], tokenizer.padId);
                if (b >= count) {
                    mask[b][0] = 1;  // filler rows attend to one token
                    java.util.Arrays.fill(lab[b], classify ? 0 : IGNORE_INDEX);
                    continue;
                }
                weights[b] = 1.0f;
                int[] tokens = tokenizer.encode(texts.get(start + b), seqLen);
                int offset = tokenizer.padLeft ? seqLen - tokens.length : 0;
                for (int i = 0; i < tokens.length; i++) {
                    ids[b][offset + i] = tokens[i];
                    mask[b][offset + i] = 1;
                }
                if (classify) {
                    lab[b][0] = labels.get(start + b);
                } else {
                    for (int i = 0; i < seqLen; i++) {
                        lab[b][i] = mask[b][i] == 1 ? ids[b][i] : IGNORE_INDEX;
                    }
                }
            }
            batches.add(new Batch(ids, mask, lab, weights));
        }
        return batches;
    }
}
