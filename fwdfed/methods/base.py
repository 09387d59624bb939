"""What a training method is: the one description every side reads.

A method names what a device does with a task (its config, checked from the task's
hyperparameters, and its optimizer) and what the rest of the system needs to know about it:
the command-line flags of its own hyperparameters, the adapter copies a step holds (the
memory plan), how many (seed, coefficient) pairs and what `scale` an honest answer has (the
coordinator's checks), and whether the coordinator sends the previous global update with a
task or may ask for more waves of perturbations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fwdfed import task_keys as keys
from fwdfed.batch import Batch
from fwdfed.methods.estimate import LocalRun

COMMON_HPARAMS = keys.COMMON  # the task hyperparameters every method reads; a method's own are its `hparams`


@dataclass(frozen=True)
class Hparam:
    """A task hyperparameter of one method: `python -m coordinator serve --<name>` sets it."""
    name: str  # as in the task's hparams (fwdfed.task_keys); the flag is --name-with-dashes
    type: type  # int, float or str
    default: Any
    help: str
    choices: tuple | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


class Optimizer(Protocol):
    def train(self, batches: list[Batch], steps: int, guard: Callable[[], None] | None = None) -> LocalRun: ...


def one_master_and_three_per_direction(directions: int) -> int:
    """The fp32 master, and per direction the direction and its two perturbed copies."""
    return 1 + 3 * max(1, directions)


def unit_scale(hparams: dict) -> tuple[float, float]:
    return 1.0, 1.0


@dataclass(frozen=True)
class Method:
    name: str  # what a task's `method` says
    summary: str  # one line, for --help
    config: type  # a frozen dataclass; `config.from_hparams(hparams)` checks every value (ValueError)
    optimizer: Callable[..., Optimizer]  # (engine, adapter, config, rng, reference) -> Optimizer
    hparams: tuple[Hparam, ...] = ()  # its own task hyperparameters, beyond COMMON_HPARAMS
    default_directions: int = 1
    default_kind: str = "rademacher"
    needs_autograd: bool = False  # runs on the eager engine (autograd), not the ExecuTorch program
    uses_reference: bool = False  # the task carries the previous round's global update
    estimates_gradient: bool = False  # an update is -lr x a gradient estimate at the global adapter,
    # so the coordinator can measure the variance of the round's mean estimate and ask for more waves
    adapter_copies: Callable[[int], int] = one_master_and_three_per_direction  # adapter vectors a step holds
    scale_range: Callable[[dict], tuple[float, float]] = unit_scale  # of an honest update's `scale`
    passes_per_pair: int = 2  # forward passes per direction (central differences: w + eps z and w - eps z)
    passes_per_step: int = 0  # forward passes per local step besides those (onesided: the shared L(w))
    passes_per_batch: int = 0  # forward passes per batch of the device's data (class statistics: one)
    # A method whose `dense` is not a change of the adapter says how long it is (from the task's
    # hyperparameters) and how the coordinator turns the round's answers into the next adapter.
    dense_length: Callable[[dict], int] | None = None
    coordinator_aggregate: Callable | None = None  # (global, [dense], hparams, layout) -> next global
    # A method whose `dense` is a change of one span [start, stop) of the adapter only (hybrid: its head) says
    # which, from the task's hyperparameters; the update carries those stop - start values, placed there.
    dense_span: Callable[[dict], tuple[int, int]] | None = None
    # Task hyperparameters the coordinator computes from the bundle's adapter layout for every task of a job
    # (hybrid: where its head lies, and the block its directions keep to).
    layout_hparams: Callable | None = None  # (AdapterLayout) -> dict
    selectable: bool = True  # a job's --method; False: only the coordinator schedules it (class-stats)
    # The device labels its data with a teacher program first (fedkd): the job names the teacher by its
    # program's sha256 (`coordinator serve --teacher-bundle`), the task carries it as `teacher_sha256`.
    needs_teacher: bool = False

    def allowed_pairs(self, hparams: dict) -> int:
        """(seed, coefficient) pairs an honest answer has at most: one per direction per local step."""
        return int(hparams.get(keys.LOCAL_STEPS, 1)) * int(hparams.get(keys.DIRECTIONS, 1))

    def forward_passes(self, num_pairs: int, hparams: dict, num_examples: int = 0, batch_size: int = 1) -> int:
        """Forward passes (one batch, one adapter vector each) an update of `num_pairs` pairs took, on a
        device of `num_examples` examples in batches of `batch_size`."""
        return (self.passes_per_pair * num_pairs + self.passes_per_step * int(hparams.get(keys.LOCAL_STEPS, 1))
                + self.passes_per_batch * -(-num_examples // max(batch_size, 1)))

    def make_optimizer(self, engine, adapter: np.ndarray, config, rng: np.random.Generator,
                       reference: np.ndarray | None = None) -> Optimizer:
        return self.optimizer(engine, adapter, config, rng, reference)
