package org.fwdfed.core;

import static org.fwdfed.core.UnitTests.check;
import static org.fwdfed.core.UnitTests.equal;
import static org.fwdfed.core.UnitTests.raises;

import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.Map;

import org.msgpack.core.MessageBufferPacker;
import org.msgpack.core.MessagePack;

/** The protocol codec: every message round-trips; broken frames are refused with the rule they break. */
final class CodecTests {
    private CodecTests() {}

    static Message.Task task(Map<String, Object> hparams) {
        byte[] adapter = Manifest.Float32.toBytes(new float[] {1.0f, -2.5f, 0.0f});
        return new Message.Task("task-1", "job-1", 3, 2, "abc", adapter, TaskTrainer.sha256Hex(adapter), "mezo",
                hparams, 12.5, new byte[0]);
    }

    static Map<String, Object> hparams() {
        Map<String, Object> h = new LinkedHashMap<>();
        h.put("lr", 1e-3);
        h.put("local_steps", 5L);
        h.put("kind", "rademacher");
        return h;
    }

    static void testEveryMessageRoundTrips() throws Exception {
        Message[] messages = {
            new Message.Hello("dev-é😀", "h", 8960, 553, null),
            new Message.Hello("dev", "h", 1, 2, 1_500_000_000L),
            new Message.Welcome("job", "dev"),
            task(hparams()),
            new Message.Update("t", "j", 1, 0, new long[] {0, Long.MAX_VALUE, 42}, new double[] {-1e-3, 0.5, 7},
                    0.99, new byte[0], 100, 2.5, 2.25, 123456789),
            new Message.Ack("t", false, "duplicate: this task already has an accepted update"),
            new Message.Done("j", "finished"),
            new Message.Error("revoked", "the credential was revoked"),
        };
        for (Message m : messages) {
            byte[] frame = Codec.encode(m);
            Message back = Codec.decode(frame);
            equal(m.type(), back.type(), "type");
            check(Arrays.equals(frame, Codec.encode(back)), m.type() + " re-encodes to the same bytes");
        }
        Message.Update u = (Message.Update) Codec.decode(Codec.encode(messages[4]));
        check(Arrays.equals(u.seeds, new long[] {0, Long.MAX_VALUE, 42}), "seeds survive");
        equal("duplicate", ((Message.Ack) messages[5]).code(), "an ack's refusal code");
    }

    /** A frame built field by field, to break one rule at a time. */
    static byte[] frame(Object... keysAndValues) throws Exception {
        try (MessageBufferPacker p = MessagePack.newDefaultBufferPacker()) {
            p.packMapHeader(keysAndValues.length / 2);
            for (Object v : keysAndValues) {
                pack(p, v);
            }
            return p.toByteArray();
        }
    }

    private static void pack(MessageBufferPacker p, Object v) throws Exception {
        if (v == null) {
            p.packNil();
        } else if (v instanceof String) {
            p.packString((String) v);
        } else if (v instanceof Long || v instanceof Integer) {
            p.packLong(((Number) v).longValue());
        } else if (v instanceof Double) {
            p.packDouble((Double) v);
        } else if (v instanceof Boolean) {
            p.packBoolean((Boolean) v);
        } else if (v instanceof byte[]) {
            p.packBinaryHeader(((byte[]) v).length).writePayload((byte[]) v);
        } else if (v instanceof Object[]) {
            Object[] a = (Object[]) v;
            p.packArrayHeader(a.length);
            for (Object x : a) {
                pack(p, x);
            }
        } else {
            throw new IllegalArgumentException(String.valueOf(v));
        }
    }

    static Object[] ack(Object... replace) {
        Object[] base = {"type", "ack", "v", 1, "task_id", "t", "accepted", true, "reason", ""};
        Object[] out = Arrays.copyOf(base, base.length);
        for (int i = 0; i < replace.length; i += 2) {
            for (int j = 0; j < out.length; j += 2) {
                if (out[j].equals(replace[i])) {
                    out[j + 1] = replace[i + 1];
                }
            }
        }
        return out;
    }

    static void testBrokenFramesAreRefusedWithTheirRule() throws Exception {
        Codec.decode(frame(ack()));  // the unbroken frame passes
        raises(ProtocolException.class, "unexpected fields", () -> Codec.decode(frame(concat(ack(), "extra", 1))));
        raises(ProtocolException.class, "missing field 'reason'",
                () -> Codec.decode(frame("type", "ack", "v", 1, "task_id", "t", "accepted", true)));
        raises(ProtocolException.class, "accepted must be a boolean", () -> Codec.decode(frame(ack("accepted", 1))));
        raises(ProtocolException.class, "protocol version", () -> Codec.decode(frame(ack("v", 2))));
        raises(ProtocolException.class, "unknown message type", () -> Codec.decode(frame(ack("type", "hack"))));
        raises(ProtocolException.class, "task_id must be a string of at most 128",
                () -> Codec.decode(frame(ack("task_id", "x".repeat(129)))));
        // 128 characters that are 256 UTF-16 units: Python counts characters.
        Codec.decode(frame(ack("task_id", "😀".repeat(128))));
        raises(ProtocolException.class, "a message must be a msgpack map", () -> Codec.decode(new byte[] {(byte) 0x91, 1}));
        raises(ProtocolException.class, "not valid msgpack", () -> Codec.decode(new byte[0]));
        raises(ProtocolException.class, "extra data", () -> Codec.decode(concat(frame(ack()), new byte[] {1})));
        raises(ProtocolException.class, "not UTF-8", () -> Codec.decode(new byte[] {(byte) 0x81, (byte) 0xa1, (byte) 0xff, 1}));
        raises(ProtocolException.class, "not valid msgpack",  // an ext type
                () -> Codec.decode(new byte[] {(byte) 0x81, (byte) 0xa1, 'x', (byte) 0xd4, 1, 0}));
        raises(ProtocolException.class, "must be a finite number",
                () -> Codec.decode(Codec.encode(new Message.Update("t", "j", 1, 0, new long[] {1},
                        new double[] {1}, 1.0, new byte[0], 1, Double.NaN, 1, 1))));
        raises(ProtocolException.class, "coefs must be a list of finite numbers",
                () -> Codec.decode(Codec.encode(new Message.Update("t", "j", 1, 0, new long[] {1},
                        new double[] {Double.POSITIVE_INFINITY}, 1.0, new byte[0], 1, 1, 1, 1))));
        raises(ProtocolException.class, "same length", () -> Codec.decode(Codec.encode(new Message.Update("t", "j", 1,
                0, new long[] {1, 2}, new double[] {1}, 1.0, new byte[0], 1, 1, 1, 1))));
        raises(ProtocolException.class, "seeds must be a list of integers in [0",
                () -> Codec.decode(Codec.encode(new Message.Update("t", "j", 1, 0, new long[] {-1},
                        new double[] {1}, 1.0, new byte[0], 1, 1, 1, 1))));
        raises(ProtocolException.class, "scale must be a finite non-negative",
                () -> Codec.decode(Codec.encode(new Message.Update("t", "j", 1, 0, new long[0], new double[0], -0.5,
                        new byte[0], 1, 1, 1, 1))));
        Map<String, Object> bad = hparams();
        bad.put("lr", "x".repeat(65));
        raises(ProtocolException.class, "hparams must be a map of finite numbers or short strings",
                () -> Codec.decode(Codec.encode(task(bad))));
        Map<String, Object> many = new LinkedHashMap<>();
        for (int i = 0; i < 65; i++) {
            many.put("k" + i, (long) i);
        }
        raises(ProtocolException.class, "at most 64 entries", () -> Codec.decode(Codec.encode(task(many))));
        // The version is an int: msgpack's 1.0 and true are refused, as fwdfed/protocol.py refuses them.
        raises(ProtocolException.class, "protocol version 1.0 is not supported",
                () -> Codec.decode(frame(ack("v", 1.0))));
        raises(ProtocolException.class, "protocol version true is not supported",
                () -> Codec.decode(frame(ack("v", true))));
    }

    static void testHostileLengthsAreRefusedBeforeAllocating() throws Exception {
        // A task whose adapter claims 2 GiB - 1 with 3 bytes behind it: refused from the header alone.
        byte[] bin32 = {(byte) 0x81, (byte) 0xa7, 'a', 'd', 'a', 'p', 't', 'e', 'r', (byte) 0xc6,
            (byte) 0x7f, (byte) 0xff, (byte) 0xff, (byte) 0xff, 1, 2, 3};
        raises(ProtocolException.class, "is more than the frame holds", () -> Codec.decode(bin32));
        // An array of 2^31 - 1 elements, a map of 2^31 - 1 entries, a string of 2^31 - 1 bytes.
        byte[] array32 = {(byte) 0xdd, (byte) 0x7f, (byte) 0xff, (byte) 0xff, (byte) 0xff, 0};
        raises(ProtocolException.class, "is more than the frame holds", () -> Codec.decode(array32));
        byte[] map32 = {(byte) 0xdf, (byte) 0x7f, (byte) 0xff, (byte) 0xff, (byte) 0xff, 0};
        raises(ProtocolException.class, "is more than the frame holds", () -> Codec.decode(map32));
        byte[] str32 = {(byte) 0xdb, (byte) 0x7f, (byte) 0xff, (byte) 0xff, (byte) 0xff, 'a'};
        raises(ProtocolException.class, "is more than the frame holds", () -> Codec.decode(str32));
        // Past 2^31 - 1 msgpack-core refuses the length itself, before any allocation too.
        byte[] bin4g = {(byte) 0xc6, (byte) 0xff, (byte) 0xff, (byte) 0xff, (byte) 0xff, 1};
        raises(ProtocolException.class, "not valid msgpack", () -> Codec.decode(bin4g));
        // 10 elements claimed, 3 present: refused when the claim is checked.
        byte[] short10 = {(byte) 0x9a, 1, 2, 3};
        raises(ProtocolException.class, "an array of length 10 is more than the frame holds", () -> Codec.decode(short10));
        // Arrays nested past any message's depth.
        byte[] deep = new byte[200];
        Arrays.fill(deep, (byte) 0x91);
        raises(ProtocolException.class, "nested deeper", () -> Codec.decode(deep));
        // A frame past 64 MiB is refused by its length.
        raises(ProtocolException.class, "exceeds", () -> Codec.decode(new byte[Message.MAX_FRAME_BYTES + 1]));
    }

    static byte[] concat(byte[] a, byte[] b) {
        byte[] out = Arrays.copyOf(a, a.length + b.length);
        System.arraycopy(b, 0, out, a.length, b.length);
        return out;
    }

    static Object[] concat(Object[] a, Object... b) {
        Object[] out = Arrays.copyOf(a, a.length + b.length);
        System.arraycopy(b, 0, out, a.length, b.length);
        return out;
    }

    static void testJsonReadsWhatTheBundleWrites() {
        Map<String, Object> m = Json.object(Json.parse(
                "{\"a\": [1, -2.5e3, true, null, \"x\\u00e9\\n\"], \"b\": {}, \"c\": 9223372036854775807}"), "m");
        equal(1L, Json.array(m.get("a"), "a").get(0), "an integer is a Long");
        equal(-2500.0, Json.array(m.get("a"), "a").get(1), "a fraction is a Double");
        equal("x\u00e9\n", Json.array(m.get("a"), "a").get(4), "escapes");
        equal(Long.MAX_VALUE, m.get("c"), "a long");
        raises(IllegalArgumentException.class, "not JSON", () -> Json.parse("{\"a\": 1,}"));
        raises(IllegalArgumentException.class, "trailing", () -> Json.parse("1 2"));
    }
}
