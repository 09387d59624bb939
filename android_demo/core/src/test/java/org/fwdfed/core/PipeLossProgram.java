package org.fwdfed.core;

import java.io.BufferedInputStream;
import java.io.BufferedOutputStream;
import java.io.DataInputStream;
import java.io.IOException;
import java.io.OutputStream;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;

/**
 * For tests only: the {@link LossProgram} of a real `.pte`, run by the ExecuTorch runtime in a
 * helper process (tests/android_demo/loss_helper.py) over its stdin/stdout. The Java side builds
 * exactly the tensors an Android app hands to `Module.forward` (input_ids, attention_mask,
 * labels as int64; adapters [P, d] as float32) and sends them as raw little-endian arrays:
 *
 *   request:  "FWDL", u32 P, u32 B, u32 L, u32 label_columns (L, or 0 for labels of shape [B]), u32 d,
 *             int64 ids[B*L], int64 mask[B*L], int64 labels[B*max(1, label_columns)], float32 adapters[P*d]
 *   response: u32 status; 0: float32 losses[P*B]; 1: u32 length, UTF-8 message
 */
public final class PipeLossProgram implements LossProgram, AutoCloseable {
    private final List<String> command;
    private Process process;  // started at the first call: a task refused before training loads nothing
    private OutputStream in;
    private DataInputStream out;
    private final int maxPerturbations;
    private final boolean labelsPerExample;  // classification: labels [B], not [B, L]
    private long calls;

    public PipeLossProgram(List<String> command, String programPath, int maxPerturbations, boolean labelsPerExample) {
        this.command = new ArrayList<>(command);
        this.command.add(programPath);
        this.maxPerturbations = maxPerturbations;
        this.labelsPerExample = labelsPerExample;
    }

    @Override
    public int maxPerturbations() {
        return maxPerturbations;
    }

    public long calls() {
        return calls;
    }

    /** One request's bytes, in the framing above. */
    static byte[] request(int[][] ids, int[][] mask, int[][] labels, float[][] adapters, boolean labelsPerExample) {
        int p = adapters.length;
        int b = ids.length;
        int l = ids[0].length;
        int d = adapters[0].length;
        int labelColumns = labelsPerExample ? 0 : l;
        ByteBuffer req = ByteBuffer.allocate(24 + 8 * (2 * b * l + b * Math.max(1, labelColumns)) + 4 * p * d)
                .order(ByteOrder.LITTLE_ENDIAN);
        req.put("FWDL".getBytes(StandardCharsets.US_ASCII)).putInt(p).putInt(b).putInt(l).putInt(labelColumns).putInt(d);
        for (int[][] tensor : new int[][][] {ids, mask}) {
            for (int[] row : tensor) {
                for (int v : row) {
                    req.putLong(v);
                }
            }
        }
        for (int[] row : labels) {
            for (int i = 0; i < Math.max(1, labelColumns); i++) {
                req.putLong(row[i]);
            }
        }
        for (float[] row : adapters) {
            for (float v : row) {
                req.putFloat(v);
            }
        }
        return req.array();
    }

    @Override
    public synchronized float[][] loss(int[][] ids, int[][] mask, int[][] labels, float[][] adapters) {
        int p = adapters.length;
        int b = ids.length;
        byte[] request = request(ids, mask, labels, adapters, labelsPerExample);
        try {
            if (process == null) {
                process = new ProcessBuilder(command).redirectError(ProcessBuilder.Redirect.INHERIT).start();
                in = new BufferedOutputStream(process.getOutputStream(), 1 << 16);
                out = new DataInputStream(new BufferedInputStream(process.getInputStream(), 1 << 16));
            }
            in.write(request);
            in.flush();
            byte[] head = new byte[4];
            out.readFully(head);
            int status = ByteBuffer.wrap(head).order(ByteOrder.LITTLE_ENDIAN).getInt();
            if (status != 0) {
                out.readFully(head);
                byte[] message = new byte[ByteBuffer.wrap(head).order(ByteOrder.LITTLE_ENDIAN).getInt()];
                out.readFully(message);
                throw new ProgramException("the ExecuTorch program's forward failed: "
                        + new String(message, StandardCharsets.UTF_8));
            }
            byte[] body = new byte[4 * p * b];
            out.readFully(body);
            ByteBuffer losses = ByteBuffer.wrap(body).order(ByteOrder.LITTLE_ENDIAN);
            float[][] result = new float[p][b];
            for (int i = 0; i < p; i++) {
                for (int j = 0; j < b; j++) {
                    result[i][j] = losses.getFloat();
                }
            }
            calls++;
            return result;
        } catch (IOException e) {
            throw new ProgramException("the program's helper process stopped answering", e);
        }
    }

    @Override
    public synchronized void close() {
        if (process == null) {
            return;
        }
        try {
            in.close();
        } catch (IOException ignored) {
            // the helper is gone already
        }
        try {
            if (!process.waitFor(10, java.util.concurrent.TimeUnit.SECONDS)) {
                process.destroyForcibly();
            }
        } catch (InterruptedException e) {
            process.destroyForcibly();
            Thread.currentThread().interrupt();
        }
    }
}
