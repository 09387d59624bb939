package org.fwdfed.core;

import java.util.List;

/**
 * The forward-only methods this device runs, by the name a task's `method` gives
 * (fwdfed/methods/: mezo, fwdgrad, onesided, fzoo). The others are refused by name: the dense
 * baselines (backprop, class-stats) need autograd or a features method the Java device does not
 * run, fedkd needs a teacher program it does not load, and hybrid needs the program's features
 * method (its exact head step) and a dense upload of the head (tests/android_demo/test_methods_registry.py
 * checks that this list and this comment keep in step with the Python registry).
 */
public final class Methods {
    public static final List<String> NAMES = List.of("mezo", "fwdgrad", "onesided", "fzoo");

    private Methods() {}

    public static boolean known(String method) {
        return NAMES.contains(method);
    }

    /** The checked settings of `method` from the task's hyperparameters; IllegalArgumentException says why not. */
    public static MethodConfig config(String method, Hparams hparams) {
        StepConfig config;
        switch (method) {
            case "mezo":
                config = Mezo.Config.fromHparams(hparams);
                break;
            case "fwdgrad":
                config = ForwardGradient.Config.fromHparams(hparams);
                break;
            case "onesided":
                config = OneSided.Config.fromHparams(hparams);
                break;
            case "fzoo":
                config = Fzoo.Config.fromHparams(hparams);
                break;
            default:
                throw new IllegalArgumentException("unknown method " + method);
        }
        return config.withScales(TensorScales.fromHparams(hparams));  // every one of them honours the scales
    }
}
