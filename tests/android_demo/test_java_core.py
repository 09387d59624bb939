"""The Java core's own unit tests, and its direction generator against the committed golden vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import ROOT

GOLDEN = json.loads((ROOT / "docs" / "golden" / "directions.json").read_text())


def test_java_unit_tests_pass(java_core):
    """android_demo/core/src/test: codec, hostile lengths, MeZO/fwdgrad/onesided semantics on a
    closed-form loss, hostile tasks refused before the program runs, memory plan and guard, data
    cut, tokenizer pipeline, batch shapes."""
    result = java_core.run("UnitTests", check=False, timeout=120)
    out = result.stdout.decode()
    print(out)
    assert result.returncode == 0, out[-5000:] + result.stderr.decode()[-2000:]
    passed = [line for line in out.splitlines() if line.startswith("PASS ")]
    assert len(passed) >= 20 and "0 failed" in out


@pytest.fixture(scope="module")
def java_golden(java_core):
    seeds = list(GOLDEN["words"])
    return json.loads(java_core.run("GoldenDump", *seeds, timeout=120).stdout)


def test_java_words_and_rademacher_are_bit_identical(java_golden):
    for seed, got in java_golden.items():
        assert got["words"] == GOLDEN["words"][seed]
        assert got["rademacher_256"] == GOLDEN["rademacher_256"][seed]
        assert got["rademacher_1000000_sha256_of_int8"] == GOLDEN["rademacher_1000000_sha256_of_int8"][seed]


def test_java_gaussian_is_within_one_ulp_of_the_golden_bits(java_golden):
    exact = total = 0
    for seed, got in java_golden.items():
        ours = np.array([int(b, 16) for b in got["gaussian_256_float32_bits"]], dtype=np.uint32).view(np.float32)
        gold = np.array([int(b, 16) for b in GOLDEN["gaussian_256_float32_bits"][seed]], dtype=np.uint32).view(np.float32)
        ulps = np.abs(ours.view(np.int32).astype(np.int64) - gold.view(np.int32).astype(np.int64))
        assert ulps.max() <= 1, (seed, ulps.max())
        exact, total = exact + int((ulps == 0).sum()), total + ulps.size
    print(f"Java gaussian: {exact} of {total} floats bit-identical, the rest within 1 ulp")


def test_java_seed_pools_are_the_golden_ones(java_core):
    pools = GOLDEN["seed_pool"].values()
    got = json.loads(java_core.run("SeedPoolDump", *(p["key"] for p in pools), timeout=60).stdout)
    assert got == {p["key"]: p["seeds"] for p in pools}


def test_java_replays_the_golden_versions_bit_for_bit(java_core):
    """docs/golden/replay.json through the Java codec and Replay: every version's float32 bits and sha256.
    Rademacher must be exact; Gaussian is exact where the platform's log, cos and sin give the golden directions
    (a device where they do not fails the sha256 check and takes the dense adapter instead)."""
    golden = json.loads((ROOT / "docs" / "golden" / "replay.json").read_text())
    got = json.loads(java_core.run("ReplayDump", str(ROOT / "docs" / "golden" / "replay.json"), timeout=60).stdout)
    assert got["rademacher"] == golden["kinds"]["rademacher"]
    for ours, gold in zip(got["gaussian"], golden["kinds"]["gaussian"], strict=True):
        ulps = np.abs(np.array([int(b, 16) for b in ours["float32_bits"]], np.int64)
                      - np.array([int(b, 16) for b in gold["float32_bits"]], np.int64))
        assert ulps.max() <= 1, ours["version"]


def test_java_scales_directions_as_the_golden_file_says(java_core):
    """docs/golden/tensor_scales.json through the Java codec and a task's config (StepConfig.direction): the
    scaled directions, whole and restricted to the block. Rademacher must be exact (±scale); Gaussian within
    1 ulp, as its unscaled directions are."""
    golden = json.loads((ROOT / "docs" / "golden" / "tensor_scales.json").read_text())
    got = json.loads(java_core.run("TensorScalesDump", str(ROOT / "docs" / "golden" / "tensor_scales.json"),
                                   timeout=60).stdout)
    for kind, expected in golden["kinds"].items():
        for name in ("directions_float32_bits", "block_directions_float32_bits"):
            if kind == "rademacher":
                assert got[kind][name] == expected[name], name
            else:
                ulps = np.abs(np.array([[int(b, 16) for b in z] for z in got[kind][name]], np.int64)
                              - np.array([[int(b, 16) for b in z] for z in expected[name]], np.int64))
                assert ulps.max() <= 1, name
