"""Export under a memory budget: build again at smaller shapes until a device's plan fits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.passes import MemoryFitError, fit_memory
from export.spec import ExportSpec, Shapes
from tests.conftest import export_bundle

MiB = 2**20


def linear_build(fixed: int, bytes_per_position: int, workspace: int = 0):
    """A stand-in for the lower..measure passes whose plan grows with P x batch x length, as a real one's
    does, beside a measured workspace that does not (XNNPACK's thread pool and packed weights)."""
    tried = []

    def build_at(shapes: Shapes):
        tried.append(shapes)
        arena = bytes_per_position * shapes.max_perturbations * shapes.batch_size * shapes.seq_len
        return shapes, fixed + workspace + arena, arena, fixed

    return build_at, tried


def spec(budget, **shapes) -> ExportSpec:
    return ExportSpec(source="x", out=Path("x"), mem_budget=budget, **shapes)


def test_without_a_budget_the_asked_shapes_are_built_once():
    build_at, tried = linear_build(100 * MiB, 10_000)
    assert fit_memory(spec(None, batch_size=4, seq_len=128, max_perturbations=8), build_at, print) == Shapes(4, 128, 8)
    assert tried == [Shapes(4, 128, 8)]


def test_p_shrinks_first_then_batch_then_length_until_the_plan_fits():
    build_at, tried = linear_build(100 * MiB, 10_000)  # a 39 MiB plan at P 8 x batch 4 x 128
    shapes = fit_memory(spec(130 * MiB, batch_size=4, seq_len=128, max_perturbations=8), build_at, print)
    assert 100 * MiB + 10_000 * 4 * 128 * shapes.max_perturbations <= 130 * MiB
    assert 2 <= shapes.max_perturbations < 8 and (shapes.batch_size, shapes.seq_len) == (4, 128)
    build_at, tried = linear_build(100 * MiB, 10_000)
    shapes = fit_memory(spec(102 * MiB, batch_size=4, seq_len=128, max_perturbations=8), build_at, print)
    assert shapes.max_perturbations == 2 and shapes.batch_size < 4  # P at its floor before the batch shrinks
    assert all(a.max_perturbations >= b.max_perturbations for a, b in zip(tried, tried[1:]))


def test_a_workspace_that_does_not_shrink_costs_no_extra_tries():
    build_at, tried = linear_build(100 * MiB, 10_000, workspace=140 * MiB)  # a 39 MiB arena at P 8 x batch 4 x 128
    shapes = fit_memory(spec(260 * MiB, batch_size=4, seq_len=128, max_perturbations=8), build_at, print)
    assert len(tried) == 2 and 2 < shapes.max_perturbations < 8


def test_a_budget_the_fixed_part_alone_passes_is_refused_with_what_would_fit():
    build_at, _ = linear_build(150 * MiB, 10_000)
    with pytest.raises(MemoryFitError, match="use a smaller model, a smaller adapter, or --quantize 8da4w"):
        fit_memory(spec(120 * MiB, batch_size=4, seq_len=128, max_perturbations=8), build_at, print)


def test_export_with_mem_measures_a_step_and_writes_the_program_that_fits(tmp_path, tiny_llama_bundle):
    small = json.loads((tiny_llama_bundle / "manifest.json").read_text())["program"]  # batch 2, seq 16, P 4
    assert small["measured_step_peak_bytes"] > small["measured_runtime_bytes"] > 0
    # At batch 4 x 64 the forward plan grows by ~1.1 MB per adapter vector, far above the noise of
    # the measurement: 6 MB over the small program's plan leaves room for P = 2, not for P = 8.
    budget = small["device_plan_bytes"] + 6_000_000
    out = export_bundle(tmp_path / "fit", "--preset", "tiny-llama", "--batch-size", "4", "--seq-len", "64",
                        "--max-perturbations", "8", "--mem", f"{budget}B")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["max_perturbations"] < 8
    assert manifest["program"]["device_plan_bytes"] <= budget == manifest["program"]["mem_budget_bytes"]
