package org.fwdfed.core;

import java.io.File;

/**
 * Test tool: {@link BundleDevice}, the app's way into the core, on the JVM, with an opener that
 * records its calls instead of loading ExecuTorch (tests/android_demo/test_bundle_device.py).
 *
 *   BundleDeviceCheck [--trust-key PEM] BUNDLE DATA DEVICE_ID BUDGET|none [URL]
 *
 * Prints `opened PATH P LABELS_PER_EXAMPLE` for each opener call, then `examples N` and `plan ...`;
 * with URL, runs the device loop against it with a 1 s connect timeout. Errors: `error: ...` and
 * `opener calls K` (how many times the program was opened before the refusal), exit status 1.
 */
public final class BundleDeviceCheck {
    private static int opened;

    public static void main(String[] args) throws java.io.IOException {
        byte[] trustKey = null;
        String[] argv = args;
        if (args.length > 1 && "--trust-key".equals(args[0])) {
            trustKey = java.nio.file.Files.readAllBytes(java.nio.file.Paths.get(args[1]));
            argv = java.util.Arrays.copyOfRange(args, 2, args.length);
        }
        try {
            Long budget = "none".equals(argv[3]) ? null : MemorySize.parse(argv[3]);
            BundleDevice device = BundleDevice.open(new File(argv[0]), new File(argv[1]), argv[2], budget, trustKey,
                    (path, maxPerturbations, labelsPerExample) -> {
                        opened++;
                        System.out.println("opened " + path + " " + maxPerturbations + " " + labelsPerExample);
                        return new LossProgram() {  // training is not what this checks
                            @Override
                            public float[][] loss(int[][] ids, int[][] mask, int[][] labels, float[][] adapters) {
                                throw new ProgramException("BundleDeviceCheck's program does not train");
                            }

                            @Override
                            public int maxPerturbations() {
                                return maxPerturbations;
                            }
                        };
                    });
            System.out.println("examples " + device.numExamples());
            System.out.println("plan " + device.planDescription());
            if (argv.length > 4) {
                device.client(argv[4], null, null, 1000, DeviceStatus.Listener.NONE).run();
            }
        } catch (DeviceException | IllegalArgumentException e) {
            System.out.println("error: " + e.getMessage());
            System.out.println("opener calls " + opened);
            System.exit(1);
        }
    }
}
