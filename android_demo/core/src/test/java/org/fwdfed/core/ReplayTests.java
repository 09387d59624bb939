package org.fwdfed.core;

import static org.fwdfed.core.UnitTests.check;
import static org.fwdfed.core.UnitTests.equal;
import static org.fwdfed.core.UnitTests.raises;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.Arrays;
import java.util.List;

/**
 * The downlink's replay at the check a device makes (docs/protocol.md, Downlink in seed form): packed sums are the
 * pool's seeds in index order, zero sums no terms; a span sets its values; a corrupted version (a packed sum, a
 * span value) fails the task's sha256, and one that cannot apply is refused (DeviceClient then reconnects for the
 * dense adapter). docs/golden/replay.json checks the bits (test_java_core.py).
 */
final class ReplayTests {
    private static final long[] POOL = SeedPool.seeds(0x0123456789abcdefL, 4);
    private static final float[] W = {0.5f, -0.25f, 1e-3f, 3f, -7.5f, 0.1f, 0f, -0f};

    private static byte[] doubles(double... values) {
        ByteBuffer b = ByteBuffer.allocate(8 * values.length).order(ByteOrder.LITTLE_ENDIAN);
        for (double v : values) {
            b.putDouble(v);
        }
        return b.array();
    }

    private static Message.HistoryStep packed(byte[] sums, byte[] span) {
        return new Message.HistoryStep(1, null, null, sums, -1e-4 / 3, new long[] {1, 7}, 6, span);
    }

    private static String sha(float[] w) {
        return Replay.sha256(Replay.bytes(w));
    }

    static void testPackedSumsAreThePoolsSeedsInIndexOrderAndZeroSumsNoTerms() {
        byte[] sums = doubles(0.0, 1e-3 / 3, -0.0, -2.5e-4);
        Message.HistoryStep arrays = new Message.HistoryStep(1, new long[] {POOL[1], POOL[3]},
                new double[] {1e-3 / 3, -2.5e-4}, -1e-4 / 3, new long[] {1, 7});
        float[] expected = Replay.replay(W, List.of(arrays), Directions.RADEMACHER);
        float[] got = Replay.replay(W, List.of(packed(sums, null)), Directions.RADEMACHER, POOL);
        check(Arrays.equals(Replay.bytes(expected), Replay.bytes(got)), "packed sums replay as their seeds do");
        byte[] span = Replay.bytes(new float[] {-0f, 2f});
        float[] spanned = Replay.replay(W, List.of(packed(sums, span)), Directions.RADEMACHER, POOL);
        equal(Float.floatToRawIntBits(-0f), Float.floatToRawIntBits(spanned[6]), "the span's -0.0, as sent");
        equal(2f, spanned[7], "the span's second value");
        check(Arrays.equals(Arrays.copyOf(Replay.bytes(spanned), 24), Arrays.copyOf(Replay.bytes(got), 24)),
                "the span sets its values alone");
    }

    static void testACorruptedVersionFailsTheTasksSha256() {
        byte[] sums = doubles(0.0, 1e-3 / 3, -0.0, -2.5e-4);
        byte[] span = Replay.bytes(new float[] {0.25f, 2f});
        String task = sha(Replay.replay(W, List.of(packed(sums, span)), Directions.RADEMACHER, POOL));
        byte[] offSum = sums.clone();
        offSum[8 + 6] ^= 0x08;  // the top bit of the mantissa of pool[1]'s sum: half of it off
        byte[] offSpan = span.clone();
        offSpan[0] ^= 1;
        for (Message.HistoryStep corrupted : List.of(packed(offSum, span), packed(sums, offSpan))) {
            check(!sha(Replay.replay(W, List.of(corrupted), Directions.RADEMACHER, POOL)).equals(task),
                    "a corrupted version does not give the task's sha256");
        }
    }

    static void testAVersionThatCannotApplyIsRefused() {
        byte[] sums = doubles(0.0, 1e-3, 0.0, 0.0);
        raises(IllegalArgumentException.class, "without a seed pool",
                () -> Replay.replay(W, List.of(packed(sums, null)), Directions.RADEMACHER, null));
        raises(IllegalArgumentException.class, "not 8 x the pool's 3",
                () -> Replay.replay(W, List.of(packed(sums, null)), Directions.RADEMACHER, Arrays.copyOf(POOL, 3)));
        raises(IllegalArgumentException.class, "not all finite", () -> Replay.replay(W,
                List.of(packed(doubles(0.0, Double.NaN, 0.0, 0.0), null)), Directions.RADEMACHER, POOL));
        raises(IllegalArgumentException.class, "span [6, 9) does not fit the adapter's 8 values", () -> Replay.replay(
                W, List.of(packed(sums, Replay.bytes(new float[3]))), Directions.RADEMACHER, POOL));
        long[] twice = {POOL[0], POOL[1], POOL[0], POOL[3]};
        raises(IllegalArgumentException.class, "twice", () -> Replay.replay(W,
                List.of(packed(doubles(1.0, 0.0, 1.0, 0.0), null)), Directions.RADEMACHER, twice));
    }
}
