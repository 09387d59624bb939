package org.fwdfed.core;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;

/**
 * Test tool: the `Authorization` value the Java device answers a challenge with (DeviceCredential), so that
 * tests/android_demo/test_java_handshake.py can check it with the coordinator's own verification.
 *
 *   HandshakeCheck CREDENTIAL_FILE DEVICE_ID UNIX_SECONDS CHALLENGE...
 *
 * CREDENTIAL_FILE holds what `coordinator enrol` wrote for the device (a PEM key, or a token). Prints one line per
 * challenge: `ok AUTHORIZATION`, or `error why`; a credential that cannot be used: `key error: why`, exit 1.
 */
public final class HandshakeCheck {
    public static void main(String[] argv) throws java.io.IOException {
        DeviceCredential credential;
        try {
            credential = DeviceCredential.of(new String(Files.readAllBytes(Paths.get(argv[0])), StandardCharsets.UTF_8));
        } catch (DeviceException e) {
            System.out.println("key error: " + e.getMessage());
            System.exit(1);
            return;
        }
        for (int i = 3; i < argv.length; i++) {
            try {
                System.out.println("ok " + credential.answer(argv[i], argv[1], Long.parseLong(argv[2])));
            } catch (DeviceException e) {
                System.out.println("error " + e.getMessage());
            }
        }
    }
}
