package org.fwdfed.core;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.PublicKey;
import java.util.Map;

/**
 * The bundle's manifest.json (fwdfed/bundle/manifest.py): the base model's hash, the adapter's
 * dimension and initial vector, the program's input shapes and planned memory, the tokenizer
 * folder. Read and checked before anything it sizes is allocated.
 */
public final class Manifest {
    // Format 2 (fwdfed/bundle/schema.py) moved only the quantization, which this device does not read: it takes both.
    public static final long OLDEST_FORMAT = 1;
    public static final long FORMAT_VERSION = 2;
    public static final String CAUSAL_LM = "causal-lm";
    public static final String SEQ_CLS = "seq-cls";
    // Bounds on the program's input shapes (fwdfed/bundle/manifest.py INPUT_LIMITS).
    private static final Map<String, Integer> INPUT_LIMITS = Map.of("batch_size", 4096, "seq_len", 1 << 16,
            "max_perturbations", 4096);

    public final Path folder;
    public final String task;
    public final String baseModelHash;
    public final int adapterDim;
    public final int batchSize;
    public final int seqLen;
    public final int maxPerturbations;
    public final Integer numLabels;  // null for a causal LM
    public final String programFile;
    public final long programBytes;
    public final long plannedMemoryBytes;  // both methods' planned buffers
    public final long workspaceBytes;  // measured at export: the backend beyond the plan
    public final String tokenizerFolder;
    public final String initialAdapterFile;
    private final Map<String, Object> programFiles;  // bundle path -> the manifest's sha256 of it

    private Manifest(Path folder, Map<String, Object> m) throws BundleException {
        this.folder = folder;
        Object version = m.get("format_version");
        if (!(version instanceof Long) || (Long) version < OLDEST_FORMAT || (Long) version > FORMAT_VERSION) {
            throw new BundleException("manifest format " + version + " is not supported (this reader takes "
                    + OLDEST_FORMAT + " to " + FORMAT_VERSION + ")");
        }
        Map<String, Object> model = Json.object(m.get("model"), "model");
        Map<String, Object> adapter = Json.object(m.get("adapter"), "adapter");
        Map<String, Object> inputs = Json.object(m.get("inputs"), "inputs");
        Map<String, Object> program = Json.object(m.get("program"), "program");
        this.task = (String) m.get("task");
        if (!CAUSAL_LM.equals(task) && !SEQ_CLS.equals(task)) {
            throw new BundleException("unknown task " + task);
        }
        this.baseModelHash = (String) model.get("hash");
        this.numLabels = model.get("num_labels") == null ? null : ((Long) model.get("num_labels")).intValue();
        this.adapterDim = layoutDim(Json.array(m.get("layout"), "layout"));
        if (!(adapter.get("dim") instanceof Long) || (Long) adapter.get("dim") != adapterDim) {
            throw new BundleException("adapter dim " + adapter.get("dim") + " disagrees with its layout (" + adapterDim + ")");
        }
        this.batchSize = input(inputs, "batch_size");
        this.seqLen = input(inputs, "seq_len");
        this.maxPerturbations = input(inputs, "max_perturbations");
        this.programFile = (String) program.get("file");
        Path programPath = folder.resolve(programFile);
        long bytes = program.get("bytes") instanceof Long ? (Long) program.get("bytes") : 0L;
        try {
            this.programBytes = bytes > 0 ? bytes : Files.size(programPath);
        } catch (IOException e) {
            throw new BundleException("bundle program " + programPath + " is missing");
        }
        long planned = 0;
        for (Object v : Json.object(program.get("planned_memory_bytes"), "planned_memory_bytes").values()) {
            planned += ((Number) v).longValue();
        }
        this.plannedMemoryBytes = planned;
        this.workspaceBytes = program.get("workspace_bytes") instanceof Long ? (Long) program.get("workspace_bytes") : 0L;
        this.tokenizerFolder = (String) m.get("tokenizer");
        this.initialAdapterFile = (String) adapter.get("initial");
        this.programFiles = BundleSignature.programFiles(m);
    }

    private static int layoutDim(java.util.List<Object> layout) throws BundleException {
        if (layout.isEmpty()) {
            return 0;
        }
        Map<String, Object> last = Json.object(layout.get(layout.size() - 1), "layout entry");
        long numel = 1;
        for (Object s : Json.array(last.get("shape"), "shape")) {
            numel *= (Long) s;
        }
        long dim = (Long) last.get("offset") + numel;
        if (dim < 0 || dim > Integer.MAX_VALUE / 4) {
            throw new BundleException("an adapter of dimension " + dim + " is past what a device holds");
        }
        return (int) dim;
    }

    private static int input(Map<String, Object> inputs, String name) throws BundleException {
        Object v = inputs.get(name);
        int limit = INPUT_LIMITS.get(name);
        if (!(v instanceof Long) || (Long) v < 1 || (Long) v > limit) {
            throw new BundleException("inputs." + name + " must be an integer in [1, " + limit + "], got " + v);
        }
        return (int) (long) (Long) v;
    }

    /** Read `folder/manifest.json`; BundleException with a one-line reason. No signature is checked. */
    public static Manifest load(Path folder) throws BundleException {
        return load(folder, null);
    }

    /**
     * Read `folder/manifest.json`; with `trustKey` (BundleSignature.readTrustKey) its signature is checked
     * before it is parsed, and every file of the bundle against it before anything else: an unsigned, wrongly
     * signed or changed bundle is refused before any other file of it is read. BundleException, one line.
     */
    public static Manifest load(Path folder, PublicKey trustKey) throws BundleException {
        Path path = folder.resolve("manifest.json");
        if (!Files.isRegularFile(path)) {
            throw new BundleException(folder + " is not a bundle: it has no manifest.json");
        }
        byte[] raw;
        try {
            raw = Files.readAllBytes(path);  // read once: the bytes checked are the bytes parsed
        } catch (IOException e) {
            throw new BundleException("cannot read " + path + ": " + e.getMessage());
        }
        if (trustKey != null) {
            BundleSignature.checkSignature(folder, raw, trustKey);
        }
        try {
            Map<String, Object> m = Json.object(Json.parse(new String(raw, StandardCharsets.UTF_8)), "manifest");
            if (trustKey != null) {
                BundleSignature.checkFiles(folder, m);
            }
            return new Manifest(folder, m);
        } catch (IllegalArgumentException | ClassCastException | NullPointerException e) {
            throw new BundleException(path + " is not a valid manifest: " + e.getMessage());
        }
    }

    /**
     * The program (a streamed one's stages) is there and matches the manifest's sha256, as the Python device's
     * load_bundle checks it: read in full, so that it is called where the program is about to be tried
     * ({@link ProbedProgram}), not on every read of the manifest.
     */
    public void checkProgram() throws BundleException {
        BundleSignature.checkPrograms(folder, programFiles);
    }

    public Path programPath() {
        return folder.resolve(programFile);
    }

    public Path tokenizerPath() {
        return folder.resolve(tokenizerFolder);
    }

    /** The initial adapter (adapter_init.f32: d float32, little-endian). */
    public float[] initialAdapter() throws BundleException {
        Path path = folder.resolve(initialAdapterFile);
        try {
            return Float32.fromBytes(Files.readAllBytes(path), adapterDim, path.toString());
        } catch (IOException e) {
            throw new BundleException("bundle has no initial adapter (" + path.getFileName() + ")");
        } catch (IllegalArgumentException e) {
            throw new BundleException(e.getMessage());
        }
    }

    /** Float32 little-endian vectors, as the wire and the bundle store them. */
    public static final class Float32 {
        private Float32() {}

        public static float[] fromBytes(byte[] raw, int dim, String what) {
            if (raw.length != 4L * dim) {
                throw new IllegalArgumentException(what + " holds " + raw.length + " bytes; an adapter of dimension "
                        + dim + " needs " + 4L * dim);
            }
            float[] out = new float[dim];
            ByteBuffer.wrap(raw).order(ByteOrder.LITTLE_ENDIAN).asFloatBuffer().get(out);
            return out;
        }

        public static byte[] toBytes(float[] v) {
            ByteBuffer b = ByteBuffer.allocate(4 * v.length).order(ByteOrder.LITTLE_ENDIAN);
            b.asFloatBuffer().put(v);
            return b.array();
        }
    }
}
