"""The manifest as types: the one place `manifest.json` is read and written.

The manifest is the contract between the exporter, the devices and the coordinator. Format 2:

    task           "causal-lm" or "seq-cls"
    model          ModelRecord      the base model: where it came from, its hash, its size
    adapter        AdapterRecord    the adapter's kind, dimension, initial vector, peft config
    layout         AdapterLayout    the flat adapter vector as named tensors (fwdfed.bundle.layout)
    tokenizer      the tokenizer's folder in the bundle
    inputs         Inputs           the program's input shapes
    program        Program          the program (or a streamed program's stages) and its memory
    quantization   Quantization     the frozen base's quantization, or null for an fp32 base
    verification   what the export measured of the programs against eager peft: a report, which no
                   reader depends on key by key (its keys are the export's, docs/adapters.md)
    emulator       EmulatorRecord   offsite tuning's emulator (fwdfed.model.emulator), or null
    files          a signed bundle's other files, path -> {sha256, bytes} (fwdfed.bundle.signing), or null
    format_version 2

Format 1 differed in one thing: the quantization sat under `model` for a whole export, and as a bare
scheme name under `program` for a streamed one. `migrate` reads it into `quantization`; nothing else
moved, so a format-1 bundle loads unchanged (and its signature, over the bytes as written, stands).

Every record is frozen: an exporter builds a new one (`dataclasses.replace`) where it learns more.
A key a record does not have, or a missing one it needs, is a BundleError naming it.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

from fwdfed.bundle.files import BundleError
from fwdfed.bundle.layout import AdapterLayout
from fwdfed.model.emulator import EmulatorRecord

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class ModelRecord:
    source: str  # what the export was given: a folder, a preset, or the full model an emulator stands for
    hash: str  # sha256 over the base model's files (fwdfed.model.hashing): the identity devices check
    architecture: str
    vocab_size: int
    base_parameters: int  # frozen parameters, counted before any quantization
    num_labels: int | None = None  # a classifier's classes; None for a causal LM
    folder: str | None = None  # the base model's folder, relative to the bundle or absolute; None for a preset


@dataclass(frozen=True)
class AdapterRecord:
    kind: str
    dim: int
    initial: str  # the initial adapter's file in the bundle (float32 little-endian, dim values)
    peft_config: dict | None  # peft's own config, as `PeftConfig.to_dict()` gives it; None for bitfit


@dataclass(frozen=True)
class Inputs:
    batch_size: int
    seq_len: int
    max_perturbations: int  # adapter vectors one program call evaluates (P)


@dataclass(frozen=True)
class Quantization:
    """The frozen base's quantization. A streamed export records the scheme here and each stage's own
    layers in its `Stage.quantized`."""
    scheme: str
    group_size: int | None = None
    weight_scale_dtype: str | None = None
    modules: tuple[str, ...] = ()  # the linear layers quantized (a whole export)
    left_fp32: dict = field(default_factory=dict)  # layer -> why it stayed fp32
    weight_bytes_fp32: int | None = None
    weight_bytes_quantized: int | None = None


@dataclass(frozen=True)
class Split:
    """A classifier or causal LM cut into a frozen prefix (once per example) and an adapted top (every pass)."""
    frozen_blocks: int
    adapted_blocks: int
    hidden_size: int
    states_dtype: str  # how a device keeps the prefix states


@dataclass(frozen=True)
class Stage:
    """One program of a streamed bundle, under `program.file`."""
    name: str
    file: str
    sha256: str
    bytes: int
    adapter: tuple[int, int]  # the slice [start, stop) of the adapter vector this stage takes
    planned_memory_bytes: int
    quantized: Quantization | None = None  # what quantizing this stage's layers did, or None


@dataclass(frozen=True)
class Program:
    file: str  # the .pte, or a streamed bundle's folder of stage programs
    methods: tuple[str, ...]  # forward, predict, features, logits, prefix, top, ...
    planned_memory_bytes: dict  # method -> bytes of its planned buffers (a streamed bundle: its largest stage's)
    bytes: int  # on disk, all stages together
    sha256: str | None = None  # the .pte's; a streamed bundle hashes each stage instead
    mem_budget_bytes: int | None = None  # the budget the export fitted its shapes to (--mem)
    split: Split | None = None
    streamed: bool = False
    stages: tuple[Stage, ...] = ()
    largest_stage_bytes: int | None = None
    hidden_bytes: int | None = None  # one hidden state a streamed engine carries between stages
    block_weights: str | None = None  # a blockwise preset's note on its seeded block weights
    # Measured at export (export.passes.measure_step): a fresh process running the largest step.
    measured_step_peak_bytes: int | None = None
    measured_runtime_bytes: int | None = None
    workspace_bytes: int = 0  # what the backend holds beyond the plan
    device_plan_bytes: int | None = None  # the device's own plan of one step (fwdfed.memory_plan)


@dataclass(frozen=True)
class Manifest:
    task: str
    model: ModelRecord
    adapter: AdapterRecord
    layout: AdapterLayout
    tokenizer: str
    inputs: Inputs
    program: Program
    quantization: Quantization | None = None
    verification: dict = field(default_factory=dict)
    emulator: EmulatorRecord | None = None
    files: dict | None = None
    format_version: int = FORMAT_VERSION

    @property
    def adapter_dim(self) -> int:
        return self.layout.dim

    @property
    def base_model_hash(self) -> str:
        return self.model.hash

    @property
    def streamed(self) -> bool:
        """Whether the program is a sequence of stage programs run one at a time (`program.stages`)."""
        return self.program.streamed

    def to_json(self) -> str:
        d = asdict(replace(self, layout=None, format_version=FORMAT_VERSION))
        d["layout"] = self.layout.to_json()
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        d = json.loads(text)
        if not isinstance(d, dict):
            raise BundleError("a manifest is a JSON object")
        version = d.get("format_version")
        if version not in READABLE_VERSIONS:
            raise BundleError(f"manifest format {version!r} is not supported (this reader takes "
                              f"{', '.join(map(str, READABLE_VERSIONS))})")
        d = migrate(d)
        program = record(Program, d.get("program"), "program")
        program = replace(program, methods=tuple(program.methods),
                          split=record(Split, program.split, "program.split") if program.split is not None else None,
                          stages=tuple(stage(s, k) for k, s in enumerate(program.stages)))
        quantized = d.get("quantization")
        emulator = d.get("emulator")
        return record(cls, d | {
            "model": record(ModelRecord, d.get("model"), "model"),
            "adapter": record(AdapterRecord, d.get("adapter"), "adapter"),
            "layout": AdapterLayout.from_json(d.get("layout")),
            "inputs": record(Inputs, d.get("inputs"), "inputs"),
            "program": program,
            "quantization": quantization(quantized, "quantization") if quantized is not None else None,
            "emulator": record(EmulatorRecord, emulator, "emulator") if emulator is not None else None,
            "format_version": FORMAT_VERSION,
        }, "")


def migrate(d: dict) -> dict:
    """A format-1 manifest's fields in format 2's places (a format-2 one unchanged)."""
    if d.get("format_version") != 1:
        return d
    model, program = dict(d.get("model") or {}), dict(d.get("program") or {})
    whole, scheme = model.pop("quantization", None), program.pop("quantization", None)
    return d | {"model": model, "program": program,
                "quantization": whole if whole is not None else ({"scheme": scheme} if scheme else None)}


def record(cls, value, where: str):
    """`cls` from a JSON object: every key one of its fields, every field without a default present."""
    where = f"manifest {where}" if where else "manifest"
    if not isinstance(value, dict):
        raise BundleError(f"{where} must be an object, got {type(value).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise BundleError(f"{where} has no field {unknown[0]!r}")
    missing = [f.name for f in fields(cls)
               if f.name not in value and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise BundleError(f"{where} lacks {missing[0]!r}")
    return cls(**value)


def stage(value, k: int) -> Stage:
    s = record(Stage, value, f"program.stages[{k}]")
    if not (isinstance(s.adapter, list | tuple) and len(s.adapter) == 2):
        raise BundleError(f"manifest program.stages[{k}].adapter must be [start, stop]")
    quantized = None if s.quantized is None else quantization(s.quantized, f"program.stages[{k}].quantized")
    return replace(s, adapter=(s.adapter[0], s.adapter[1]), quantized=quantized)


def quantization(value, where: str) -> Quantization:
    q = record(Quantization, value, where)
    return replace(q, modules=tuple(q.modules))
