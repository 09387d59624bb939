"""An export, start to finish: the whole or the streamed pipeline into a scratch folder, moved into place.

`run_export` is what `python -m export` runs; `run_emulator_export` runs it twice for offsite
tuning's pair. The passes themselves are export.pipeline's (the whole program) and
export.stream's (one program per stage).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from export.pipeline import export_whole
from export.spec import ExportSpec
from export.stream import export_streamed
from fwdfed.bundle.manifest import Manifest, load_bundle
from fwdfed.model.base_model import PRESETS, read_config
from fwdfed.model.emulator import DropLayers, EmulatorError, layout_sha256, num_layers_of


def run_export(spec: ExportSpec, log=print) -> Manifest:
    """Build the bundle in a scratch folder beside `spec.out` and move it into place at the end,
    so that a failed export leaves an existing bundle at `spec.out` untouched."""
    spec.out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{spec.out.name}.partial-", dir=spec.out.parent))
    try:
        export = export_streamed if spec.stream else export_whole
        manifest = export(replace(spec, out=scratch), log)
        if spec.out.exists():
            shutil.rmtree(spec.out)
        os.replace(scratch, spec.out)
        log(f"[done] bundle written to {spec.out}")
        return manifest
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)


def run_emulator_export(spec: ExportSpec, plan: DropLayers, full_out: Path, log=print) -> tuple[Manifest, Manifest]:
    """Offsite tuning's pair: the full model's bundle at `full_out`, then the emulator's at `spec.out`,
    both with LoRA on the full model's kept first and last blocks only, so their layouts agree
    (fwdfed.model.emulator). Each `.pte` is verified against eager peft of its own model."""
    if spec.adapter.kind != "lora":
        raise EmulatorError(f"--emulator drop-layers takes --adapter lora only, not {spec.adapter.kind}: bitfit and "
                            "prefix tuning train tensors in every block, which the emulator drops, and prompt "
                            "learning is not wired to it")
    if Path(full_out).resolve() == Path(spec.out).resolve():
        raise EmulatorError("--full-out must be another folder than --out")
    if spec.source.startswith("preset:"):
        name = spec.source.removeprefix("preset:")
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        config = PRESETS[name].config
    else:
        config = read_config(Path(spec.source))
    num_layers = num_layers_of(config)
    kept = plan.kept_layers(num_layers)  # refuses counts the model cannot meet, before anything is exported
    log(f"offsite tuning: the full model ({num_layers} blocks) to {full_out}, then the emulator "
        f"(blocks {kept}) to {spec.out}")
    full_adapter = replace(spec.adapter, layers=plan.adapter_layers(num_layers))
    full = run_export(replace(spec, out=Path(full_out), adapter=full_adapter), log)
    full_bundle = load_bundle(full_out)
    identity = {"path": str(Path(full_out).resolve()), "source": full.model.source,
                "base_model_hash": full.base_model_hash,
                "program_sha256": full.program.sha256, "layout_sha256": layout_sha256(full.layout)}
    # The emulator's own block numbers: its first blocks, and its last ones.
    emulator_layers = [*range(plan.keep_first), *range(len(kept) - plan.keep_last, len(kept))]
    emulator = run_export(replace(spec, source=str(full_bundle.base_model_path.resolve()), emulator=plan,
                                  full_bundle=identity, adapter=replace(spec.adapter, layers=emulator_layers)), log)
    return full, emulator
