package org.fwdfed.core;

import java.io.DataInputStream;
import java.io.EOFException;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;

/**
 * Test tool: reads frames from stdin (each a big-endian u32 length and the bytes), decodes each
 * with {@link Codec}, and prints one line per frame: `ok HEX` (the frame re-encoded from the
 * decoded message) or `refused REASON`. tests/android_demo/test_protocol_codec.py feeds it the
 * same frames as fwdfed/protocol.py and compares the verdicts.
 */
public final class CodecCheck {
    public static void main(String[] args) throws Exception {
        DataInputStream in = new DataInputStream(new java.io.BufferedInputStream(System.in));
        PrintStream out = new PrintStream(new java.io.BufferedOutputStream(System.out), false, StandardCharsets.UTF_8);
        while (true) {
            int length;
            try {
                length = in.readInt();
            } catch (EOFException end) {
                break;
            }
            byte[] frame = new byte[length];
            in.readFully(frame);
            try {
                byte[] again = Codec.encode(Codec.decode(frame));
                StringBuilder hex = new StringBuilder("ok ");
                for (byte b : again) {
                    hex.append(String.format("%02x", b));
                }
                out.println(hex);
            } catch (ProtocolException e) {
                out.println("refused " + e.getMessage().replace('\n', ' '));
            }
        }
        out.flush();
    }
}
