package org.fwdfed.core;

import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.GeneralSecurityException;
import java.security.InvalidKeyException;
import java.security.KeyFactory;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.security.PublicKey;
import java.security.Signature;
import java.security.spec.InvalidKeySpecException;
import java.security.spec.X509EncodedKeySpec;
import java.util.ArrayList;
import java.util.Base64;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.stream.Stream;

/**
 * Signed bundles (docs/security.md, "Signed bundles"; fwdfed/bundle/signing.py): the operator's
 * Ed25519 signature of manifest.json's exact bytes in manifest.sig, and the manifest's {@code files}
 * covering every file of the bundle that {@code program} does not hash. A device given the operator's
 * public key checks the signature before it parses the manifest, then every file, and refuses a file
 * the manifest does not list: nothing of the bundle is read, the program least of all, before it is
 * known to be what the key's holder signed. Ed25519 is the JDK's since 15 (Android: API 33).
 */
public final class BundleSignature {
    public static final String SIGNATURE = "manifest.sig";
    public static final String MANIFEST = "manifest.json";
    public static final int SIGNATURE_BYTES = 64;
    private static final String PEM_BEGIN = "-----BEGIN PUBLIC KEY-----";
    private static final String PEM_END = "-----END PUBLIC KEY-----";

    private BundleSignature() {}

    /** The operator's public key from trust_key.pem (SubjectPublicKeyInfo PEM, `coordinator keygen`). */
    public static PublicKey readTrustKey(byte[] pem, String what) throws BundleException {
        String text = new String(pem, StandardCharsets.US_ASCII);
        if (text.contains("PRIVATE KEY")) {  // a device must never hold the signing key: refused, not derived from
            throw new BundleException(what + " is a private key: devices are given the public key (trust_key.pem)");
        }
        int begin = text.indexOf(PEM_BEGIN);
        int end = text.indexOf(PEM_END);
        if (begin < 0 || end < begin) {
            throw new BundleException(what + " is not a PEM public key (trust_key.pem from `python -m coordinator "
                    + "keygen`)");
        }
        byte[] der;
        try {
            der = Base64.getMimeDecoder().decode(text.substring(begin + PEM_BEGIN.length(), end));
        } catch (IllegalArgumentException e) {
            throw new BundleException(what + " is not a PEM public key: " + e.getMessage());
        }
        try {
            return KeyFactory.getInstance("Ed25519").generatePublic(new X509EncodedKeySpec(der));
        } catch (NoSuchAlgorithmException e) {
            throw new BundleException("this platform has no Ed25519 (Java 15 or later, Android 13 or later): it "
                    + "cannot check signed bundles");
        } catch (InvalidKeySpecException e) {
            throw new BundleException(what + " is not an Ed25519 public key");
        }
    }

    /** The first 16 hex digits of the key's 32 raw bytes (the end of its X.509 encoding), as messages name it. */
    public static String fingerprint(PublicKey key) {
        byte[] der = key.getEncoded();
        StringBuilder hex = new StringBuilder();
        for (int i = der.length - 32; i < der.length - 24; i++) {
            hex.append(String.format("%02x", der[i] & 0xff));
        }
        return hex.toString();
    }

    /** `manifestBytes`, the manifest as read and before it is parsed, are signed by `key` in the folder's manifest.sig. */
    public static void checkSignature(Path folder, byte[] manifestBytes, PublicKey key) throws BundleException {
        Path path = folder.resolve(SIGNATURE);
        if (!Files.isRegularFile(path)) {
            throw new BundleException("bundle " + folder + " is not signed (it has no " + SIGNATURE + ") and this "
                    + "device trusts only bundles signed by key " + fingerprint(key) + ": sign it with `python -m "
                    + "coordinator sign`");
        }
        byte[] signature;
        try {
            signature = Files.readAllBytes(path);
        } catch (IOException e) {
            throw new BundleException("cannot read " + path + ": " + e.getMessage());
        }
        if (signature.length != SIGNATURE_BYTES) {
            throw new BundleException(path + " is corrupt: " + signature.length + " bytes, an Ed25519 signature has "
                    + SIGNATURE_BYTES);
        }
        boolean valid;
        try {
            Signature verifier = Signature.getInstance("Ed25519");
            verifier.initVerify(key);
            verifier.update(manifestBytes);
            valid = verifier.verify(signature);
        } catch (NoSuchAlgorithmException | InvalidKeyException e) {
            throw new BundleException("this platform cannot check Ed25519 signatures: " + e.getMessage());
        } catch (GeneralSecurityException e) {
            valid = false;  // a signature the verifier cannot even decode does not verify
        }
        if (!valid) {
            throw new BundleException(path + " does not verify with the trusted key " + fingerprint(key)
                    + ": the manifest was changed since it was signed, or another key signed it");
        }
    }

    /**
     * Every file the signed manifest lists is there and intact, the program files match {@code program}'s
     * sha256, and the bundle holds no file the manifest does not list.
     */
    public static void checkFiles(Path folder, Map<String, Object> manifest) throws BundleException {
        if (!(manifest.get("files") instanceof Map)) {
            throw new BundleException(folder.resolve(MANIFEST) + " is signed but lists no files: sign it again "
                    + "with `python -m coordinator sign`");
        }
        Map<String, Object> files = Json.object(manifest.get("files"), "files");
        Map<String, Object> programs = programFiles(manifest);
        Set<String> known = new HashSet<>(files.keySet());
        known.addAll(programs.keySet());
        known.add(MANIFEST);
        known.add(SIGNATURE);
        List<String> unlisted = new ArrayList<>();
        for (String name : bundleFiles(folder)) {
            if (!known.contains(name)) {
                unlisted.add(name);
            }
        }
        if (!unlisted.isEmpty()) {
            throw new BundleException(folder.resolve(unlisted.get(0)) + " is not in the signed manifest"
                    + (unlisted.size() > 1 ? " (nor are " + (unlisted.size() - 1) + " more files)" : "")
                    + ": the bundle was changed since it was signed");
        }
        for (Map.Entry<String, Object> e : files.entrySet()) {
            Map<String, Object> entry = Json.object(e.getValue(), "files entry");
            Path path = folder.resolve(e.getKey());
            if (!Files.isRegularFile(path)) {
                throw new BundleException(path + ", which the signed manifest lists, is missing");
            }
            if (size(path) != ((Number) entry.get("bytes")).longValue() || !sha256(path).equals(entry.get("sha256"))) {
                throw new BundleException(path + " does not match the signed manifest's sha256: the file was changed "
                        + "since the bundle was signed");
            }
        }
        checkPrograms(folder, programs);
    }

    /** Each program file (from {@link #programFiles}) is there and matches its sha256, as load_bundle checks them. */
    static void checkPrograms(Path folder, Map<String, Object> programs) throws BundleException {
        for (Map.Entry<String, Object> e : programs.entrySet()) {
            Path path = folder.resolve(e.getKey());
            if (!Files.isRegularFile(path)) {
                throw new BundleException("bundle program " + path + " is missing");
            }
            if (!sha256(path).equals(e.getValue())) {
                throw new BundleException(path + " does not match the manifest's sha256: the file is corrupt or from "
                        + "another export");
            }
        }
    }

    /** The program files {@code program} hashes itself, bundle path -> sha256: the program, or a streamed one's stages. */
    static Map<String, Object> programFiles(Map<String, Object> manifest) {
        Map<String, Object> program = Json.object(manifest.get("program"), "program");
        String base = (String) program.get("file");
        Map<String, Object> out = new java.util.TreeMap<>();
        if (Boolean.TRUE.equals(program.get("streamed"))) {
            for (Object s : Json.array(program.get("stages"), "stages")) {
                Map<String, Object> stage = Json.object(s, "stage");
                out.put(base + "/" + stage.get("file"), stage.get("sha256"));
            }
        } else {
            out.put(base, program.get("sha256"));
        }
        return out;
    }

    /** Every regular file under the folder, relative and '/'-separated; a link is refused. */
    private static List<String> bundleFiles(Path folder) throws BundleException {
        List<String> names = new ArrayList<>();
        try (Stream<Path> walk = Files.walk(folder)) {
            for (Path p : (Iterable<Path>) walk::iterator) {
                if (Files.isSymbolicLink(p)) {
                    throw new BundleException(p + " is a symbolic link: a signed bundle holds its files themselves");
                }
                if (Files.isRegularFile(p)) {
                    StringBuilder name = new StringBuilder();
                    for (Path part : folder.relativize(p)) {
                        name.append(name.length() == 0 ? "" : "/").append(part);
                    }
                    names.add(name.toString());
                }
            }
        } catch (IOException | java.io.UncheckedIOException e) {
            throw new BundleException("cannot list the bundle " + folder + ": " + e.getMessage());
        }
        return names;
    }

    private static long size(Path path) throws BundleException {
        try {
            return Files.size(path);
        } catch (IOException e) {
            throw new BundleException("cannot read " + path + ": " + e.getMessage());
        }
    }

    static String sha256(Path path) throws BundleException {
        try (InputStream in = Files.newInputStream(path)) {
            MessageDigest digest = MessageDigest.getInstance("SHA-256");
            byte[] buffer = new byte[1 << 20];
            for (int n; (n = in.read(buffer)) > 0; ) {
                digest.update(buffer, 0, n);
            }
            StringBuilder hex = new StringBuilder();
            for (byte b : digest.digest()) {
                hex.append(String.format("%02x", b & 0xff));
            }
            return hex.toString();
        } catch (IOException e) {
            throw new BundleException("cannot read " + path + ": " + e.getMessage());
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException("SHA-256 is every JDK's", e);
        }
    }
}
