package org.fwdfed.core;

/**
 * Tries the bundle's program where a crash of the runtime cannot take the device: in a process of its
 * own, which loads the program and runs its `forward` once on inputs of the manifest's shapes
 * ({@link ProbeInputs}), then exits. A corrupted program whose manifest matches it (a device without a
 * trust key, or a bad program its operator signed) can crash ExecuTorch's runtime with a segfault or an
 * abort, which no {@code catch} stops; that costs the probe's process, and the device declines its tasks
 * instead of dying ({@link ProbedProgram}). On a phone the process is the app's `:probe` service
 * (android_demo/app, ProbeService); on the JVM the tests' helper process (HelperProbe, test sources).
 */
public interface ProgramProbe {
    /**
     * How the probe's process ended. It returns once that process has let the program go, so that the
     * device and the probe never hold the program at once. DeviceException: the probe itself could not be
     * run (its process would not start), which says nothing of the program.
     */
    ProbeVerdict probe(ProbeInputs inputs) throws DeviceException;
}
