package org.fwdfed.core;

import java.nio.file.Files;
import java.nio.file.Paths;
import java.security.PublicKey;

/**
 * Test tool: each bundle read as a device given the trust key reads it (Manifest.load with the key), in one JVM
 * (tests/android_demo/test_java_signing.py).
 *
 *   SignatureCheck TRUST_KEY_PEM BUNDLE...
 *
 * Prints `ok BUNDLE` or `error BUNDLE: why` per bundle; a trust key that cannot be used: `key error: why`, exit 1.
 */
public final class SignatureCheck {
    public static void main(String[] argv) throws java.io.IOException {
        PublicKey key;
        try {
            key = BundleSignature.readTrustKey(Files.readAllBytes(Paths.get(argv[0])), argv[0]);
        } catch (BundleException e) {
            System.out.println("key error: " + e.getMessage());
            System.exit(1);
            return;
        }
        for (int i = 1; i < argv.length; i++) {
            try {
                Manifest.load(Paths.get(argv[i]), key);
                System.out.println("ok " + argv[i]);
            } catch (BundleException e) {
                System.out.println("error " + argv[i] + ": " + e.getMessage());
            }
        }
    }
}
