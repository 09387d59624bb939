"""The Java direction generator (android_demo/core) against the committed golden vectors."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from tests.conftest import ROOT

CORE = ROOT / "android_demo" / "core" / "src"
GOLDEN = json.loads((ROOT / "docs" / "golden" / "directions.json").read_text())


@pytest.fixture(scope="module")
def java_golden(tmp_path_factory):
    if not shutil.which("javac"):
        pytest.skip("no JDK here")
    classes = tmp_path_factory.mktemp("classes")
    sources = [str(p) for p in CORE.rglob("*.java")]
    subprocess.run(["javac", "--release", "11", "-d", str(classes), *sources], check=True)
    seeds = list(GOLDEN["words"])
    out = subprocess.run(["java", "-cp", str(classes), "org.fwdfed.core.GoldenDump", *seeds], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return json.loads(out)


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
