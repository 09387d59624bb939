package org.fwdfed.core;

import java.nio.charset.StandardCharsets;
import java.util.zip.CRC32;

/**
 * The Java device's seeds for one task: a SplitMix64 stream keyed by (device seed, round, wave,
 * crc32(device id)), the same inputs from which the Python device seeds numpy's generator, so
 * that seeds differ across devices, rounds and waves and repeat when a task is trained again.
 *
 * The seeds are not numpy's (PCG64 is not worth reimplementing here): a Java device's update
 * is compared with the Python device's by giving the Python code the Java device's seeds
 * (tests/android_demo, and android_demo/README.md).
 *
 * key = mix64(mix64(mix64(mix64(seed) ^ round) ^ wave) ^ crc32(id)) with the top bit cleared;
 * seed_i = word(key, i) >>> 1, i = 0, 1, ...
 */
public final class SeedStream implements SeedSource {
    private final long key;
    private long counter;

    public SeedStream(long deviceSeed, long round, long wave, String deviceId) {
        CRC32 crc = new CRC32();
        crc.update(deviceId.getBytes(StandardCharsets.UTF_8));
        long k = Directions.mix64(deviceSeed);
        k = Directions.mix64(k ^ round);
        k = Directions.mix64(k ^ wave);
        k = Directions.mix64(k ^ crc.getValue());
        this.key = k & Long.MAX_VALUE;
    }

    @Override
    public long next() {
        return Directions.word(key, counter++) >>> 1;
    }
}
