"""FedKD, forward-only: MeZO on a loss that mixes the hard labels with a teacher's distribution.

A teacher (a model fine-tuned on the server with backprop, on public data: `python -m
export.teacher`) is exported as an inference-only program and given to every device beside the
student's bundle. Before its first task the device runs the teacher over its shard once, keeps
the teacher's logits per example (B x C floats a batch), and frees the teacher's program
(`runtime.teacher`): the teacher and the student are never resident together, so the
device's peak is the larger of the two phases, not their sum (`fwdfed.memory_plan`). Each
local step is then MeZO's (central differences along seeded directions, the same upload) on

    L = (1 - a) CE(student, y) + a T^2 KL(softmax(teacher / T) || softmax(student / T))

per example, with a = `--kd-weight` in [0, 1] and T = `--kd-temperature` > 0 (Hinton et al.'s
T^2 keeps the soft part's gradient scale independent of T). An unlabelled example (an empty label
cell: most of what a phone holds) has no CE term: its loss is the teacher's part alone,
T^2 KL(...). The class-statistics round of a fedkd job (`--head-init lda`) counts each example
towards the classes by the same target, q = (1 - a) onehot(y) + a softmax(teacher / T), or
softmax(teacher / T) alone when unlabelled (`soft_targets`). The student's logits for the P
adapter vectors of a call come from the program's `logits` method (`python -m export
--distillation`); the loss is taken on the device, a few numbers per example.

A task names the teacher by its program's sha256 (`teacher_sha256`); a device that holds
another teacher, or none, refuses the task.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from fwdfed import task_keys as keys
from fwdfed.batch import Batch
from fwdfed.bundle.tasks import IGNORE_INDEX
from fwdfed.methods.base import Hparam, Method
from fwdfed.methods.estimate import LocalRun, StepConfig, hparam
from fwdfed.methods.mezo import Mezo, MezoConfig

MAX_TEMPERATURE = 100.0  # softmax(z / T) is uniform to float precision well before this
DEFAULT_WEIGHT, DEFAULT_TEMPERATURE = 0.5, 2.0
SHA256 = re.compile(r"[0-9a-f]{64}")


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def distillation_loss(student_logits: np.ndarray, labels: np.ndarray, teacher_logits: np.ndarray,
                      weight: float, temperature: float) -> np.ndarray:
    """Per-example (1 - a) CE(student, y) + a T^2 KL(teacher_T || student_T), [P, B], for student
    logits [P, B, C] (P adapter vectors), labels [B] and the teacher's logits [B, C]; an unlabelled
    example (label IGNORE_INDEX) gets T^2 KL alone."""
    s = np.asarray(student_logits, dtype=np.float64)
    t = np.asarray(teacher_logits, dtype=np.float64)[None]
    y = np.asarray(labels, dtype=np.int64)
    known = y != IGNORE_INDEX
    ce = -np.take_along_axis(log_softmax(s), np.where(known, y, 0)[None, :, None], axis=-1)[..., 0]
    log_t, log_s = log_softmax(t / temperature), log_softmax(s / temperature)
    kl = temperature**2 * (np.exp(log_t) * (log_t - log_s)).sum(axis=-1)
    return np.where(known, (1.0 - weight) * ce + weight * kl, kl)


def soft_targets(labels: np.ndarray, teacher_logits: np.ndarray, weight: float, temperature: float) -> np.ndarray:
    """Each example's target distribution [B, C]: (1 - a) onehot(y) + a softmax(teacher / T), or the
    teacher's softmax alone for an unlabelled example."""
    teacher = np.exp(log_softmax(np.asarray(teacher_logits, dtype=np.float64) / temperature))
    y = np.asarray(labels, dtype=np.int64)
    known = y != IGNORE_INDEX
    onehot = np.zeros_like(teacher)
    onehot[known, y[known]] = 1.0
    return np.where(known[:, None], (1.0 - weight) * onehot + weight * teacher, teacher)


def check_weight(weight: float) -> None:
    if not (math.isfinite(weight) and 0.0 <= weight <= 1.0):
        raise ValueError(f"kd_weight must be in [0, 1], got {weight!r}")


def check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and 0.0 < temperature <= MAX_TEMPERATURE):
        raise ValueError(f"kd_temperature must be in (0, {MAX_TEMPERATURE:g}], got {temperature!r}")


def distillation_hparams(hparams: dict) -> dict:
    """A task's `kd_weight` and `kd_temperature` (the fedkd rounds' and their head round's), defaults filled in,
    as the configs' fields of those names."""
    return dict(kd_weight=hparam(hparams, keys.KD_WEIGHT, float, DEFAULT_WEIGHT),
                kd_temperature=hparam(hparams, keys.KD_TEMPERATURE, float, DEFAULT_TEMPERATURE))


def check_teacher_hash(value: str) -> None:
    if not SHA256.fullmatch(value):
        raise ValueError(f"teacher_sha256 must be a program's sha256 (64 lowercase hex digits), got {value[:80]!r}")


@dataclass(frozen=True, kw_only=True)
class FedKDConfig(StepConfig):
    teacher_sha256: str
    kd_weight: float = DEFAULT_WEIGHT  # a: the share of the teacher's distribution in the loss
    kd_temperature: float = DEFAULT_TEMPERATURE  # T

    def __post_init__(self):
        super().__post_init__()
        check_weight(self.kd_weight)
        check_temperature(self.kd_temperature)
        check_teacher_hash(self.teacher_sha256)

    def mezo_config(self) -> MezoConfig:
        """The MeZO step this method takes on the distillation objective."""
        return MezoConfig(**self.step_fields())

    @classmethod
    def from_hparams(cls, hparams: dict) -> "FedKDConfig":
        return cls(teacher_sha256=hparam(hparams, keys.TEACHER_SHA256, str), **cls.step_hparams(hparams),
                   **distillation_hparams(hparams))


class DistillationObjective:
    """An engine whose `losses` is the mixed loss: what MeZO's estimate calls, on the student's logits."""

    def __init__(self, engine, weight: float, temperature: float):
        self.engine, self.weight, self.temperature = engine, weight, temperature

    def losses(self, batch: Batch, adapters: np.ndarray) -> np.ndarray:
        if batch.teacher_logits is None:
            raise ValueError("a fedkd step needs the teacher's logits of its batch: the device has not been "
                             "given a teacher bundle")
        logits = self.engine.batched_logits(batch, adapters)
        return distillation_loss(logits, batch.labels.numpy(), batch.teacher_logits, self.weight, self.temperature)


def teacher_objective(engine, hparams: dict) -> DistillationObjective:
    """The distillation loss a task that names a teacher is measured by (its kd_weight and kd_temperature)."""
    kd = distillation_hparams(hparams)
    check_weight(kd["kd_weight"])
    check_temperature(kd["kd_temperature"])
    return DistillationObjective(engine, kd["kd_weight"], kd["kd_temperature"])


class FedKD:
    """MeZO's step, unchanged, on the distillation objective: the same seeds, coefficients and upload."""

    def __init__(self, engine, adapter: np.ndarray, config: FedKDConfig, rng: np.random.Generator, reference=None):
        self.config = config
        objective = DistillationObjective(engine, config.kd_weight, config.kd_temperature)
        self.mezo = Mezo(objective, adapter, config.mezo_config(), rng)

    @property
    def adapter(self) -> np.ndarray:
        return self.mezo.adapter

    def train(self, batches: list[Batch], steps: int, guard=None) -> LocalRun:
        return self.mezo.train(batches, steps, guard)


METHOD = Method(
    name="fedkd",
    summary="MeZO on (1 - a) CE + a T^2 KL(teacher_T || student_T): a teacher program labels the device's data "
            "once and is freed before training (--teacher-bundle, --kd-weight, --kd-temperature)",
    config=FedKDConfig,
    optimizer=FedKD,
    hparams=(Hparam(keys.KD_WEIGHT, float, DEFAULT_WEIGHT,
                    "fedkd: a, the teacher distribution's share of the loss, in [0, 1]"),
             Hparam(keys.KD_TEMPERATURE, float, DEFAULT_TEMPERATURE,
                    f"fedkd: T, the softmax temperature, in (0, {MAX_TEMPERATURE:g}]")),
    needs_teacher=True,
)
