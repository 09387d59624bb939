package org.fwdfed.core;

import static org.fwdfed.core.UnitTests.check;
import static org.fwdfed.core.UnitTests.equal;

import java.util.HashMap;
import java.util.HashSet;
import java.util.Map;
import java.util.Set;

/** FedKSeed's seed pool on the Java device: draws stay in the pool, a task's pool is checked as Python checks it. */
final class PoolTests {
    private static final String KEY = "0ad2a791eb8384cc";

    private static Map<String, Object> hparams(Object size, Object key) {
        Map<String, Object> h = new HashMap<>();
        if (size != null) {
            h.put("seed_pool", size);
        }
        if (key != null) {
            h.put("seed_pool_key", key);
        }
        return h;
    }

    static void testEverySeedDrawnIsOneOfThePoolAndTheDrawsCoverIt() {
        long[] pool = SeedPool.fromHparams(new Hparams(hparams(8L, KEY)));
        Set<Long> members = new HashSet<>();
        for (long s : pool) {
            members.add(s);
        }
        SeedSource seeds = new SeedPool(pool, new SeedStream(0, 1, 0, "emu-0"));
        Set<Long> drawn = new HashSet<>();
        for (long s : seeds.next(400)) {
            check(members.contains(s), "seed " + s + " is not one of the pool");
            drawn.add(s);
        }
        equal(8, drawn.size(), "seeds of the pool drawn in 400 draws");
    }

    static void testATaskWithoutAPoolLeavesSeedsFree() {
        check(SeedPool.fromHparams(new Hparams(hparams(null, null))) == null, "no pool");
    }

    private static void refused(Map<String, Object> h, String message) {
        try {
            SeedPool.fromHparams(new Hparams(h));
        } catch (IllegalArgumentException e) {
            check(e.getMessage().contains(message), e.getMessage() + " should say " + message);
            return;
        }
        throw new AssertionError("accepted " + h);
    }

    static void testAnUnusablePoolIsRefusedAsThePythonDeviceRefusesIt() {
        refused(hparams(8L, null), "seed_pool_key must be 16 lowercase hex digits");
        refused(hparams(null, KEY), "seed_pool is missing");
        refused(hparams(8L, KEY.toUpperCase()), "seed_pool_key must be 16 lowercase hex");
        refused(hparams(8L, "ffffffffffffffff"), "below 2^63");
        refused(hparams(8L, 12345L), "seed_pool_key must be");
        refused(hparams(0L, KEY), "a seed pool holds 1 to 1048576 seeds, got 0");
        refused(hparams((long) SeedPool.MAX_SIZE + 1, KEY), "a seed pool holds 1 to");
        refused(hparams("many", KEY), "seed_pool must be an integer");
    }
}
