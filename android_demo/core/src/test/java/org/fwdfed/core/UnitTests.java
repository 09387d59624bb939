package org.fwdfed.core;

import java.lang.reflect.InvocationTargetException;
import java.lang.reflect.Method;
import java.lang.reflect.Modifier;
import java.util.Arrays;
import java.util.Comparator;

/**
 * A plain-Java test runner (no test framework to install): every `static void test...()` of the
 * listed classes runs; it prints `PASS Class.test` or `FAIL Class.test: why` per test and a
 * summary line, and exits 1 if any failed. tests/android_demo/test_java_core.py runs it and
 * reports through pytest.
 */
public final class UnitTests {
    static final Class<?>[] CLASSES = {CodecTests.class, TrainingTests.class, DataTests.class, PoolTests.class,
        ReplayTests.class, ProbeTests.class};

    public static void main(String[] args) {
        int passed = 0;
        int failed = 0;
        for (Class<?> c : CLASSES) {
            Method[] methods = c.getDeclaredMethods();
            Arrays.sort(methods, Comparator.comparing(Method::getName));
            for (Method m : methods) {
                if (!m.getName().startsWith("test") || !Modifier.isStatic(m.getModifiers()) || m.getParameterCount() != 0) {
                    continue;
                }
                String name = c.getSimpleName() + "." + m.getName();
                try {
                    m.invoke(null);
                    System.out.println("PASS " + name);
                    passed++;
                } catch (InvocationTargetException e) {
                    Throwable cause = e.getCause();
                    System.out.println("FAIL " + name + ": " + cause);
                    cause.printStackTrace(System.out);
                    failed++;
                } catch (IllegalAccessException e) {
                    System.out.println("FAIL " + name + ": " + e);
                    failed++;
                }
            }
        }
        System.out.println(passed + " passed, " + failed + " failed");
        System.exit(failed == 0 ? 0 : 1);
    }

    // ---- assertions ----

    static void check(boolean condition, String what) {
        if (!condition) {
            throw new AssertionError(what);
        }
    }

    static void equal(Object expected, Object actual, String what) {
        if (expected == null ? actual != null : !expected.equals(actual)) {
            throw new AssertionError(what + ": expected " + expected + ", got " + actual);
        }
    }

    interface Action {
        void run() throws Exception;
    }

    /** `action` must throw `type` with a message containing `words`. */
    static <T extends Throwable> T raises(Class<T> type, String words, Action action) {
        try {
            action.run();
        } catch (Throwable t) {
            if (!type.isInstance(t)) {
                throw new AssertionError("expected " + type.getSimpleName() + ", got " + t, t);
            }
            if (t.getMessage() == null || !t.getMessage().contains(words)) {
                throw new AssertionError("expected a message with '" + words + "', got '" + t.getMessage() + "'");
            }
            return type.cast(t);
        }
        throw new AssertionError("expected " + type.getSimpleName() + " (" + words + "), nothing was thrown");
    }
}
