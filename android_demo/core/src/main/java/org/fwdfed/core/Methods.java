package org.fwdfed.core;

import java.util.List;

/**
 * The forward-only methods this device runs, by the name a task's `method` gives
 * (fwdfed/methods/: mezo, fwdgrad, onesided). The dense baselines (backprop, class-stats) need
 * autograd or features the Java device does not have; a task naming them is refused.
 */
public final class Methods {
    public static final List<String> NAMES = List.of("mezo", "fwdgrad", "onesided");

    private Methods() {}

    public static boolean known(String method) {
        return NAMES.contains(method);
    }

    /** The checked settings of `method` from the task's hyperparameters; IllegalArgumentException says why not. */
    public static MethodConfig config(String method, Hparams hparams) {
        switch (method) {
            case "mezo":
                return Mezo.Config.fromHparams(hparams);
            case "fwdgrad":
                return ForwardGradient.Config.fromHparams(hparams);
            case "onesided":
                return OneSided.Config.fromHparams(hparams);
            default:
                throw new IllegalArgumentException("unknown method " + method);
        }
    }
}
