"""Offsite tuning's drop-layer emulator: the model a device trains on, smaller than the one it serves.

FederatedScope-LLM's offsite tuning (after Xiao et al., "Offsite-Tuning", 2023) gives devices an
emulator: the full model with its first and last blocks kept, because they carry the trainable
adapter, and a fraction of the middle blocks dropped, the rest kept uniformly spread. Devices
train the adapter on the emulator; the server plugs it into the full model to evaluate and
export it (FS-LLM's `eval_type` full vs emu).

Here the adapter is LoRA on the kept first and last blocks only, in both models, so the two
bundles' layouts have the same tensors, shapes and offsets: one flat adapter vector means the
same in both. Only the block indices in the tensors' names differ (the emulator's blocks are
numbered 0..n-1); the emulator's manifest records which blocks it kept (`EmulatorRecord`), and
`check_pair` maps its layout onto the full bundle's and refuses a pair that does not match.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from fwdfed.bundle.layout import AdapterLayout
from fwdfed.errors import UserError

DROP_LAYERS = "drop-layers"


class EmulatorError(UserError):
    """Emulator options that cannot be met, or an emulator and full bundle that do not belong together."""


@dataclass(frozen=True)
class DropLayers:
    """Keep the first `keep_first` and last `keep_last` blocks (the adapter's); drop `drop_fraction`
    of the blocks between them (rounded to the nearest count) and keep the others evenly spread,
    the first and last middle block included, as offsite tuning's uniform layer choice does."""

    keep_first: int = 1
    keep_last: int = 1
    drop_fraction: float = 0.5

    def __post_init__(self):
        if not 0 <= self.drop_fraction < 1:
            raise EmulatorError(f"--drop-fraction must be in [0, 1), got {self.drop_fraction:g}")
        if self.keep_first < 0 or self.keep_last < 0 or self.keep_first + self.keep_last < 1:
            raise EmulatorError("--keep-first and --keep-last must be at least 0, and one of them at least 1: "
                                "the kept first and last blocks carry the adapter")

    def check(self, num_layers: int) -> None:
        if self.keep_first + self.keep_last >= num_layers:
            raise EmulatorError(f"--keep-first {self.keep_first} plus --keep-last {self.keep_last} leave none of "
                                f"the model's {num_layers} blocks in the middle to drop")

    def middle_kept(self, num_layers: int) -> list[int]:
        self.check(num_layers)
        first, count = self.keep_first, num_layers - self.keep_first - self.keep_last
        keep = count - math.floor(self.drop_fraction * count + 0.5)
        if keep == 0:
            return []
        if keep == 1:
            return [first + count // 2]
        stride = (count - 1) / (keep - 1)
        return [first + math.floor(i * stride + 0.5) for i in range(keep)]

    def kept_layers(self, num_layers: int) -> list[int]:
        """The full model's block indices the emulator keeps, in order."""
        last = range(num_layers - self.keep_last, num_layers)
        return [*range(self.keep_first), *self.middle_kept(num_layers), *last]

    def adapter_layers(self, num_layers: int) -> list[int]:
        """The full model's blocks that carry the adapter."""
        return [*range(self.keep_first), *range(num_layers - self.keep_last, num_layers)]


@dataclass(frozen=True)
class EmulatorRecord:
    """What an emulator bundle's manifest says about itself (`manifest.emulator`)."""

    kind: str
    keep_first: int
    keep_last: int
    drop_fraction: float
    blocks: str  # the path of the model's block list, e.g. model.layers
    full_layers: int
    kept_layers: list[int]  # full-model indices; emulator block i is full block kept_layers[i]
    dropped_layers: list[int]
    adapter_layers: list[int]  # full-model indices
    full_bundle: dict  # path, base_model_hash, program_sha256, layout_sha256

    def full_name(self, name: str) -> str:
        """An emulator layout tensor's name in the full model: its block index mapped back."""
        pattern = re.compile(rf"(^|\.){re.escape(self.blocks)}\.(\d+)\.")
        return pattern.sub(lambda m: f"{m.group(1)}{self.blocks}.{self.kept_layers[int(m.group(2))]}.", name, count=1)


def layout_sha256(layout: AdapterLayout) -> str:
    return hashlib.sha256(json.dumps(layout.to_json(), sort_keys=True).encode()).hexdigest()


def full_layout(record: EmulatorRecord, layout: AdapterLayout) -> AdapterLayout:
    """The emulator's layout in the full model's names."""
    return AdapterLayout.from_shapes([(record.full_name(t.name), t.shape) for t in layout.tensors])


def check_pair(emulator_manifest, full_manifest, full_folder) -> EmulatorRecord:
    """The emulator's record, once the full bundle is shown to be the one it was made with: same
    base model, and the same layout once block indices are mapped (so the vectors agree)."""
    if getattr(emulator_manifest, "emulator", None) is None:
        raise EmulatorError("the training bundle is not an emulator (export it with python -m export --emulator "
                            "drop-layers): evaluating on another bundle needs the two to share the adapter layout")
    record = emulator_manifest.emulator
    if full_manifest.base_model_hash != record.full_bundle["base_model_hash"]:
        raise EmulatorError(f"{full_folder} is not the full model this emulator was made from (base model hash "
                            f"{full_manifest.base_model_hash[:12]}, the emulator records "
                            f"{record.full_bundle['base_model_hash'][:12]})")
    mapped = full_layout(record, emulator_manifest.layout)
    if mapped != full_manifest.layout:
        raise EmulatorError(f"{full_folder}'s adapter layout differs from the emulator's (with its blocks mapped "
                            "back): export the pair again together")
    return record


def block_list(model):
    """The path and the ModuleList of a Hugging Face model's transformer blocks: the one list as long as
    the config's number of layers (LLaMA: model.layers; BERT: bert.encoder.layer; DistilBERT:
    distilbert.transformer.layer)."""
    from torch import nn

    count = model.config.num_hidden_layers
    found = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if len(found) != 1:
        raise EmulatorError(f"cannot tell {type(model).__name__}'s block list ({len(found)} module lists of "
                            f"{count} modules)")
    return found[0]


def write_emulator_model(full_folder: Path, out: Path, task: str, num_labels: int, plan: DropLayers) -> tuple[str, int]:
    """Write the emulator as a Hugging Face folder (the full model's weights for the kept blocks, its
    config's layer count lowered), so that every tool loads it as any other model. Returns the
    block list's path and the full model's number of blocks."""
    from transformers import AutoTokenizer

    from fwdfed.model.base_model import load_model

    model, _ = load_model(full_folder, task, num_labels)
    path, blocks = block_list(model)
    full_layers = len(blocks)
    kept = plan.kept_layers(full_layers)
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    setattr(parent, path.rsplit(".", 1)[-1], type(blocks)([blocks[i] for i in kept]))
    model.config.num_hidden_layers = len(kept)  # DistilBERT's n_layers through its attribute map
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == full_layers:
        model.config.layer_types = [layer_types[i] for i in kept]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(full_folder, local_files_only=True).save_pretrained(out)
    return path, full_layers


def num_layers_of(config: dict) -> int:
    """The number of blocks a model folder's config.json declares."""
    for key in ("num_hidden_layers", "n_layers", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    raise EmulatorError("the model's config names no number of layers (num_hidden_layers)")
