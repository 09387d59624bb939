import pytest

from device_sdk.budget import BudgetGuard
from fwdfed.bundle.manifest import load_bundle
from fwdfed.memory import peak_rss
from fwdfed.memory_plan import BudgetError, plan_memory


def test_the_plan_adds_up_what_a_step_holds(tiny_llama_bundle):
    bundle = load_bundle(tiny_llama_bundle)
    m = bundle.manifest
    plan = plan_memory(bundle, 2**40, num_examples=100, directions=99)
    assert plan.directions == 99  # all held at once, however many program calls evaluate them
    assert plan_memory(bundle, 2**40, 100, 99, runtime=123).runtime == 123
    # The methods share one arena, sized to the largest plan.
    assert plan.activations == max(m.program.planned_memory_bytes.values()) and plan.weights == m.program.bytes
    assert plan.workspace == m.program.workspace_bytes  # measured by the exporter
    assert plan.adapters == (1 + 3 * plan.directions) * m.adapter_dim * 4
    assert plan.total == (plan.runtime + plan.weights + plan.activations + plan.workspace + plan.adapters
                          + plan.data)
    assert "memory plan: runtime" in plan.describe()
    with pytest.raises(BudgetError, match="over. Would fit"):
        plan_memory(bundle, plan.total // 2, num_examples=100, directions=99)


def test_the_guard_stops_once_the_measured_peak_passes_the_budget():
    BudgetGuard(None)()
    BudgetGuard(peak_rss() * 2)()
    with pytest.raises(BudgetError, match="passed the .* budget at training step 1"):
        BudgetGuard(peak_rss() // 2)()
