"""Per-tensor perturbation scales: the ranges off the wire, the scaled directions (golden), every zeroth-order
method moving along them, and aggregation with them recomputed to the same bits."""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from fwdfed import methods, protocol
from fwdfed import task_keys as keys
from fwdfed.batch import Batch
from fwdfed.bundle.layout import AdapterLayout
from fwdfed.directions import KINDS, block_direction, direction_slice
from fwdfed.tensor_scale import check_dim, check_ranges, expand, round_scales, scaled
from fwdfed.update import SeedUpdate, apply_sums, weighted_sum
from tests.fwdfed.methods.test_registry import Quadratic

GOLDEN = Path(__file__).resolve().parents[2] / "docs" / "golden" / "tensor_scales.json"


def from_bits(hexes: list[str]) -> np.ndarray:
    return np.array([int(b, 16) for b in hexes], np.uint32).view(np.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_scaled_directions_and_their_aggregation_match_the_golden_bits(kind):
    golden = json.loads(GOLDEN.read_text())
    ranges, d, block = check_ranges(golden["tensor_scales"]), golden["d"], tuple(golden["block"])
    seeds = [int(s) for s in golden["seeds"]]
    expected = golden["kinds"][kind]
    for seed, whole, blocked in zip(seeds, expected["directions_float32_bits"],
                                    expected["block_directions_float32_bits"], strict=True):
        z = scaled(block_direction(seed, d, kind), ranges)
        assert z.dtype == np.float32 and z.view(np.uint32).tolist() == from_bits(whole).view(np.uint32).tolist()
        np.testing.assert_array_equal(scaled(block_direction(seed, d, kind, block), ranges), from_bits(blocked))
    after = apply_sums(from_bits(golden["start_float32_bits"]), dict(zip(seeds, golden["coefs"])), 0.0, kind, block,
                       None, ranges).astype("<f4")
    assert hashlib.sha256(after.tobytes()).hexdigest() == expected["aggregated_sha256"]
    # by the definition, element by element: each direction element is float32(z * float32(scale)), 1 in the gap
    factor = np.ones(d, np.float32)
    for start, stop, scale in golden["tensor_scales"]:
        factor[start:stop] = np.float32(scale)
    for seed, whole in zip(seeds, expected["directions_float32_bits"]):
        np.testing.assert_array_equal(block_direction(seed, d, kind) * factor, from_bits(whole))


@pytest.mark.parametrize("bad, fault", [
    ([], "list of 1 to"),
    ("0,4,1", "list of 1 to"),
    ([[0, 4]], r"\[start, stop, scale\]"),
    ([[0, 4, -1.0]], "finite number > 0"),
    ([[0, 4, 0.0]], "finite number > 0"),
    ([[0, 4, math.nan]], "finite number > 0"),
    ([[0, 4, math.inf]], "finite number > 0"),
    ([[0, 4, 1e39]], "in float32"),  # finite in float64, infinite as the float32 a device multiplies by
    ([[0, 4, 1e-46]], "in float32"),  # rounds to 0 in float32
    ([[0, 4, True]], "must be a number"),
    ([[0, 4, "1"]], "must be a number"),
    ([[0.0, 4, 1.0]], "integers"),
    ([[-1, 4, 1.0]], "0 <= start < stop"),
    ([[4, 4, 1.0]], "0 <= start < stop"),
    ([[0, 4, 1.0], [3, 8, 1.0]], "without overlapping"),
    ([[4, 8, 1.0], [0, 4, 1.0]], "increasing order"),
])
def test_bad_ranges_get_one_clear_error(bad, fault):
    with pytest.raises(ValueError, match=fault):
        check_ranges(bad)


def test_ranges_past_the_adapter_are_refused_and_the_rest_expand_with_one_outside_them():
    ranges = check_ranges([[1, 3, 2.0], [5, 6, 0.25]])
    with pytest.raises(ValueError, match="passes the adapter's dimension 5"):
        check_dim(ranges, 5)
    np.testing.assert_array_equal(expand(ranges, 7), np.array([1, 2, 2, 1, 1, 0.25, 1], np.float32))
    assert check_ranges([[0, 2, 1]]) == ((0, 2, 1.0),)  # an int scale is a number too


def test_a_task_with_scales_crosses_the_wire_and_malformed_ones_do_not():
    hparams = {keys.LR: 1e-3, keys.TENSOR_SCALES: [[0, 4, 0.5], [4, 8, 2.0]]}
    task = protocol.Task(task_id="t", job_id="j", round=1, global_version=0, base_model_hash="a" * 64,
                         adapter=b"\0" * 32, adapter_sha256="b" * 64, method="fzoo", hparams=hparams,
                         deadline_s=1.0, reference=b"")
    assert protocol.decode(task.to_wire()).hparams == hparams
    for bad in ([[0, 4, math.nan]], [[0, 4]], [[0, "4", 1.0]], 3.0, [[0, 4, 1.0]] * 4097):
        frame = protocol.Task(**{**task.__dict__, "hparams": {keys.TENSOR_SCALES: bad}}).to_wire()
        with pytest.raises(protocol.ProtocolError, match="tensor_scales"):
            protocol.decode(frame)
    with pytest.raises(protocol.ProtocolError, match="finite numbers or short strings"):  # only that key is a list
        protocol.decode(protocol.Task(**{**task.__dict__, "hparams": {keys.LR: [[0, 4, 1.0]]}}).to_wire())


LAYOUT = AdapterLayout.from_shapes([("lora_A", (2, 4)), ("lora_B", (4, 2)), ("head.weight", (2, 3)), ("head.bias", (2,))])


def test_round_scales_are_each_tensors_rms_at_least_the_floor_normalised_to_rms_one():
    w = np.zeros(LAYOUT.dim, np.float32)
    w[0:8] = 0.03  # LoRA A; LoRA B is 0
    w[16:22], w[22:24] = [80, -80, 80, -80, 80, -80], [-500, 500]
    ranges = round_scales(w, LAYOUT, floor=0.01)
    assert [(a, b) for a, b, _ in ranges] == [(0, 8), (8, 16), (16, 22), (22, 24)]
    raw = np.array([0.03, 0.01, 80, 500])
    np.testing.assert_allclose([s for _, _, s in ranges], raw / math.sqrt((8 * raw[:2] ** 2).sum() / 24 + (
        6 * 80**2 + 2 * 500**2) / 24), rtol=1e-7)
    assert float(np.sqrt(np.mean(expand(ranges, LAYOUT.dim).astype(np.float64) ** 2))) == pytest.approx(1, rel=1e-6)
    # inside a block, only the tensors' parts there count, and their RMS is 1 there
    blocked = round_scales(w, LAYOUT, floor=0.01, block=(4, 20))
    assert [(a, b) for a, b, _ in blocked] == [(4, 8), (8, 16), (16, 20)]
    assert float(np.sqrt(np.mean(expand(blocked, LAYOUT.dim)[4:20].astype(np.float64) ** 2))) == pytest.approx(1, rel=1e-6)
    # a floor above every RMS makes every scale 1: the unscaled directions
    assert {s for _, _, s in round_scales(w, LAYOUT, floor=1e4)} == {1.0}
    assert round_scales(w.copy(), LAYOUT, 0.01) == ranges  # a function of the base alone
    with pytest.raises(ValueError, match="floor"):
        round_scales(w, LAYOUT, floor=0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_aggregation_with_scales_is_the_sum_of_the_scaled_directions_and_recomputes_to_the_same_bits(kind):
    rng = np.random.default_rng(3)
    w = rng.standard_normal(LAYOUT.dim).astype(np.float32)
    ranges = round_scales(w, LAYOUT, 0.01)
    updates = [(0.25, SeedUpdate([(5, 1e-3), (9, -2e-3)])), (0.75, SeedUpdate([(9, 4e-4), (11, 3e-3)], scale=0.999))]
    got = weighted_sum(w, updates, kind, None, ranges)
    # the documented order: C_s per seed in order of first appearance, C_s * d_s from w in float64, then S * w
    sums = {5: 0.25 * 1e-3, 9: 0.25 * -2e-3 + 0.75 * 4e-4, 11: 0.75 * 3e-3}
    expected = w.astype(np.float64)
    for seed, coef in sums.items():
        expected = expected + coef * scaled(direction_slice(seed, 0, LAYOUT.dim, kind), ranges).astype(np.float64)
    expected = expected + 0.75 * (0.999 - 1.0) * w.astype(np.float64)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(weighted_sum(w.copy(), updates, kind, None, ranges), got)
    assert not np.array_equal(got, weighted_sum(w, updates, kind))  # the scales do change the result
    # one update's delta (the device's loss after, the other rules) is the same sum
    one = updates[0][1]
    np.testing.assert_allclose(one.delta(w, kind, None, ranges), weighted_sum(w, [(1.0, one)], kind, None, ranges) - w,
                               atol=1e-12)


# fedkd takes MeZO's step (its config's step fields, the scales among them) on its distillation objective
ZEROTH_ORDER = [("mezo", {}), ("onesided", {}), ("fzoo", {}), ("fwdgrad", {keys.KIND: "rademacher"})]


@pytest.mark.parametrize("name, extra", ZEROTH_ORDER, ids=[m[0] for m in ZEROTH_ORDER])
def test_every_zeroth_order_method_moves_only_along_the_scaled_directions(name, extra):
    """With the head's range scaled to 0-ish (1e-30) and the LoRA's by 2, a step changes the head by nothing
    measurable, and the update's pairs, replayed with the scales, give the optimizer's own adapter."""
    d = 24
    method = methods.get(name)
    ranges = [[0, 16, 2.0], [16, 24, 1e-30]]
    hparams = {keys.LR: 1e-2, keys.EPS: 1e-3, keys.LOCAL_STEPS: 5, keys.DIRECTIONS: 4, **extra,
               keys.TENSOR_SCALES: ranges}
    config = method.config.from_hparams(hparams)
    assert config.scales == check_ranges(ranges)
    start = np.full(d, 0.5, np.float32)
    optimizer = method.make_optimizer(Quadratic(np.ones(d)), start, config, np.random.default_rng(0))
    run = optimizer.train([Batch(None, None, None, np.ones(2, np.float32))], 5)
    moved = run.update.apply(start, config.kind, config.block, config.scales) - start
    assert np.count_nonzero(moved[:16]) >= 12 and np.abs(moved[16:]).max() < 1e-20
    if name != "fwdgrad":  # the forward gradient uploads its estimate and leaves its adapter where it was
        np.testing.assert_allclose(run.update.apply(start, config.kind, config.block, config.scales),
                                   optimizer.adapter, atol=1e-6)


def test_a_task_without_scales_reads_none_and_a_bad_one_is_refused_by_the_method():
    base = {keys.LR: 1e-3, keys.EPS: 1e-3}
    assert methods.get("fzoo").config.from_hparams(base).scales is None
    with pytest.raises(ValueError, match="tensor_scales"):
        methods.get("fzoo").config.from_hparams(base | {keys.TENSOR_SCALES: [[0, 4, -1.0]]})
