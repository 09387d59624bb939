"""Per-tensor perturbation scales (`coordinator serve --tensor-scale rms`): every direction multiplied, element by
element, by one scale per adapter tensor, so that tensors of very different sizes (a class-statistics head of RMS
~80 beside a LoRA B at zero) are perturbed at comparable size relative to their own values.

The coordinator computes the scales once per round from the round's base adapter (`round_scales`) and sends them
in every task of the round as explicit ranges, `tensor_scales = [[start, stop, scale], ...]`, so that a device needs
neither the layout nor any arithmetic of its own to agree. The scaled direction of seed s is, element by element,

    d_s[i] = float32(z_s[i] * float32(scale(i)))        scale(i) = the scale of the range holding i, 1 elsewhere

(z_s the float32 direction of docs/directions.md, restricted to the round's block; the product of two float32
values rounded once to float32, as numpy's float32 `*` and Java's `float *` do). Every formula that used z_s
(a device's step, its loss after, aggregation, docs/protocol.md) uses d_s instead, unchanged otherwise.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

MODES = ("none", "rms")
DEFAULT_FLOOR = 1e-2  # the least RMS a tensor counts as: a LoRA B at zero is still explored
MAX_RANGES = 4096  # ranges a task may carry: one per adapter tensor, past any layout exported here

ScaleRanges = tuple[tuple[int, int, float], ...]


def check_ranges(value) -> ScaleRanges:
    """A task's `tensor_scales` read from the wire: a list of at most MAX_RANGES [start, stop, scale] with integer
    0 <= start < stop, ranges in increasing order and not overlapping (stop <= the next start), and each scale a
    finite float32 number > 0; ValueError naming the first fault. The end against the adapter: `check_dim`."""
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_RANGES:
        raise ValueError(f"tensor_scales must be a list of 1 to {MAX_RANGES} [start, stop, scale] ranges")
    ranges, last = [], 0
    for item in value:
        if not (isinstance(item, (list, tuple)) and len(item) == 3):
            raise ValueError(f"tensor_scales: each range must be [start, stop, scale], got {item!r}")
        start, stop, scale = item
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, stop)):
            raise ValueError(f"tensor_scales: start and stop must be integers, got {item!r}")
        if not last <= start < stop:
            raise ValueError(f"tensor_scales: ranges must have 0 <= start < stop, in increasing order without "
                             f"overlapping, got [{start}, {stop}) after one ending at {last}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ValueError(f"tensor_scales: a scale must be a number, got {scale!r}")
        with np.errstate(over="ignore"):  # past float32's range is what is being checked
            single = np.float32(scale) if math.isfinite(scale) else np.float32("nan")
        if not (scale > 0 and math.isfinite(single) and single > 0):
            raise ValueError(f"tensor_scales: a scale must be a finite number > 0 in float32, got {scale!r}")
        ranges.append((start, stop, float(single)))
        last = stop
    return tuple(ranges)


def check_dim(ranges: ScaleRanges | None, dim: int) -> None:
    if ranges and ranges[-1][1] > dim:
        raise ValueError(f"tensor_scales: the range ending at {ranges[-1][1]} passes the adapter's dimension {dim}")


@lru_cache(maxsize=2)  # a round's scales serve every direction of every step: expand them once (2: d floats each)
def expand(ranges: ScaleRanges, dim: int) -> np.ndarray:
    """The float32 scale of every element: each range's scale over [start, stop), 1.0 outside every range."""
    check_dim(ranges, dim)
    vector = np.ones(dim, dtype=np.float32)
    for start, stop, scale in ranges:
        vector[start:stop] = np.float32(scale)
    vector.flags.writeable = False
    return vector


def scaled(z: np.ndarray, ranges: ScaleRanges | None) -> np.ndarray:
    """Directions z (float32, [..., d]) times the expanded scales, in float32: d_s of the module's docstring."""
    if ranges is None:
        return z
    return (z * expand(ranges, z.shape[-1])).astype(np.float32)


def round_scales(adapter: np.ndarray, layout, floor: float, block: tuple[int, int] | None = None) -> ScaleRanges:
    """The round's scales from its base adapter: for each layout tensor t (its part inside `block`, if any),
    r_t = max(RMS of t's float32 values, in float64; floor), then normalised so that the expanded scale vector
    has RMS 1 over the elements the round perturbs: scale_t = float32(r_t / sqrt(sum_t n_t r_t^2 / N)), n_t the
    tensor's elements there and N their total. The normalisation keeps a direction's length (a Rademacher
    direction's norm is still sqrt(N)), so eps and the learning rate keep their meaning as the overall size of a
    perturbation and of a step; only its share among the tensors moves. Every sum in a fixed order (math.fsum
    over the tensors in layout order), so the same base gives the same scales on every run and every resume."""
    if not (math.isfinite(floor) and floor > 0):
        raise ValueError(f"the tensor scale floor must be a finite number > 0, got {floor!r}")
    lo, hi = block or (0, layout.dim)
    parts = [(max(t.offset, lo), min(t.end, hi)) for t in layout.tensors if max(t.offset, lo) < min(t.end, hi)]
    w = np.asarray(adapter, dtype=np.float64)
    rms = [max(math.sqrt(math.fsum((w[a:b] ** 2).tolist()) / (b - a)), floor) for a, b in parts]
    norm = math.sqrt(math.fsum((b - a) * r * r for (a, b), r in zip(parts, rms)) / sum(b - a for a, b in parts))
    return check_ranges([(a, b, float(np.float32(r / norm))) for (a, b), r in zip(parts, rms)])  # float32 > 0
