"""The memory budget enforced while training.

The kernel's high-water mark (VmHWM) is checked after every step; the first step whose
measured peak passed the budget stops the device with an error. (A check after the step
cannot stop the allocation that passed it; the plan, `fwdfed.memory_plan`, is what keeps
steps under.)
"""

from __future__ import annotations

from fwdfed.memory import format_size, peak_rss
from fwdfed.memory_plan import BudgetError


class BudgetGuard:
    """Called after every training step: stops the device once its measured peak passed the budget."""

    def __init__(self, budget: int | None):
        self.budget, self.steps = budget, 0

    def __call__(self) -> None:
        self.steps += 1
        if self.budget is not None and (peak := peak_rss()) > self.budget:
            raise BudgetError(f"peak memory {format_size(peak)} passed the {format_size(self.budget)} budget "
                              f"at training step {self.steps}: stopping")
