package org.fwdfed.core;

/**
 * What every estimator's step reads, checked in one place (fwdfed/methods/estimate.py's StepConfig):
 * the learning rate, the perturbation size eps (the forward gradient's finite-difference step h),
 * n directions a step, their kind, the adapter block they are restricted to, or null, and the
 * per-tensor scales they are multiplied by, or null. A method's config extends it with its own
 * fields and checks.
 */
public abstract class StepConfig implements MethodConfig {
    public final double lr;
    public final double eps;
    public final int directions;
    public final String kind;
    public final Block block;
    // Set once by Methods.config, before the config is used: every method's from its task alike, without a
    // constructor argument in each method's config.
    private TensorScales scales;

    /** The shared fields as a task gives them, before a method's config is made from them. */
    public record Fields(double lr, double eps, int directions, String kind, Block block) {}

    protected StepConfig(double lr, double eps, int directions, String kind, Block block) {
        Hparams.checkPositive("lr", lr);
        Hparams.checkPositive("eps", eps);
        Hparams.checkCount("directions", directions, Hparams.MAX_DIRECTIONS);
        Hparams.checkKind(kind);
        this.lr = lr;
        this.eps = eps;
        this.directions = directions;
        this.kind = kind;
        this.block = block;
    }

    /** `lr` and `eps` required; `directions` and `kind` the method's defaults when absent (StepConfig.step_hparams). */
    public static Fields read(Hparams h, long defaultDirections, String defaultKind) {
        double lr = h.number("lr", null);
        double eps = h.number("eps", null);
        long directions = Hparams.checkCount("directions", h.integer("directions", defaultDirections),
                Hparams.MAX_DIRECTIONS);
        return new Fields(lr, eps, (int) directions, h.text("kind", defaultKind), h.block());
    }

    StepConfig withScales(TensorScales scales) {
        this.scales = scales;
        return this;
    }

    /** The direction a step moves along: the seed's, restricted to the block, times the scales (StepConfig.direction). */
    public float[] direction(long seed, int dim) {
        float[] z = Directions.blockDirection(seed, dim, kind, block);
        return scales == null ? z : scales.apply(z);
    }

    @Override public TensorScales scales() { return scales; }
    @Override public int directions() { return directions; }
    @Override public String kind() { return kind; }
    @Override public Block block() { return block; }
}
