"""The memory plan: what a training step holds, added up before anything is loaded.

The plan adds up what a training step holds: the runtime as measured now (interpreter,
torch, ExecuTorch; before any model), the program's weights (the `.pte`'s bytes: a quantized
base's int4/int8 weights as stored; what XNNPACK's packing of them takes beyond that at load is
in the measured workspace below), its planned activation arena
(ExecuTorch's memory plan at the program's largest P, one arena its methods share), what the
backend holds beyond that plan (measured by the exporter on a real step), the adapter copies the method needs
(the fp32 master, 2n perturbed copies and n directions), and the tokenized data. When that
is over the budget the device refuses before loading the program, saying what would fit.
A streamed bundle (`fwdfed.model.stages`) holds one stage at a time: its weights are the
largest stage's, its activations the largest stage's arena plus the hidden states carried
between stages. The exporter plans with the same function (`python -m export --mem`), so both agree; the
device enforces the budget while training with `device_sdk.budget.BudgetGuard`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fwdfed import methods
from fwdfed.bundle.manifest import Bundle
from fwdfed.bundle.schema import Program
from fwdfed.errors import UserError
from fwdfed.memory import current_rss, format_size


class BudgetError(UserError):
    """The budget cannot be kept; the message says by how much and what would fit."""


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    runtime: int
    weights: int
    activations: int  # the planned arena: the largest method's plan (`planned_arena`)
    workspace: int  # measured at export: the backend's buffers, thread pools and first-run state beyond the plan
    adapters: int
    data: int
    directions: int  # n per step: 2n perturbed copies, evaluated P at a time
    phase: str = "training"  # or "teacher labelling" (fedkd): what the program loaded does
    # A split program's prefix states (fwdfed.model.split): float16, memory-mapped from a file, counted
    # whole since every page of it may be resident once the steps have cycled through the shard
    prefix_states: int = 0

    @property
    def total(self) -> int:
        return (self.runtime + self.weights + self.activations + self.workspace + self.adapters + self.data
                + self.prefix_states)

    def describe(self) -> str:
        parts = ", ".join(f"{name} {format_size(v)}" for name, v in (
            ("runtime", self.runtime), ("weights", self.weights), ("activations", self.activations),
            ("backend beyond the plan", self.workspace), ("adapters", self.adapters), ("data", self.data),
            *([("prefix states", self.prefix_states)] if self.prefix_states else [])))
        what = f"{self.directions} direction(s) per step" if self.phase == "training" else self.phase
        return (f"memory plan: {parts} = {format_size(self.total)} of the {format_size(self.budget)} budget "
                f"({what})")


def planned_arena(program: Program) -> int:
    """The planned buffers the runtime allocates for the manifest's `program`: ExecuTorch's Python
    runtime gives the host-only methods of one program one set of arenas, sized to the largest
    method's plan, so predict loaded beside forward adds nothing (measured: running predict after
    forward added 0.1 MB to the resident memory, for a 4.1 MB predict plan)."""
    return int(max(program.planned_memory_bytes.values()))


def streamed_activations(program: Program) -> int:
    """A streamed program's activations: the largest stage's planned arena (one stage is loaded at a
    time) and the hidden states the engine carries between stages, a block's input and output both
    alive, for each of its calls (`runtime.stream`)."""
    return int(max(s.planned_memory_bytes for s in program.stages) + 2 * program.hidden_bytes)


def prefix_state_bytes(manifest, num_examples: int) -> int:
    """The float16 prefix states a device keeps for its examples, in whole batches (0 unless split)."""
    split = manifest.program.split
    if split is None:
        return 0
    b, length = manifest.inputs.batch_size, manifest.inputs.seq_len
    return -(-num_examples // b) * b * length * int(split.hidden_size) * 2


def plan_memory(bundle: Bundle, budget: int, num_examples: int, directions: int,
                runtime: int | None = None, method: str | None = "mezo", phase: str = "training") -> MemoryPlan:
    """The plan for `directions` per step of `method`, or BudgetError. A step holds all its
    directions and perturbed copies at once (the method says how many adapter copies that is),
    however many program calls (of at most P vectors) it takes. `method` None: inference (one
    adapter vector), as a teacher's labelling is.
    `runtime`: the baseline measured before anything was loaded (default: measured now)."""
    m = bundle.manifest
    d = m.adapter_dim
    n = max(1, directions)
    if m.streamed:  # one stage's weights at a time: the largest stage's file
        weights, activations = int(m.program.largest_stage_bytes), streamed_activations(m.program)
    else:
        weights = int(m.program.bytes or bundle.program_path.stat().st_size)
        activations = planned_arena(m.program)
    plan = MemoryPlan(
        budget=budget,
        runtime=current_rss() if runtime is None else runtime,
        weights=weights,
        activations=activations,
        workspace=int(m.program.workspace_bytes),
        adapters=(1 if method is None else methods.get(method).adapter_copies(n)) * d * 4,
        data=num_examples * m.inputs.seq_len * 8 * 3,
        directions=n,
        phase=phase,
        prefix_states=prefix_state_bytes(m, num_examples) if method is not None else 0,
    )
    if plan.total > budget:
        over = plan.total - budget
        quantized = m.quantization is not None
        quantize_hint = [] if quantized else ["a quantized base (export --quantize 8da4w)"]
        hints = ["a smaller base model", "a smaller adapter (a lower LoRA rank, fewer virtual tokens)",
                 "a smaller --batch-size or --seq-len at export", *quantize_hint]
        if plan.runtime > budget:
            hints = [f"nothing: the runtime alone (Python, torch, ExecuTorch) needs {format_size(plan.runtime)}"]
        elif plan.runtime + plan.weights > budget:
            hints = [f"a smaller{'' if quantized else ' or quantized'} base model: the runtime and weights alone "
                     f"need {format_size(plan.runtime + plan.weights)}"]
        raise BudgetError(f"{plan.describe()}: {format_size(over)} over. Would fit: {'; or '.join(hints)}")
    return plan


@dataclass(frozen=True)
class PhasedPlan:
    """A device that runs two programs one after the other (fedkd: the teacher labels the data and is
    freed, then the student trains) holds one of them at a time: its peak is the larger phase's, not
    the sum. Each phase is a plan of its own, checked against the whole budget."""
    phases: tuple[MemoryPlan, ...]

    @property
    def total(self) -> int:
        return max(p.total for p in self.phases)

    def describe(self) -> str:
        larger = max(self.phases, key=lambda p: p.total)
        return (f"peak = max({', '.join(f'{p.phase} {format_size(p.total)}' for p in self.phases)}) = "
                f"{format_size(self.total)}, the {larger.phase} phase; " +
                "; ".join(f"{p.phase}: {p.describe()}" for p in self.phases))


def plan_teacher_then_student(teacher: Bundle, student: Bundle, budget: int, num_examples: int, directions: int,
                              runtime: int | None = None, method: str = "fedkd") -> PhasedPlan:
    """The plan of a distilling device: teacher inference over its shard, then student training; each
    phase must fit the budget on its own (BudgetError names the phase that does not)."""
    runtime = current_rss() if runtime is None else runtime
    phases = []
    for bundle, phase, m in ((teacher, "teacher labelling", None), (student, "student training", method)):
        try:
            phases.append(plan_memory(bundle, budget, num_examples, directions, runtime=runtime, method=m, phase=phase))
        except BudgetError as e:
            raise BudgetError(f"{phase}: {e}") from None
    return PhasedPlan(tuple(phases))
