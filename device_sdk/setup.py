"""A device's set-up, before its first task: the bundle, its shard, the teacher's phase and the memory plan.

Everything here happens once, before the program is loaded: the bundle is checked (against the
trust key, if the device has one), the device's shard of the data is dealt and tokenised, a
teacher (fedkd) labels it and is freed, and a memory budget that cannot hold a step is refused.
Training (device_sdk.training) and the connection (device_sdk.client) start from what it gives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fwdfed.batch import Batch
from fwdfed.bundle.manifest import Bundle, load_bundle
from fwdfed.bundle.signing import load_public_key
from fwdfed.bundle.tasks import SEQ_CLS
from fwdfed.errors import UserError
from fwdfed.memory import format_size
from fwdfed.memory_plan import MemoryPlan, plan_memory, plan_teacher_then_student
from runtime.data import DataError, DataSpec, Partition, encode, labelled, partition, read_examples, split
from runtime.evaluate import load_tokenizer
from runtime.teacher import Labelling, TeacherError, check_teacher, label

log = logging.getLogger("device")


class DeviceError(UserError):
    """The device cannot go on; the message is meant for the user."""


@dataclass
class DeviceConfig:
    device_id: str
    coordinator: str
    bundle: str
    data: str
    shard_index: int
    shard_count: int
    mem_budget_bytes: int | None = None
    connect_timeout_s: float = 30.0
    seed: int = 0
    token: str | None = None  # a bearer token from `python -m coordinator enrol --bearer` (serve --allow-bearer)
    private_key: str | None = None  # the Ed25519 key (PEM) from `python -m coordinator enrol`: signs the challenge
    ca_file: str | None = None  # trust this CA (PEM) for wss:// besides the system's
    data_spec: DataSpec | None = None  # how the file is read (None: defaults, with the bundle's classes)
    partition: Partition = field(default_factory=Partition)  # how the training examples are dealt
    teacher_bundle: str | None = None  # fedkd: an inference-only teacher that labels the shard before training
    # The operator's public key (PEM, `coordinator keygen`): bundle and teacher must be signed by it. None: unchecked.
    trust_key: str | None = None
    # Keep the global adapter of the last task, and say so in the hello, so that tasks may bring the versions
    # since in seed form instead of the dense adapter (docs/protocol.md, Downlink in seed form).
    keep_adapter: bool = True
    # Run the program once in a forked child before loading it (runtime.isolation): a program that crashes the
    # runtime then costs the device its tasks, which it declines, not its process (docs/security.md).
    isolate_load: bool = True


@dataclass
class Setup:
    bundle: Bundle
    num_examples: int  # the shard's examples, labelled or not
    batches: list[Batch]  # the labelled rows (all rows of a task that is not a classifier's)
    distillation_batches: list[Batch]  # every row, with its teacher logits (fedkd); empty without a teacher
    labelling: Labelling | None  # what the teacher did, None without one
    plan: MemoryPlan | None  # the step's plan within the device's budget, None without a budget
    trust_key: object | None  # the operator's public key, None when unchecked


@dataclass
class Shared:
    """What logical devices of one process read alike, read once for all of them (the emulator's workers): the
    bundle checked against the trust key, the data file's shards, and the tokenizer. A device keeps only its own
    shard's batches; every device of a fleet read the whole file, dealt every shard and hashed the program before."""
    bundle: Bundle
    trust_key: object | None
    shards: list[list]  # every device's examples, as `partition` deals them
    tokenizer: object

    @staticmethod
    def key(config: DeviceConfig) -> tuple:
        """Devices whose configurations agree here may share one Shared."""
        return (config.bundle, config.trust_key, config.data, config.data_spec, config.shard_count, config.partition)

    @classmethod
    def read(cls, config: DeviceConfig) -> "Shared":
        trust_key = load_public_key(Path(config.trust_key)) if config.trust_key else None
        bundle = load_bundle(config.bundle, trust_key=trust_key)
        spec = replace(config.data_spec or DataSpec(), num_labels=bundle.manifest.model.num_labels)
        shards = partition(split(read_examples(config.data, spec), "train"), config.shard_count, config.partition)
        return cls(bundle, trust_key, shards, load_tokenizer(bundle))


def set_up(config: DeviceConfig, shared: Shared | None = None) -> Setup:
    """The device's set-up; `shared`, if given, was read for a configuration of the same Shared.key."""
    shared = shared or Shared.read(config)
    trust_key, bundle = shared.trust_key, shared.bundle
    m = bundle.manifest
    examples = shared.shards[config.shard_index]
    if not examples:
        raise DeviceError(f"device {config.device_id}: its shard of {config.data} is empty")
    teacher = teacher_bundle(config, bundle, trust_key)
    if teacher is None and m.task == SEQ_CLS:  # only a teacher's distribution teaches an unlabelled row
        try:
            examples = labelled(examples, f"device {config.device_id}: its shard of {config.data}")
        except DataError as e:
            raise DeviceError(f"{e}; a device given a teacher (--teacher-bundle) learns from unlabelled rows") \
                from None
    plan = None
    if config.mem_budget_bytes is not None:
        # Before the program is loaded: a budget that cannot hold a step is refused here.
        directions = m.inputs.max_perturbations // 2
        if teacher is None:
            plan = plan_memory(bundle, config.mem_budget_bytes, len(examples), directions)
            log.info("%s: %s", config.device_id, plan.describe())
        else:  # the teacher's phase and the student's, one after the other: the larger must fit
            phased = plan_teacher_then_student(teacher, bundle, config.mem_budget_bytes, len(examples), directions)
            plan = phased.phases[-1]
            log.info("%s: %s", config.device_id, phased.describe())
    tokenizer, size, length = shared.tokenizer, m.inputs.batch_size, m.inputs.seq_len
    # A task without a teacher trains on the labelled rows, one that names the teacher on all of them.
    batches = encode(tokenizer, [e for e in examples if e.label is not None or m.task != SEQ_CLS], m.task, size,
                     length)
    distillation_batches: list[Batch] = []
    labelling = None
    if teacher is not None:
        labelling = label(teacher, examples)  # the teacher is freed before the student is loaded
        distillation_batches = encode(tokenizer, examples, m.task, size, length)
        attach_teacher_logits(distillation_batches, labelling.logits, size)
        log.info("%s: teacher %s labelled %d examples in %.1f s, peak %s; resident %s before, %s after "
                 "freeing it", config.device_id, labelling.sha256[:12], len(examples), labelling.seconds,
                 format_size(labelling.peak_bytes), format_size(labelling.rss_before_bytes),
                 format_size(labelling.rss_after_bytes))
    return Setup(bundle, len(examples), batches, distillation_batches, labelling, plan, trust_key)


def teacher_bundle(config: DeviceConfig, student: Bundle, trust_key) -> Bundle | None:
    """The teacher bundle this device was given, checked against the student's, or None."""
    if config.teacher_bundle is None:
        return None
    teacher = load_bundle(config.teacher_bundle, trust_key=trust_key)
    try:
        check_teacher(teacher, student)
    except TeacherError as e:
        raise DeviceError(f"device {config.device_id}: teacher {config.teacher_bundle}: {e}") from None
    if "logits" not in student.manifest.program.methods:
        raise DeviceError(f"device {config.device_id}: the student bundle {config.bundle} has no logits "
                          "method to distil into: export it with `python -m export ... --distillation`")
    return teacher


def attach_teacher_logits(batches: list[Batch], logits: np.ndarray, size: int) -> None:
    """Each batch gets its examples' rows of the teacher's logits (zeros for filler rows, weight 0)."""
    for i, batch in enumerate(batches):
        rows = np.zeros((size, logits.shape[1]), np.float32)
        part = logits[i * size : (i + 1) * size]
        rows[: len(part)] = part
        batch.teacher_logits = rows
