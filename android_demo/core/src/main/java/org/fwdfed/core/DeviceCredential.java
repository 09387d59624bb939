package org.fwdfed.core;

import java.nio.charset.StandardCharsets;
import java.security.GeneralSecurityException;
import java.security.KeyFactory;
import java.security.PrivateKey;
import java.security.Signature;
import java.security.spec.PKCS8EncodedKeySpec;
import java.util.Base64;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * What proves this device in the websocket handshake (docs/protocol.md, The handshake), from what
 * `python -m coordinator enrol` wrote for it: the device's Ed25519 private key (PKCS#8 PEM), which signs
 * the coordinator's challenge, or, from `enrol --bearer`, a bearer token (only a coordinator run with
 * `--allow-bearer` accepts one). The same format as fwdfed/handshake.py.
 */
public final class DeviceCredential {
    public static final String SCHEME = "FwdFed-Ed25519";
    private static final String CONTEXT = "fwdfed-auth-v1";
    private static final int NONCE_BYTES = 32;
    private static final Pattern CHALLENGE = Pattern.compile(
            "\\s*" + SCHEME + "\\s+nonce=\"([A-Za-z0-9_-]+)\"\\s*", Pattern.CASE_INSENSITIVE);
    private static final Base64.Encoder B64 = Base64.getUrlEncoder().withoutPadding();

    private final String bearer;  // null for a key
    private final PrivateKey key;  // null for a bearer token

    private DeviceCredential(String bearer, PrivateKey key) {
        this.bearer = bearer;
        this.key = key;
    }

    /** A PEM private key or a bearer token; null for null (no credential: a coordinator run with --auth none). */
    public static DeviceCredential of(String text) throws DeviceException {
        if (text == null) {
            return null;
        }
        if (!text.contains("-----BEGIN")) {
            return new DeviceCredential(text, null);
        }
        return new DeviceCredential(null, privateKey(text));
    }

    private static PrivateKey privateKey(String pem) throws DeviceException {
        String body = pem.replaceAll("-----(BEGIN|END) PRIVATE KEY-----", "").replaceAll("\\s", "");
        if (!pem.contains("-----BEGIN PRIVATE KEY-----")) {
            throw new DeviceException("the device's private key is not an unencrypted PKCS#8 PEM key "
                    + "(-----BEGIN PRIVATE KEY-----), as `python -m coordinator enrol` writes");
        }
        try {
            byte[] der = Base64.getDecoder().decode(body);
            return KeyFactory.getInstance("Ed25519").generatePrivate(new PKCS8EncodedKeySpec(der));
        } catch (IllegalArgumentException | GeneralSecurityException e) {
            throw new DeviceException("the device's private key is not an Ed25519 PKCS#8 PEM key: " + e.getMessage());
        }
    }

    /** Whether it answers a challenge (a key), rather than going in the first request (a bearer token). */
    public boolean signs() {
        return key != null;
    }

    /** The first request's `Authorization`: the bearer token's; null for a key (that request gets the challenge). */
    public String firstAuthorization() {
        return bearer == null ? null : "Bearer " + bearer;
    }

    /** The nonce of a `WWW-Authenticate: FwdFed-Ed25519 nonce="..."` value. */
    public static String nonceOf(String challenge) throws DeviceException {
        Matcher m = CHALLENGE.matcher(challenge == null ? "" : challenge);
        if (m.matches()) {
            try {
                if (Base64.getUrlDecoder().decode(m.group(1)).length == NONCE_BYTES) {
                    return m.group(1);
                }
            } catch (IllegalArgumentException ignored) {
                // not base64url: refused below
            }
        }
        throw new DeviceException("the coordinator's challenge is not '" + SCHEME + " nonce=\"<" + NONCE_BYTES
                + " bytes, base64url>\"': " + challenge);
    }

    /** The `Authorization` value answering `challenge` as `deviceId` at `unixSeconds`. */
    public String answer(String challenge, String deviceId, long unixSeconds) throws DeviceException {
        String nonce = nonceOf(challenge);
        String device = B64.encodeToString(deviceId.getBytes(StandardCharsets.UTF_8));
        String fields = device + "." + nonce + "." + unixSeconds;
        try {
            Signature signer = Signature.getInstance("Ed25519");
            signer.initSign(key);
            signer.update((CONTEXT + "." + fields).getBytes(StandardCharsets.US_ASCII));
            return SCHEME + " " + fields + "." + B64.encodeToString(signer.sign());
        } catch (GeneralSecurityException e) {
            throw new DeviceException("cannot sign the coordinator's challenge: " + e.getMessage());
        }
    }
}
