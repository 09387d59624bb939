package org.fwdfed.core;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.nio.file.StandardCopyOption;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.atomic.AtomicInteger;

/**
 * Test tool: the Java device on the JVM, with the real `.pte` run by {@link PipeLossProgram}:
 * everything else (protocol, transport, data, tokenizer, MeZO, budget) is the core an Android
 * app runs. Like `python -m device_sdk.emulate` for one device:
 *
 *   JvmDevice --coordinator URL --device-id ID --bundle DIR --data FILE --shard-index I --shard-count N
 *             --helper "PYTHON loss_helper.py" [--credentials FILE | --token T] [--ca-file PEM] [--mem 1.5GB]
 *             [--trust-key PEM] [--no-isolate-load]
 *             [--seed S] [--connect-timeout SECONDS] [--record DIR]
 *   JvmDevice --train-task T1.msgpack,T2.msgpack --out U1.msgpack,U2.msgpack (and the options above but the
 *             coordinator's): train tasks offline and write their update frames
 *
 * The device loop tries the program first in a child process (HelperProbe: `loss_helper.py --probe`), as
 * the Python device does (docs/security.md, Isolated loading), and prints `ID: probe VERDICT in S s, child
 * peak M`; a program that crashed it is declined task by task ({@link ProbedProgram}). `--no-isolate-load`
 * opens it at once, as before. `--train-task` does not probe: it trains the tasks it is given, nothing else.
 *
 * --record DIR writes every frame sent and received, each file whole or not at all (written
 * aside, then renamed). Errors: one `error:` line on stderr, exit status 1.
 */
public final class JvmDevice {
    public static void main(String[] argv) {
        try {
            System.exit(run(argv));
        } catch (DeviceException | BundleException | TrainingData.DataException | IllegalArgumentException e) {
            System.err.println("error: " + e.getMessage());
            System.exit(1);
        } catch (Exception e) {
            System.err.println("error: " + e);
            e.printStackTrace();
            System.exit(1);
        }
    }

    static int run(String[] argv) throws Exception {
        Map<String, String> a = options(argv);
        String deviceId = a.getOrDefault("device-id", "java-0");
        // With --trust-key, the bundle is checked against the operator's signature before anything of it is read.
        java.security.PublicKey trustKey = a.containsKey("trust-key")
                ? BundleSignature.readTrustKey(Files.readAllBytes(Paths.get(a.get("trust-key"))), a.get("trust-key"))
                : null;
        Manifest manifest = Manifest.load(Paths.get(need(a, "bundle")), trustKey);
        Long budget = a.containsKey("mem") ? MemorySize.parse(a.get("mem")) : null;
        long runtime = ProcStatus.currentRss();
        int shardIndex = Integer.parseInt(a.getOrDefault("shard-index", "0"));
        int shardCount = Integer.parseInt(a.getOrDefault("shard-count", "1"));
        List<String> texts = TrainingData.shard(Paths.get(need(a, "data")), Long.parseLong(a.getOrDefault("data-seed", "0")),
                shardIndex, shardCount);
        if (texts.isEmpty()) {
            throw new DeviceException("device " + deviceId + ": its shard of " + a.get("data") + " is empty");
        }
        if (budget != null) {  // before the program is loaded: a budget that cannot hold a step is refused here
            MemoryPlan plan;
            try {
                plan = MemoryPlan.plan(manifest, budget, texts.size(), manifest.maxPerturbations / 2,
                        1 + 3 * Math.max(1, manifest.maxPerturbations / 2), runtime);
            } catch (BudgetException e) {
                throw new DeviceException(e.getMessage());
            }
            System.err.println(deviceId + ": " + plan.describe());
        }
        Tokenizer tokenizer = Tokenizer.load(manifest.tokenizerPath());
        List<Batch> batches = BatchEncoder.encode(tokenizer, texts, null, manifest.task, manifest.batchSize, manifest.seqLen);
        long seed = Long.parseLong(a.getOrDefault("seed", "0"));
        List<String> helper = Arrays.asList(need(a, "helper").trim().split("\\s+"));
        List<PipeLossProgram> opened = new ArrayList<>();  // closed at the end: their helper processes stop
        BundleDevice.ProgramOpener opener = (path, maxPerturbations, labelsPerExample) -> {
            PipeLossProgram p = new PipeLossProgram(helper, path, maxPerturbations, labelsPerExample);
            opened.add(p);
            return p;
        };
        try {
            ProbedProgram probed = null;
            LossProgram program;
            if (a.containsKey("no-isolate-load") || a.containsKey("train-task")) {
                program = opener.open(manifest.programPath().toString(), manifest.maxPerturbations,
                        Manifest.SEQ_CLS.equals(manifest.task));
            } else {
                probed = ProbedProgram.open(manifest, trustKey, new HelperProbe(helper, HelperProbe.TIMEOUT_S), opener);
                ProbeVerdict verdict = probed.lastVerdict();
                System.err.printf("%s: probe %s in %.2f s, child peak %s%n", deviceId, verdict.outcome.name().toLowerCase(
                        java.util.Locale.ROOT), probed.lastProbeSeconds(), verdict.childPeakRssBytes < 0 ? "unknown"
                        : MemorySize.format(verdict.childPeakRssBytes));
                if (probed.crashed() != null) {
                    System.err.println(deviceId + ": " + probed.crashed() + "; declining tasks until the bundle is replaced");
                }
                program = probed;
            }
            TaskTrainer trainer = new TaskTrainer(manifest, program, batches, texts.size(), budget, runtime,
                    (round, wave) -> new SeedStream(seed, round, wave, deviceId), ProcStatus::peakRss);
            if (a.containsKey("train-task")) {  // comma-separated task files, answered into the --out files
                String[] tasks = a.get("train-task").split(",");
                String[] outs = need(a, "out").split(",");
                for (int i = 0; i < tasks.length; i++) {
                    Message message = Codec.decode(Files.readAllBytes(Paths.get(tasks[i])));
                    Message.Update update = trainer.train((Message.Task) message, StepGuard.NONE);
                    writeWhole(Paths.get(outs[i]), Codec.encode(update));
                }
                return 0;
            }
            byte[] ca = a.containsKey("ca-file") ? Files.readAllBytes(Paths.get(a.get("ca-file"))) : null;
            DeviceClient.Config config = new DeviceClient.Config(need(a, "coordinator"), token(a, deviceId), ca, deviceId,
                    budget, (long) (Double.parseDouble(a.getOrDefault("connect-timeout", "30")) * 1000));
            DeviceClient.FrameRecorder recorder = a.containsKey("record")
                    ? new DirectoryRecorder(Paths.get(a.get("record"))) : DeviceClient.FrameRecorder.NONE;
            DeviceClient client = new DeviceClient(config, manifest, trainer,
                    s -> System.err.println(deviceId + ": " + s.state + " round " + s.round + " accepted "
                            + s.updatesAccepted + " sent " + s.bytesSent + " B received " + s.bytesReceived
                            + " B peak " + MemorySize.format(s.peakRssBytes) + ": " + s.message),
                    recorder).program(probed);
            Runtime.getRuntime().addShutdownHook(new Thread(client::stop));
            int accepted = client.run();
            System.out.println("device " + deviceId + ": " + accepted + " updates accepted");
            System.out.println("device " + deviceId + ": program calls " + opened.stream().mapToLong(PipeLossProgram::calls)
                    .sum() + ", peak RSS " + MemorySize.format(ProcStatus.peakRss()));
            return 0;
        } finally {
            for (PipeLossProgram p : opened) {
                p.close();
            }
        }
    }

    private static String token(Map<String, String> a, String deviceId) throws Exception {
        if (a.containsKey("token")) {
            return a.get("token");
        }
        if (!a.containsKey("credentials")) {
            return null;
        }
        Map<String, Object> tokens = Json.object(Json.parse(Files.readString(Paths.get(a.get("credentials")),
                StandardCharsets.UTF_8)), "credentials");
        Object entry = tokens.get(deviceId);
        if (entry instanceof Map && ((Map<?, ?>) entry).get("private_key") instanceof String) {
            return (String) ((Map<?, ?>) entry).get("private_key");  // {"private_key": PEM}: `coordinator enrol`
        }
        if (!(entry instanceof String)) {  // a bearer token: `coordinator enrol --bearer`
            throw new DeviceException(a.get("credentials") + " has no credential for " + deviceId + ": enrol it first");
        }
        return (String) entry;
    }

    private static final java.util.Set<String> FLAGS = java.util.Set.of("no-isolate-load");  // options without a value

    private static Map<String, String> options(String[] argv) {
        Map<String, String> out = new HashMap<>();
        for (int i = 0; i < argv.length; i++) {
            if (argv[i].startsWith("--") && FLAGS.contains(argv[i].substring(2))) {
                out.put(argv[i].substring(2), "");
                continue;
            }
            if (!argv[i].startsWith("--") || i + 1 >= argv.length) {
                throw new IllegalArgumentException("expected --option value, got " + argv[i]);
            }
            out.put(argv[i].substring(2), argv[++i]);
        }
        return out;
    }

    private static String need(Map<String, String> a, String name) {
        if (!a.containsKey(name)) {
            throw new IllegalArgumentException("--" + name + " is required");
        }
        return a.get(name);
    }

    /** Write a file whole or not at all: aside first, then renamed over the name (atomic on one filesystem). */
    static void writeWhole(Path path, byte[] bytes) throws java.io.IOException {
        Path aside = path.resolveSibling(path.getFileName() + ".partial");
        Files.write(aside, bytes);
        Files.move(aside, path, StandardCopyOption.ATOMIC_MOVE, StandardCopyOption.REPLACE_EXISTING);
    }

    /** Every frame as DIR/NNNN-sent-TYPE.msgpack or DIR/NNNN-received-TYPE.msgpack. */
    static final class DirectoryRecorder implements DeviceClient.FrameRecorder {
        private final Path dir;
        private final AtomicInteger count = new AtomicInteger();
        private final List<String> failures = new ArrayList<>();

        DirectoryRecorder(Path dir) throws java.io.IOException {
            this.dir = Files.createDirectories(dir);
        }

        private void write(String way, byte[] frame) {
            String type;
            try {
                type = Codec.decode(frame).type();
            } catch (ProtocolException e) {
                type = "bad";
            }
            try {
                writeWhole(dir.resolve(String.format("%04d-%s-%s.msgpack", count.incrementAndGet(), way, type)), frame);
            } catch (java.io.IOException e) {
                failures.add(e.toString());
            }
        }

        @Override public void sent(byte[] frame) { write("sent", frame); }
        @Override public void received(byte[] frame) { write("received", frame); }
    }
}
