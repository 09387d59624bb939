package org.fwdfed.core;

/**
 * The slice [start, end) of the adapter a block-cyclic round perturbs (the task's
 * `block_start`/`block_end`); directions are zero outside it.
 */
public final class Block {
    public final int start;
    public final int end;

    public Block(int start, int end) {
        if (!(0 <= start && start < end)) {
            throw new IllegalArgumentException("the adapter block must have 0 <= block_start < block_end, got ["
                    + start + ", " + end + ")");
        }
        this.start = start;
        this.end = end;
    }
}
