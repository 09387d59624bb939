package org.fwdfed.core;

import static org.fwdfed.core.UnitTests.check;
import static org.fwdfed.core.UnitTests.equal;
import static org.fwdfed.core.UnitTests.raises;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Deque;
import java.util.List;

/**
 * Isolated loading in the core: {@link ProbedProgram}'s answer to each verdict (opened, refused in its
 * line, or crashed: declined task by task, the bundle read again before each, opened once replaced), and
 * {@link HelperProbe}'s verdicts from real child processes that answer, refuse, exit, hang or die by a
 * real signal.
 */
final class ProbeTests {
    private ProbeTests() {}

    static final String PROGRAM = "a program's bytes";

    /** A bundle folder with a program whose sha256 the manifest holds, `batch` examples a call. */
    static Path bundle(int batch) throws Exception {
        Path dir = Files.createTempDirectory("probed");
        writeBundle(dir, PROGRAM, batch);
        return dir;
    }

    static void writeBundle(Path dir, String program, int batch) throws Exception {
        Files.writeString(dir.resolve("model.pte"), program, StandardCharsets.UTF_8);
        String json = "{\"task\": \"causal-lm\", \"model\": {\"hash\": \"h0\", \"num_labels\": null},"
                + "\"adapter\": {\"dim\": 4, \"initial\": \"adapter_init.f32\"},"
                + "\"layout\": [{\"name\": \"a\", \"shape\": [4], \"offset\": 0}], \"tokenizer\": \"tokenizer\","
                + "\"inputs\": {\"batch_size\": " + batch + ", \"seq_len\": 3, \"max_perturbations\": 2},"
                + "\"program\": {\"file\": \"model.pte\", \"sha256\": \"" + BundleSignature.sha256(dir.resolve("model.pte"))
                + "\", \"planned_memory_bytes\": {\"forward\": 1000}}, \"format_version\": 2}";
        Files.writeString(dir.resolve("manifest.json"), json, StandardCharsets.UTF_8);
        Files.write(dir.resolve("adapter_init.f32"), Manifest.Float32.toBytes(new float[] {1, 2, 3, 4}));
    }

    /** A probe that gives the verdicts it was handed, in order, and records what it was asked to run. */
    static final class Scripted implements ProgramProbe {
        final Deque<ProbeVerdict> verdicts;
        final List<ProbeInputs> asked = new ArrayList<>();

        Scripted(ProbeVerdict... verdicts) {
            this.verdicts = new ArrayDeque<>(Arrays.asList(verdicts));
        }

        @Override
        public ProbeVerdict probe(ProbeInputs inputs) {
            asked.add(inputs);
            return verdicts.removeFirst();
        }
    }

    /** An opener that records the paths it opened; its program returns zeros. */
    static final class Opener implements BundleDevice.ProgramOpener {
        final List<String> opened = new ArrayList<>();

        @Override
        public LossProgram open(String path, int maxPerturbations, boolean labelsPerExample) {
            opened.add(path);
            return new LossProgram() {
                @Override
                public float[][] loss(int[][] ids, int[][] mask, int[][] labels, float[][] adapters) {
                    return new float[adapters.length][ids.length];
                }

                @Override
                public int maxPerturbations() {
                    return maxPerturbations;
                }
            };
        }
    }

    static void testAProgramTheProbeRanIsOpenedOnceWithTheManifestsShapes() throws Exception {
        Path dir = bundle(2);
        Scripted probe = new Scripted(ProbeVerdict.ok(1000));
        Opener opener = new Opener();
        ProbedProgram p = ProbedProgram.open(Manifest.load(dir), null, probe, opener);
        equal(null, p.crashed(), "crashed");
        equal(List.of(dir.resolve("model.pte").toString()), opener.opened, "opened");
        p.ready("t-1");
        equal(1, probe.asked.size(), "probes");
        ProbeInputs in = probe.asked.get(0);
        equal(dir.resolve("model.pte").toString(), in.programPath, "the program probed");
        float[][] adapters = in.adapters();
        equal(2, adapters.length, "P copies of the initial adapter");
        equal(Arrays.toString(new float[] {1, 2, 3, 4}), Arrays.toString(adapters[1]), "the initial adapter");
        equal(2, in.ids().length, "batch");
        equal(3, in.labels()[0].length, "a causal LM's labels per token");
        equal(1, in.mask()[1][2], "a full mask");
        equal(2, p.loss(in.ids(), in.mask(), in.labels(), adapters).length, "the opened program answers");
    }

    static void testAProgramTheProbeRefusesStopsTheDeviceWithItsLine() throws Exception {
        Opener opener = new Opener();
        raises(DeviceException.class, "cannot load the ExecuTorch program: bad header", () -> ProbedProgram.open(
                Manifest.load(bundle(2)), null, new Scripted(ProbeVerdict.refused(
                        "cannot load the ExecuTorch program: bad header", 1000)), opener));
        equal(0, opener.opened.size(), "opened");
    }

    static void testAProgramNotItsSha256IsRefusedBeforeTheProbe() throws Exception {
        Path dir = bundle(2);
        Files.writeString(dir.resolve("model.pte"), "other bytes", StandardCharsets.UTF_8);
        Scripted probe = new Scripted();
        raises(DeviceException.class, "does not match the manifest's sha256", () -> ProbedProgram.open(
                Manifest.load(dir), null, probe, new Opener()));
        equal(0, probe.asked.size(), "probes");
    }

    static void testACrashIsDeclinedTaskByTaskUntilTheBundleIsReplaced() throws Exception {
        Path dir = bundle(2);
        Scripted probe = new Scripted(ProbeVerdict.crashed("killed by SIGSEGV"), ProbeVerdict.crashed("killed by SIGABRT"),
                ProbeVerdict.ok(1000));
        Opener opener = new Opener();
        ProbedProgram p = ProbedProgram.open(Manifest.load(dir), null, probe, opener);
        String crash = "the program " + dir.resolve("model.pte") + " crashed the ExecuTorch runtime in the child process "
                + "that tried it (killed by SIGSEGV): not loaded";
        equal(crash, p.crashed(), "the crash, in the Python device's words");
        equal(0, opener.opened.size(), "nothing opened");
        raises(ProgramException.class, "crashed the ExecuTorch runtime", () -> p.loss(new int[1][1], new int[1][1],
                new int[1][1], new float[1][4]));
        // Each task: the bundle read again and probed again.
        ProgramUnavailable first = raises(ProgramUnavailable.class, "task t-1: the program ", () -> p.ready("t-1"));
        check(first.getMessage().endsWith("(killed by SIGABRT): not loaded"), first.getMessage());
        equal(2, probe.asked.size(), "probed again");
        // A program being replaced (its manifest not yet): refused before any probe.
        Files.writeString(dir.resolve("model.pte"), "new bytes", StandardCharsets.UTF_8);
        raises(ProgramUnavailable.class, "task t-2: " + dir.resolve("model.pte") + " does not match the manifest's sha256",
                () -> p.ready("t-2"));
        // A bundle of other shapes: the device set up its batches for the old ones.
        writeBundle(dir, "new bytes", 3);
        raises(ProgramUnavailable.class, "task t-3: the bundle " + dir + " was replaced by one of other shapes (model, "
                + "adapter, inputs or classes) than this device set up for: restart the device", () -> p.ready("t-3"));
        equal(2, probe.asked.size(), "neither probed");
        // Replaced by one of the same shapes: probed, opened, and the task runs.
        writeBundle(dir, "new bytes", 2);
        p.ready("t-4");
        equal(null, p.crashed(), "loaded");
        equal(List.of(dir.resolve("model.pte").toString()), opener.opened, "opened once");
        p.ready("t-5");
        equal(3, probe.asked.size(), "not probed once loaded");
    }

    static void testTheJvmProbesVerdictsFromRealChildProcesses() throws Exception {
        ProbeInputs inputs = ProbeInputs.of(Manifest.load(bundle(2)));
        String[][] cases = {
            {"cat > /dev/null; echo ok 123456", "ok"},
            {"cat > /dev/null; echo error 5 cannot load the ExecuTorch program: bad", "refused cannot load the ExecuTorch program: bad"},
            {"kill -SEGV $$", "crashed killed by SIGSEGV"},
            {"cat > /dev/null; echo ok 1; kill -ABRT $$", "crashed killed by SIGABRT"},
            {"exit 3", "crashed exited with status 3 before its verdict"},
            {"cat > /dev/null", "crashed exited with status 0 before its verdict"},
            {"cat > /dev/null; echo fine", "crashed exited with status 0 before its verdict"},
            {"exec sleep 30", "crashed did not finish within 0.5 s (killed)"},
        };
        for (String[] c : cases) {
            ProbeVerdict v = new HelperProbe(List.of("sh", "-c", c[0], "sh"), 0.5).probe(inputs);
            equal(c[1], v.toString(), c[0]);
        }
        equal(123456L, new HelperProbe(List.of("sh", "-c", cases[0][0], "sh"), 5).probe(inputs).childPeakRssBytes,
                "the child's peak, as it reported it");
    }
}
