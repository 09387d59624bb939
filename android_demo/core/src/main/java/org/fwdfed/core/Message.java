package org.fwdfed.core;

import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * The messages of docs/protocol.md (version 1), one nested class per type, with exactly the
 * fields the document lists. Instances are immutable; {@link Codec} turns them into frames and
 * back, checking every field as fwdfed/protocol.py does.
 */
public abstract class Message {
    public static final int PROTOCOL_VERSION = 1;
    public static final int MAX_FRAME_BYTES = 64 * 1024 * 1024;  // a task carries the adapter: 16M float32 at most
    public static final int MAX_PAIRS = 1_000_000;  // (seed, coefficient) pairs in one update
    public static final int MAX_TEXT = 1024;
    public static final int MAX_ID = 128;

    private Message() {}

    /** The wire name of this message's type (`hello`, `task`, ...). */
    public abstract String type();

    /** device -> coordinator, first message: who I am and what model I hold. */
    public static final class Hello extends Message {
        public final String deviceId;
        public final String baseModelHash;
        public final long adapterDim;
        public final long numExamples;
        public final Long memBudgetBytes;  // null: no budget
        /** The version this device holds and its adapter's sha256 ("": none): both null for a device that keeps none. */
        public final Long heldVersion;
        public final String heldSha256;

        public Hello(String deviceId, String baseModelHash, long adapterDim, long numExamples, Long memBudgetBytes) {
            this(deviceId, baseModelHash, adapterDim, numExamples, memBudgetBytes, null, null);
        }

        public Hello(String deviceId, String baseModelHash, long adapterDim, long numExamples, Long memBudgetBytes,
                     Long heldVersion, String heldSha256) {
            this.deviceId = deviceId;
            this.baseModelHash = baseModelHash;
            this.adapterDim = adapterDim;
            this.numExamples = numExamples;
            this.memBudgetBytes = memBudgetBytes;
            this.heldVersion = heldVersion;
            this.heldSha256 = heldSha256;
        }

        @Override
        public String type() {
            return "hello";
        }
    }

    /** coordinator -> device: enrolled in this job; tasks will follow. */
    public static final class Welcome extends Message {
        public final String jobId;
        public final String deviceId;

        public Welcome(String jobId, String deviceId) {
            this.jobId = jobId;
            this.deviceId = deviceId;
        }

        @Override
        public String type() {
            return "welcome";
        }
    }

    /** coordinator -> device: train from this global adapter and answer with an Update. */
    public static final class Task extends Message {
        public final String taskId;
        public final String jobId;
        public final long round;
        public final long globalVersion;
        public final String baseModelHash;
        public final byte[] adapter;  // float32 little-endian, adapter_dim values
        public final String adapterSha256;
        public final String method;
        /** Values are Long, Double, String, or BigInteger (an integer past a long, still "a number"). */
        public final Map<String, Object> hparams;
        public final double deadlineS;
        public final byte[] reference;  // the previous round's global update (float32), or empty
        /** The versions since the one this device holds, in seed form (then `adapter` is empty); null: dense. */
        public final List<HistoryStep> history;

        public Task(String taskId, String jobId, long round, long globalVersion, String baseModelHash, byte[] adapter,
                    String adapterSha256, String method, Map<String, Object> hparams, double deadlineS,
                    byte[] reference) {
            this(taskId, jobId, round, globalVersion, baseModelHash, adapter, adapterSha256, method, hparams, deadlineS,
                    reference, null);
        }

        public Task(String taskId, String jobId, long round, long globalVersion, String baseModelHash, byte[] adapter,
                    String adapterSha256, String method, Map<String, Object> hparams, double deadlineS,
                    byte[] reference, List<HistoryStep> history) {
            this.taskId = taskId;
            this.jobId = jobId;
            this.round = round;
            this.globalVersion = globalVersion;
            this.baseModelHash = baseModelHash;
            this.adapter = adapter;
            this.adapterSha256 = adapterSha256;
            this.method = method;
            this.hparams = Collections.unmodifiableMap(new LinkedHashMap<>(hparams));
            this.deadlineS = deadlineS;
            this.reference = reference;
            this.history = history == null ? null : Collections.unmodifiableList(new ArrayList<>(history));
        }

        /** The same task with the dense adapter (a history replayed onto the adapter this device kept). */
        public Task withAdapter(byte[] dense) {
            return new Task(taskId, jobId, round, globalVersion, baseModelHash, dense, adapterSha256, method, hparams,
                    deadlineS, reference, null);
        }

        @Override
        public String type() {
            return "task";
        }
    }

    /**
     * One version of a task's history (docs/protocol.md, Downlink in seed form): its distinct seeds, each one's
     * float64 coefficient sum, or, in a job with a seed pool, the K sums packed by pool index (`sums`, little-endian
     * float64; then `seeds` and `coefs` are empty); the shrink S; the block ([start, end], or empty: the whole
     * adapter); and, for a version with a dense part, the float32 values (little-endian) of the span from
     * `spanStart` it set. The block, the packed sums and the span are checked when replayed, not when decoded, as
     * fwdfed/protocol.py does.
     */
    public static final class HistoryStep {
        public final long version;
        public final long[] seeds;
        public final double[] coefs;
        public final byte[] sums;  // null: the sums are `seeds` and `coefs`
        public final double shrink;
        public final long[] block;
        public final long spanStart;
        public final byte[] span;  // null: no span

        public HistoryStep(long version, long[] seeds, double[] coefs, double shrink, long[] block) {
            this(version, seeds, coefs, null, shrink, block, 0, null);
        }

        public HistoryStep(long version, long[] seeds, double[] coefs, byte[] sums, double shrink, long[] block,
                           long spanStart, byte[] span) {
            this.version = version;
            this.seeds = sums == null ? seeds : new long[0];
            this.coefs = sums == null ? coefs : new double[0];
            this.sums = sums;
            this.shrink = shrink;
            this.block = block;
            this.spanStart = spanStart;
            this.span = span;
        }
    }

    /** device -> coordinator: the answer to one task, in seed form. */
    public static final class Update extends Message {
        public final String taskId;
        public final String jobId;
        public final long round;
        public final long globalVersion;
        public final long[] seeds;
        public final double[] coefs;
        public final double scale;  // the device's adapter is scale * global + sum coef * direction(seed) + dense
        public final byte[] dense;  // a dense change (float32, d values), or empty
        public final long numExamples;
        public final double lossBefore;
        public final double lossAfter;
        public final long peakRssBytes;

        public Update(String taskId, String jobId, long round, long globalVersion, long[] seeds, double[] coefs,
                      double scale, byte[] dense, long numExamples, double lossBefore, double lossAfter,
                      long peakRssBytes) {
            this.taskId = taskId;
            this.jobId = jobId;
            this.round = round;
            this.globalVersion = globalVersion;
            this.seeds = seeds;
            this.coefs = coefs;
            this.scale = scale;
            this.dense = dense;
            this.numExamples = numExamples;
            this.lossBefore = lossBefore;
            this.lossAfter = lossAfter;
            this.peakRssBytes = peakRssBytes;
        }

        @Override
        public String type() {
            return "update";
        }
    }

    /** coordinator -> device: whether an update was accepted, and why not. */
    /** device -> coordinator: this device cannot run the task; it goes to another device. */
    public static final class Decline extends Message {
        public final String taskId;
        public final String code;
        public final String reason;

        public Decline(String taskId, String code, String reason) {
            this.taskId = taskId;
            this.code = code;
            this.reason = reason;
        }

        @Override
        public String type() {
            return "decline";
        }
    }

    public static final class Ack extends Message {
        public final String taskId;
        public final boolean accepted;
        public final String reason;

        public Ack(String taskId, boolean accepted, String reason) {
            this.taskId = taskId;
            this.accepted = accepted;
            this.reason = reason;
        }

        /** The refusal's code: the part of `reason` before the first ": " (docs/protocol.md). */
        public String code() {
            int colon = reason.indexOf(": ");
            return colon < 0 ? reason : reason.substring(0, colon);
        }

        @Override
        public String type() {
            return "ack";
        }
    }

    /** coordinator -> device: the job has finished; disconnect. */
    public static final class Done extends Message {
        public final String jobId;
        public final String reason;

        public Done(String jobId, String reason) {
            this.jobId = jobId;
            this.reason = reason;
        }

        @Override
        public String type() {
            return "done";
        }
    }

    /** either side: the last frame was refused; the sender closes the connection after it. */
    public static final class Error extends Message {
        public final String code;
        public final String message;

        public Error(String code, String message) {
            this.code = code;
            this.message = message;
        }

        @Override
        public String type() {
            return "error";
        }
    }
}
