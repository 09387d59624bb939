package org.fwdfed.core;

import java.io.IOException;
import java.math.BigInteger;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;

import org.msgpack.core.MessageBufferPacker;
import org.msgpack.core.MessagePack;

/**
 * Frames to messages and back: docs/protocol.md's rules, checked exactly as fwdfed/protocol.py
 * checks them, so that a frame one side refuses the other refuses too
 * (tests/android_demo/test_protocol_codec.py feeds both the same corpus of good and broken frames).
 *
 * Every message is a msgpack map with `type` and `v` plus exactly its type's fields; a missing
 * field, an extra one, a value of the wrong type or out of range is a {@link ProtocolException}.
 * Integers are msgpack ints; a "float" field takes an int or a float but must be finite.
 */
public final class Codec {
    private static final long SEED_LIMIT_MINUS_1 = Long.MAX_VALUE;  // seeds are in [0, 2^63)
    private static final long COUNT_MAX = (1L << 31) - 1;
    private static final long BYTES_COUNT_MAX = 1L << 62;

    private Codec() {}

    // ---- encoding ----

    /** The frame for `message`: the map `{type, v, fields...}` in the order fwdfed/protocol.py writes it. */
    public static byte[] encode(Message message) {
        try (MessageBufferPacker p = MessagePack.newDefaultBufferPacker()) {
            if (message instanceof Message.Hello) {
                Message.Hello m = (Message.Hello) message;
                boolean held = m.heldSha256 != null;  // optional: left out, never nil
                header(p, m, held ? 7 : 5);
                str(p, "device_id", m.deviceId);
                str(p, "base_model_hash", m.baseModelHash);
                p.packString("adapter_dim").packLong(m.adapterDim);
                p.packString("num_examples").packLong(m.numExamples);
                p.packString("mem_budget_bytes");
                if (m.memBudgetBytes == null) {
                    p.packNil();
                } else {
                    p.packLong(m.memBudgetBytes);
                }
                if (held) {
                    p.packString("held_version").packLong(m.heldVersion);
                    str(p, "held_sha256", m.heldSha256);
                }
            } else if (message instanceof Message.Welcome) {
                Message.Welcome m = (Message.Welcome) message;
                header(p, m, 2);
                str(p, "job_id", m.jobId);
                str(p, "device_id", m.deviceId);
            } else if (message instanceof Message.Task) {
                Message.Task m = (Message.Task) message;
                header(p, m, m.history == null ? 11 : 12);
                str(p, "task_id", m.taskId);
                str(p, "job_id", m.jobId);
                p.packString("round").packLong(m.round);
                p.packString("global_version").packLong(m.globalVersion);
                str(p, "base_model_hash", m.baseModelHash);
                bin(p, "adapter", m.adapter);
                str(p, "adapter_sha256", m.adapterSha256);
                str(p, "method", m.method);
                p.packString("hparams").packMapHeader(m.hparams.size());
                for (Map.Entry<String, Object> e : m.hparams.entrySet()) {
                    p.packString(e.getKey());
                    Object v = e.getValue();
                    if (v instanceof String) {
                        p.packString((String) v);
                    } else if (v instanceof List) {  // tensor_scales, as it came
                        packRanges(p, (List<?>) v);
                    } else if (v instanceof Double) {
                        p.packDouble((Double) v);
                    } else if (v instanceof BigInteger) {
                        p.packBigInteger((BigInteger) v);
                    } else {
                        p.packLong(((Number) v).longValue());
                    }
                }
                p.packString("deadline_s").packDouble(m.deadlineS);
                bin(p, "reference", m.reference);
                if (m.history != null) {
                    history(p, m.history);
                }
            } else if (message instanceof Message.Update) {
                Message.Update m = (Message.Update) message;
                header(p, m, 12);
                str(p, "task_id", m.taskId);
                str(p, "job_id", m.jobId);
                p.packString("round").packLong(m.round);
                p.packString("global_version").packLong(m.globalVersion);
                p.packString("seeds").packArrayHeader(m.seeds.length);
                for (long s : m.seeds) {
                    p.packLong(s);
                }
                p.packString("coefs").packArrayHeader(m.coefs.length);
                for (double c : m.coefs) {
                    p.packDouble(c);
                }
                p.packString("scale").packDouble(m.scale);
                bin(p, "dense", m.dense);
                p.packString("num_examples").packLong(m.numExamples);
                p.packString("loss_before").packDouble(m.lossBefore);
                p.packString("loss_after").packDouble(m.lossAfter);
                p.packString("peak_rss_bytes").packLong(m.peakRssBytes);
            } else if (message instanceof Message.Decline) {
                Message.Decline m = (Message.Decline) message;
                header(p, m, 3);
                str(p, "task_id", m.taskId);
                str(p, "code", m.code);
                str(p, "reason", m.reason);
            } else if (message instanceof Message.Ack) {
                Message.Ack m = (Message.Ack) message;
                header(p, m, 3);
                str(p, "task_id", m.taskId);
                p.packString("accepted").packBoolean(m.accepted);
                str(p, "reason", m.reason);
            } else if (message instanceof Message.Done) {
                Message.Done m = (Message.Done) message;
                header(p, m, 2);
                str(p, "job_id", m.jobId);
                str(p, "reason", m.reason);
            } else {
                Message.Error m = (Message.Error) message;
                header(p, m, 2);
                str(p, "code", m.code);
                str(p, "message", m.message);
            }
            return p.toByteArray();
        } catch (IOException e) {
            throw new IllegalStateException("packing into memory cannot fail", e);
        }
    }

    private static void history(MessageBufferPacker p, List<Message.HistoryStep> steps) throws IOException {
        p.packString("history").packArrayHeader(steps.size());
        for (Message.HistoryStep step : steps) {
            p.packMapHeader(3 + (step.sums == null ? 2 : 1) + (step.span == null ? 0 : 2));
            p.packString("version").packLong(step.version);
            if (step.sums == null) {
                p.packString("seeds").packArrayHeader(step.seeds.length);
                for (long seed : step.seeds) {
                    p.packLong(seed);
                }
                p.packString("coefs").packArrayHeader(step.coefs.length);
                for (double c : step.coefs) {
                    p.packDouble(c);  // float 64 always: a sum rounded to float 32 would not replay
                }
            } else {
                bin(p, "sums", step.sums);
            }
            p.packString("shrink").packDouble(step.shrink);
            p.packString("block").packArrayHeader(step.block.length);
            for (long b : step.block) {
                p.packLong(b);
            }
            if (step.span != null) {
                p.packString("span_start").packLong(step.spanStart);
                bin(p, "span", step.span);
            }
        }
    }

    private static void header(MessageBufferPacker p, Message m, int fields) throws IOException {
        p.packMapHeader(fields + 2);
        p.packString("type").packString(m.type());
        p.packString("v").packInt(Message.PROTOCOL_VERSION);
    }

    private static void str(MessageBufferPacker p, String key, String value) throws IOException {
        p.packString(key).packString(value);
    }

    private static void bin(MessageBufferPacker p, String key, byte[] value) throws IOException {
        p.packString(key).packBinaryHeader(value.length);
        p.writePayload(value);
    }

    // ---- decoding ----

    private static final Map<String, List<String>> FIELDS = new LinkedHashMap<>();

    static {
        FIELDS.put("hello", List.of("device_id", "base_model_hash", "adapter_dim", "num_examples", "mem_budget_bytes"));
        FIELDS.put("welcome", List.of("job_id", "device_id"));
        FIELDS.put("task", List.of("task_id", "job_id", "round", "global_version", "base_model_hash", "adapter",
                "adapter_sha256", "method", "hparams", "deadline_s", "reference"));
        FIELDS.put("update", List.of("task_id", "job_id", "round", "global_version", "seeds", "coefs", "scale", "dense",
                "num_examples", "loss_before", "loss_after", "peak_rss_bytes"));
        FIELDS.put("decline", List.of("task_id", "code", "reason"));
        FIELDS.put("ack", List.of("task_id", "accepted", "reason"));
        FIELDS.put("done", List.of("job_id", "reason"));
        FIELDS.put("error", List.of("code", "message"));
    }

    /** Fields a sender may leave out (docs/protocol.md: the downlink in seed form); never nil when sent. */
    private static final Map<String, List<String>> OPTIONAL = Map.of(
            "hello", List.of("held_version", "held_sha256"), "task", List.of("history"));
    /** A history version's keys (docs/protocol.md): these, then `seeds` and `coefs` or `sums`, then optionally
     * `span_start` and `span` (fwdfed/history.py FORMS). */
    private static final List<String> STEP_FIELDS = List.of("version", "shrink", "block");
    private static final List<List<String>> STEP_SUMS = List.of(List.of("seeds", "coefs"), List.of("sums"));
    private static final List<String> STEP_SPAN = List.of("span_start", "span");
    private static final long MAX_PACKED_SUMS = 8L * SeedPool.MAX_SIZE;
    private static final int MAX_HISTORY = 1024;

    /** The message types of the protocol, in docs/protocol.md's order. */
    public static Set<String> types() {
        return FIELDS.keySet();
    }

    /** The fields of a message type (without `type` and `v`). */
    public static List<String> fields(String type) {
        return FIELDS.get(type);
    }

    /** Parse and check one binary frame; ProtocolException names the first rule it breaks. */
    public static Message decode(byte[] frame) throws ProtocolException {
        if (frame.length > Message.MAX_FRAME_BYTES) {
            throw new ProtocolException("frame of " + frame.length + " bytes exceeds the " + Message.MAX_FRAME_BYTES
                    + "-byte limit");
        }
        Object value = BoundedUnpacker.readFrame(frame);
        if (!(value instanceof Map)) {
            throw new ProtocolException("a message must be a msgpack map");
        }
        @SuppressWarnings("unchecked")
        Map<Object, Object> data = new LinkedHashMap<>((Map<Object, Object>) value);
        Object kind = data.remove("type");
        Object version = data.remove("v");
        if (!isVersionOne(version)) {
            throw new ProtocolException("protocol version " + version + " is not supported (this side speaks "
                    + Message.PROTOCOL_VERSION + ")");
        }
        if (!(kind instanceof String) || !FIELDS.containsKey(kind)) {
            throw new ProtocolException("unknown message type " + kind);
        }
        String type = (String) kind;
        List<String> names = FIELDS.get(type);
        List<String> optional = OPTIONAL.getOrDefault(type, List.of());
        Set<String> extra = new LinkedHashSet<>();
        for (Object key : data.keySet()) {
            if (!(key instanceof String) || !(names.contains(key) || optional.contains(key))) {
                extra.add(key instanceof String ? (String) key : Arrays.toString((byte[]) key));
            }
        }
        if (!extra.isEmpty()) {
            throw new ProtocolException(type + ": unexpected fields " + extra);
        }
        for (String name : names) {
            if (!data.containsKey(name)) {
                throw new ProtocolException(type + ": missing field '" + name + "'");
            }
            String reason = check(type, name, data.get(name));
            if (reason != null) {
                throw new ProtocolException(type + "." + name + " must be " + reason);
            }
        }
        for (String name : optional) {
            if (data.containsKey(name)) {
                String reason = check(type, name, data.get(name));
                if (reason != null) {
                    throw new ProtocolException(type + "." + name + " must be " + reason);
                }
            }
        }
        if (type.equals("hello") && data.containsKey("held_version") != data.containsKey("held_sha256")) {
            throw new ProtocolException("hello: held_version and held_sha256 come together or not at all");
        }
        if (type.equals("task") && data.containsKey("history") && ((byte[]) data.get("adapter")).length > 0) {
            throw new ProtocolException("task: a task with a history carries no adapter");
        }
        return build(type, data);
    }

    /** The version is a msgpack int equal to 1: neither 1.0 nor true (as in fwdfed/protocol.py). */
    private static boolean isVersionOne(Object v) {
        return v instanceof Long && (Long) v == 1L;
    }

    // Field checks: null when the value is valid, otherwise what it must be.
    private static String check(String type, String name, Object v) {
        switch (name) {
            case "device_id":
            case "job_id":
            case "task_id":
                return text(v, Message.MAX_ID);
            case "base_model_hash":
            case "adapter_sha256":
                return text(v, 64);
            case "adapter_dim":
            case "num_examples":
            case "round":
            case "global_version":
            case "held_version":
                return integer(v, 0, COUNT_MAX);
            case "held_sha256":
                return text(v, 64);
            case "history":
                return history(v);
            case "mem_budget_bytes":
                return v == null ? null : integer(v, 0, BYTES_COUNT_MAX);
            case "peak_rss_bytes":
                return integer(v, 0, BYTES_COUNT_MAX);
            case "adapter":
            case "reference":
            case "dense":
                return v instanceof byte[] && ((byte[]) v).length <= Message.MAX_FRAME_BYTES ? null
                        : "bytes, at most " + Message.MAX_FRAME_BYTES;
            case "method":
                return text(v, 32);
            case "hparams":
                return hparams(v);
            case "deadline_s":
            case "scale":
                return finite(v, true);
            case "loss_before":
            case "loss_after":
                return finite(v, false);
            case "seeds":
                return integerList(v, 0, SEED_LIMIT_MINUS_1, Message.MAX_PAIRS);
            case "coefs":
                return finiteList(v, Message.MAX_PAIRS);
            case "accepted":
                return v instanceof Boolean ? null : "a boolean";
            case "reason":
            case "message":
                return text(v, Message.MAX_TEXT);
            case "code":
                return text(v, 64);
            default:
                throw new IllegalStateException(type + "." + name + " has no check");
        }
    }

    /** Python's len() of a str counts code points, not UTF-16 units. */
    private static int characters(String s) {
        return s.codePointCount(0, s.length());
    }

    private static String text(Object v, int limit) {
        return v instanceof String && characters((String) v) <= limit ? null
                : "a string of at most " + limit + " characters";
    }

    private static String integer(Object v, long lo, long hi) {
        return v instanceof Long && lo <= (Long) v && (Long) v <= hi ? null
                : "an integer in [" + lo + ", " + hi + "]";
    }

    private static boolean isFiniteNumber(Object v) {
        if (v instanceof Long || v instanceof BigInteger) {
            return true;
        }
        return v instanceof Double && Double.isFinite((Double) v);
    }

    private static String finite(Object v, boolean nonNegative) {
        boolean ok = isFiniteNumber(v) && (!nonNegative || asDouble(v) >= 0);
        return ok ? null : nonNegative ? "a finite non-negative number" : "a finite number";
    }

    /** A task's per-tensor scales (docs/directions.md), which this device declines to train with (TaskTrainer). */
    static final String TENSOR_SCALES = "tensor_scales";
    static final int MAX_SCALE_RANGES = 4096;

    private static void packRanges(MessageBufferPacker p, List<?> ranges) throws IOException {
        p.packArrayHeader(ranges.size());
        for (Object range : ranges) {
            p.packArrayHeader(3);
            for (Object n : (List<?>) range) {
                if (n instanceof Double) {
                    p.packDouble((Double) n);
                } else if (n instanceof BigInteger) {
                    p.packBigInteger((BigInteger) n);
                } else {
                    p.packLong(((Number) n).longValue());
                }
            }
        }
    }

    private static boolean scaleRanges(Object v) {
        if (!(v instanceof List) || ((List<?>) v).size() > MAX_SCALE_RANGES) {
            return false;
        }
        for (Object range : (List<?>) v) {
            if (!(range instanceof List) || ((List<?>) range).size() != 3
                    || !((List<?>) range).stream().allMatch(Codec::isFiniteNumber)) {
                return false;
            }
        }
        return true;
    }

    private static String integerList(Object v, long lo, long hi, int limit) {
        if (!(v instanceof List) || ((List<?>) v).size() > limit) {
            return "a list of at most " + limit + " integers";
        }
        for (Object x : (List<?>) v) {
            if (integer(x, lo, hi) != null) {
                return "a list of integers in [" + lo + ", " + hi + "]";
            }
        }
        return null;
    }

    private static String finiteList(Object v, int limit) {
        if (!(v instanceof List) || ((List<?>) v).size() > limit) {
            return "a list of at most " + limit + " numbers";
        }
        for (Object x : (List<?>) v) {
            if (!isFiniteNumber(x)) {
                return "a list of finite numbers";
            }
        }
        return null;
    }

    private static String history(Object v) {
        if (!(v instanceof List) || ((List<?>) v).size() > MAX_HISTORY) {
            return "a list of at most " + MAX_HISTORY + " versions";
        }
        for (Object step : (List<?>) v) {
            if (!(step instanceof Map) || !isStepForm(((Map<?, ?>) step).keySet())) {
                return "a list of maps of exactly version, shrink, block, either seeds and coefs or sums, and "
                        + "optionally span_start and span";
            }
            Map<?, ?> m = (Map<?, ?>) step;
            Map<String, String> reasons = new LinkedHashMap<>();
            reasons.put("version", integer(m.get("version"), 0, COUNT_MAX));  // in fwdfed/protocol.py's order
            if (m.containsKey("sums")) {
                reasons.put("sums", packed(m.get("sums"), 8, MAX_PACKED_SUMS));
            } else {
                reasons.put("seeds", integerList(m.get("seeds"), 0, SEED_LIMIT_MINUS_1, Message.MAX_PAIRS));
                reasons.put("coefs", finiteList(m.get("coefs"), Message.MAX_PAIRS));
            }
            reasons.put("shrink", finite(m.get("shrink"), false));
            reasons.put("block", integerList(m.get("block"), 0, COUNT_MAX, 2));
            if (m.containsKey("span")) {
                reasons.put("span_start", integer(m.get("span_start"), 0, COUNT_MAX));
                reasons.put("span", packed(m.get("span"), 4, Message.MAX_FRAME_BYTES));
            }
            for (Map.Entry<String, String> reason : reasons.entrySet()) {
                if (reason.getValue() != null) {
                    return "a list of versions whose " + reason.getKey() + " is " + reason.getValue();
                }
            }
            int block = ((List<?>) m.get("block")).size();
            boolean counts = m.containsKey("sums")
                    || ((List<?>) m.get("seeds")).size() == ((List<?>) m.get("coefs")).size();
            if (!counts || (block != 0 && block != 2)) {
                return "a list of versions with as many coefs as seeds and a block of 0 or 2 integers";
            }
        }
        return null;
    }

    private static boolean isStepForm(Set<?> keys) {
        for (List<String> sums : STEP_SUMS) {
            for (boolean span : new boolean[] {false, true}) {
                Set<String> form = new LinkedHashSet<>(STEP_FIELDS);
                form.addAll(sums);
                if (span) {
                    form.addAll(STEP_SPAN);
                }
                if (keys.equals(form)) {
                    return true;
                }
            }
        }
        return false;
    }

    /** Bytes of whole `width`-byte values, at least one: a history's packed sums, a span's float32 values. */
    private static String packed(Object v, int width, long limit) {
        boolean ok = v instanceof byte[] && ((byte[]) v).length > 0 && ((byte[]) v).length <= limit
                && ((byte[]) v).length % width == 0;
        return ok ? null : "bytes of 1 to " + (limit / width) + " values of " + width + " bytes";
    }

    private static List<Message.HistoryStep> steps(Object v) {
        if (v == null) {
            return null;
        }
        List<Message.HistoryStep> steps = new java.util.ArrayList<>();
        for (Object step : (List<?>) v) {
            Map<?, ?> m = (Map<?, ?>) step;
            long[] seeds = new long[0];
            double[] coefs = new double[0];
            if (!m.containsKey("sums")) {
                List<?> seedList = (List<?>) m.get("seeds");
                List<?> coefList = (List<?>) m.get("coefs");
                seeds = new long[seedList.size()];
                coefs = new double[coefList.size()];
                for (int i = 0; i < seeds.length; i++) {
                    seeds[i] = (Long) seedList.get(i);
                    coefs[i] = asDouble(coefList.get(i));
                }
            }
            List<?> blockList = (List<?>) m.get("block");
            long[] block = new long[blockList.size()];
            for (int i = 0; i < block.length; i++) {
                block[i] = (Long) blockList.get(i);
            }
            steps.add(new Message.HistoryStep((Long) m.get("version"), seeds, coefs, (byte[]) m.get("sums"),
                    asDouble(m.get("shrink")), block, m.containsKey("span") ? (Long) m.get("span_start") : 0,
                    (byte[]) m.get("span")));
        }
        return steps;
    }

    private static String hparams(Object v) {
        if (!(v instanceof Map) || ((Map<?, ?>) v).size() > 64) {
            return "a map of at most 64 entries";
        }
        for (Map.Entry<?, ?> e : ((Map<?, ?>) v).entrySet()) {
            if (!(e.getKey() instanceof String) || characters((String) e.getKey()) > 64) {
                return "a map with string keys";
            }
            Object x = e.getValue();
            if (TENSOR_SCALES.equals(e.getKey())) {  // the one list (fwdfed/protocol.py's _hparams)
                if (!scaleRanges(x)) {
                    return "a map whose tensor_scales is a list of at most " + MAX_SCALE_RANGES
                            + " lists of 3 finite numbers";
                }
                continue;
            }
            boolean shortText = x instanceof String && characters((String) x) <= 64;
            if (!shortText && !isFiniteNumber(x)) {
                return "a map of finite numbers or short strings";
            }
        }
        return null;
    }

    static double asDouble(Object v) {
        if (v instanceof BigInteger) {
            return ((BigInteger) v).doubleValue();
        }
        return ((Number) v).doubleValue();
    }

    private static String s(Map<Object, Object> d, String k) {
        return (String) d.get(k);
    }

    private static long l(Map<Object, Object> d, String k) {
        return (Long) d.get(k);
    }

    private static double f(Map<Object, Object> d, String k) {
        return asDouble(d.get(k));
    }

    private static Message build(String type, Map<Object, Object> d) throws ProtocolException {
        switch (type) {
            case "hello":
                return new Message.Hello(s(d, "device_id"), s(d, "base_model_hash"), l(d, "adapter_dim"),
                        l(d, "num_examples"), (Long) d.get("mem_budget_bytes"), (Long) d.get("held_version"),
                        s(d, "held_sha256"));
            case "welcome":
                return new Message.Welcome(s(d, "job_id"), s(d, "device_id"));
            case "task": {
                Map<String, Object> hparams = new LinkedHashMap<>();
                for (Map.Entry<?, ?> e : ((Map<?, ?>) d.get("hparams")).entrySet()) {
                    hparams.put((String) e.getKey(), e.getValue());
                }
                return new Message.Task(s(d, "task_id"), s(d, "job_id"), l(d, "round"), l(d, "global_version"),
                        s(d, "base_model_hash"), (byte[]) d.get("adapter"), s(d, "adapter_sha256"), s(d, "method"),
                        hparams, f(d, "deadline_s"), (byte[]) d.get("reference"), steps(d.get("history")));
            }
            case "update": {
                List<?> seedList = (List<?>) d.get("seeds");
                List<?> coefList = (List<?>) d.get("coefs");
                if (seedList.size() != coefList.size()) {
                    throw new ProtocolException("update: seeds and coefs must have the same length");
                }
                long[] seeds = new long[seedList.size()];
                double[] coefs = new double[coefList.size()];
                for (int i = 0; i < seeds.length; i++) {
                    seeds[i] = (Long) seedList.get(i);
                    coefs[i] = asDouble(coefList.get(i));
                }
                return new Message.Update(s(d, "task_id"), s(d, "job_id"), l(d, "round"), l(d, "global_version"),
                        seeds, coefs, f(d, "scale"), (byte[]) d.get("dense"), l(d, "num_examples"),
                        f(d, "loss_before"), f(d, "loss_after"), l(d, "peak_rss_bytes"));
            }
            case "decline":
                return new Message.Decline(s(d, "task_id"), s(d, "code"), s(d, "reason"));
            case "ack":
                return new Message.Ack(s(d, "task_id"), (Boolean) d.get("accepted"), s(d, "reason"));
            case "done":
                return new Message.Done(s(d, "job_id"), s(d, "reason"));
            default:
                return new Message.Error(s(d, "code"), s(d, "message"));
        }
    }
}
