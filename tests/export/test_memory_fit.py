"""Export under a memory budget: lower again at smaller shapes until a device's plan fits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.pipeline import ExportSpec, MemoryFitError, Shapes, device_plan, fit_memory
from tests.conftest import export_bundle

MiB = 2**20


def linear_lowering(bytes_per_position: int, weights: int = 4 * MiB):
    """A stand-in for `lower` whose forward plan grows with P x batch x length, as a real one does."""
    tried = []

    def lower_at(shapes: Shapes):
        tried.append(shapes)
        arena = bytes_per_position * shapes.max_perturbations * shapes.batch_size * shapes.seq_len
        return b"\0" * weights, {"forward": arena, "predict": arena // shapes.max_perturbations}

    return lower_at, tried


def spec(budget, **shapes) -> ExportSpec:
    return ExportSpec(source="x", out=Path("x"), mem_budget=budget, device_runtime=100 * MiB, **shapes)


def test_without_a_budget_the_asked_shapes_are_lowered_once():
    lower_at, tried = linear_lowering(1000)
    _, _, shapes = fit_memory(spec(None, batch_size=4, seq_len=128, max_perturbations=8), lower_at, 1000, print)
    assert tried == [Shapes(4, 128, 8)] == [shapes]


def test_p_shrinks_first_then_batch_then_length_until_the_plan_fits():
    lower_at, tried = linear_lowering(10_000)
    s = spec(130 * MiB, batch_size=4, seq_len=128, max_perturbations=8)  # a 39 MiB plan at P = 8: 143 MiB
    pte, planned, shapes = fit_memory(s, lower_at, 1000, print)
    assert device_plan(s, len(pte), planned, 1000, shapes) <= 130 * MiB
    assert shapes.max_perturbations < 8 and (shapes.batch_size, shapes.seq_len) == (4, 128)
    tighter = spec(106 * MiB, batch_size=4, seq_len=128, max_perturbations=8)
    lower_at, tried = linear_lowering(10_000)
    _, _, shapes = fit_memory(tighter, lower_at, 1000, print)
    assert shapes.max_perturbations == 2 and shapes.batch_size < 4  # P at its floor before the batch shrinks
    assert all(a.max_perturbations >= b.max_perturbations for a, b in zip(tried, tried[1:]))


def test_a_budget_the_weights_alone_pass_is_refused_with_what_would_fit():
    lower_at, _ = linear_lowering(1000, weights=50 * MiB)
    with pytest.raises(MemoryFitError, match="smaller or quantized model"):
        fit_memory(spec(120 * MiB, batch_size=4, seq_len=128, max_perturbations=8), lower_at, 1000, print)


def test_export_with_mem_writes_the_program_that_fits(tmp_path, tiny_llama_bundle):
    first = json.loads((tiny_llama_bundle / "manifest.json").read_text())  # batch 2, seq 16, P 4
    program = first["program"]
    # Room for half the forward plan: P must drop from 4 to 2.
    budget = (256 * MiB + program["bytes"] + program["planned_memory_bytes"]["forward"] // 2
              + 4 * first["adapter"]["dim"] * 4 + 4096)
    out = export_bundle(tmp_path / "fit", "--preset", "tiny-llama", "--batch-size", "2", "--seq-len", "16",
                        "--max-perturbations", "4", "--mem", f"{budget}B")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"] == {"batch_size": 2, "seq_len": 16, "max_perturbations": 2}
    assert manifest["program"]["device_plan_bytes"] <= budget == manifest["program"]["mem_budget_bytes"]
