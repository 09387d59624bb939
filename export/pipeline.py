"""Export as a pipeline of named passes, each from one form to the next:

    resolve_base    source (folder or preset)   -> base model folder, task
    attach_adapter  HF model + AdapterSpec      -> peft model, adapter layout, initial adapter
    build_programs  peft model                  -> LossProgram, PredictProgram (adapter as input)
    lower           eager programs              -> ExecuTorch program bytes, planned memory
    quantize        peft model                  -> its frozen base linears quantized (--quantize), report
    verify          .pte vs eager peft          -> max abs difference (fails past a tolerance); quantized:
                                                   against the eager quantized model, and its loss vs fp32
    write_bundle    everything above            -> model.pte, manifest.json, adapter, tokenizer
    measure_step    the bundle                  -> a training step's measured peak, in a fresh process, and
                                                   the device's plan with it (measure_and_plan)

With --mem, lower..measure_step run again at a smaller P, batch, then length until the device's
plan (with what the backend was measured to hold beyond the plan) fits the budget (fit_memory).
Each progress line starts with the pass it reports ([lower], [verify], ...). What an export is asked
for is export.spec's; the passes are export.passes', which the streamed export (export.stream) runs
stage by stage too; this module is the whole export's order of them (`export_whole`), and export.run
moves either export into place.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

from export.passes import (attach_adapter, check_positions, example_inputs, fit_memory, hidden_size_of, lower,
                           measure_and_plan, resolve_base, top_blocks_adapter, verify, write_bundle)
from export.spec import PROMPT_LEARNING_ADAPTERS, ExportSpec, Shapes
from fwdfed.bundle.files import BASE_MODEL_DIR, INITIAL_ADAPTER, MANIFEST, PROGRAM, TOKENIZER_DIR
from fwdfed.bundle.schema import AdapterRecord, Inputs, Manifest, ModelRecord, Program
from fwdfed.bundle.tasks import SEQ_CLS
from fwdfed.model.base_model import load_model, model_hash
from fwdfed.model.emulator import DROP_LAYERS, EmulatorRecord, write_emulator_model
from fwdfed.model.quantize import check_adapter_fp32, quantize_base
from fwdfed.model.program import LogitsProgram, build_programs
from fwdfed.model.split import split_programs
from fwdfed.model.virtual_tokens import PEFT_ADAPTER_NAME
def derive_emulator(spec: ExportSpec, full_folder: Path, task: str) -> EmulatorRecord:
    """Write the emulator's model into the bundle (its base model) and say what it kept."""
    plan = spec.emulator
    blocks, full_layers = write_emulator_model(full_folder, spec.out / BASE_MODEL_DIR, task, spec.num_labels, plan)
    kept = plan.kept_layers(full_layers)
    return EmulatorRecord(kind=DROP_LAYERS, keep_first=plan.keep_first, keep_last=plan.keep_last,
                          drop_fraction=plan.drop_fraction, blocks=blocks, full_layers=full_layers, kept_layers=kept,
                          dropped_layers=[i for i in range(full_layers) if i not in kept],
                          adapter_layers=plan.adapter_layers(full_layers), full_bundle=spec.full_bundle)


def export_whole(spec: ExportSpec, log) -> Manifest:
    """The whole-model export into `spec.out` (a scratch folder `export.run.run_export` moves into place)."""
    folder, task, recorded_folder = resolve_base(spec)
    emulator = None
    if spec.emulator is not None:
        emulator = derive_emulator(spec, folder, task)
        folder, recorded_folder = spec.out / BASE_MODEL_DIR, BASE_MODEL_DIR
        log(f"      emulator: blocks {emulator.kept_layers} of the full model's {emulator.full_layers} "
            f"(dropped {emulator.dropped_layers}); the adapter on {emulator.adapter_layers}")
    log(f"[resolve_base] loading {spec.source} ({task})")
    model, tokenizer = load_model(folder, task, spec.num_labels)
    if task == SEQ_CLS:  # the model's own count, for a folder that fixes it (the spec's is the caller's, untouched)
        spec = replace(spec, num_labels=model.config.num_labels)
    log(f"[attach_adapter] attaching the {spec.adapter.kind} adapter")
    if spec.adapter.kind in PROMPT_LEARNING_ADAPTERS:
        check_positions(model.config, spec.seq_len + spec.adapter.num_virtual_tokens)
    adapter = spec.adapter if spec.top_blocks is None else top_blocks_adapter(spec, task, model.config)
    peft_model, layout, initial = attach_adapter(model, task, adapter, folder)
    # Counted before quantizing: a tied LM head gets a quantized copy of its own, not more parameters.
    base_params = sum(p.numel() for n, p in peft_model.named_parameters() if not p.requires_grad)
    fp32_model, quantization = None, None
    if spec.quantize:
        # After the adapter is attached, so that peft wraps fp32 layers; the fp32 copy is the loss's yardstick.
        fp32_model = copy.deepcopy(peft_model)
        report = quantize_base(peft_model, spec.quantize, spec.group_size)
        check_adapter_fp32(peft_model, layout.names)
        quantization = report.to_manifest()
        log(f"[quantize] the frozen base: {report.describe()}")
    log(f"      base parameters {base_params:,}, adapter dimension {layout.dim:,} in {len(layout.tensors)} tensors")
    loss_program, predict_program, features_program = build_programs(peft_model, layout, task)
    if spec.distillation and task != SEQ_CLS:
        raise ValueError("--distillation adds the batched logits of a classifier: export with --task seq-cls")
    logits_program = LogitsProgram(loss_program.model, loss_program.binding) if spec.distillation else None
    split = split_programs(loss_program.model, layout, loss_program.binding) if spec.top_blocks else None
    if split is not None:
        log(f"      split: {split.frozen} block(s) frozen (the prefix, once per example), "
            f"{split.num_blocks - split.frozen} adapted (the top, every pass"
            f"{'; the last for the first row only' if split.top_features is not None else ''})")
    peft_config = (json.loads(json.dumps(peft_model.peft_config[PEFT_ADAPTER_NAME].to_dict(), default=list))
                   if spec.adapter.kind != "bitfit" else None)

    def build_at(shapes: Shapes):
        """Lower, verify, write and measure the program at these shapes."""
        at = replace(spec, batch_size=shapes.batch_size, seq_len=shapes.seq_len,
                     max_perturbations=shapes.max_perturbations)
        log(f"[lower] lowering to ExecuTorch (batch {at.batch_size}, seq {at.seq_len}, "
            f"up to {at.max_perturbations} adapters per call)")
        batch = example_inputs(at, task, model.config.vocab_size, tokenizer.pad_token_id)
        pte, planned = lower(loss_program, predict_program, batch, layout.dim, at.max_perturbations, features_program,
                             logits_program, spec.inference_only, split)
        log(f"      program {len(pte) / 1e6:.1f} MB, planned memory "
            f"{', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in planned.items())}")
        log(f"[verify] .pte against eager peft{' (quantized)' if quantization else ''}")
        verification = verify(pte, peft_model, layout, initial, batch, task, at.max_perturbations, at.tolerance,
                              features_program, fp32_model)
        log(f"      max |loss diff| {verification['loss_max_abs_diff']:.2e}, "
            f"max |logits diff| {verification['logits_max_abs_diff']:.2e} (tolerance {at.tolerance:g})")
        if quantization:
            log(f"      quantized vs fp32 eager: max |loss diff| "
                f"{verification['quantized_vs_fp32_loss_max_abs_diff']:.2e} (mean loss "
                f"{verification['fp32_mean_loss']:.4f} fp32, {verification['quantized_mean_loss']:.4f} quantized, "
                f"{verification['pte_mean_loss']:.4f} .pte)")
        manifest = Manifest(
            task=task,
            model=ModelRecord(
                source=spec.source if emulator is None else
                f"{spec.full_bundle['source']} emulator (blocks {', '.join(map(str, emulator.kept_layers))} "
                f"of {emulator.full_layers})",
                folder=recorded_folder,
                hash=model_hash(folder),
                architecture=type(model).__name__,
                num_labels=spec.num_labels if task == SEQ_CLS else None,
                vocab_size=int(model.config.vocab_size),
                base_parameters=int(base_params),
            ),
            adapter=AdapterRecord(kind=adapter.kind, dim=layout.dim, initial=INITIAL_ADAPTER, peft_config=peft_config),
            layout=layout,
            tokenizer=TOKENIZER_DIR,
            inputs=Inputs(at.batch_size, at.seq_len, at.max_perturbations),
            program=Program(file=PROGRAM, methods=tuple(planned), planned_memory_bytes=planned, bytes=len(pte),
                            mem_budget_bytes=spec.mem_budget,
                            split=split.record(hidden_size_of(model.config)) if split else None),
            quantization=quantization,
            verification=verification,
            emulator=emulator,
        )
        manifest = write_bundle(spec.out, pte, manifest, initial, tokenizer)
        # An inference-only program (a teacher) has no training step: its largest step is labelling a batch.
        mode = "batched" if "forward" in manifest.program.methods else "labelling"
        manifest, plan = measure_and_plan(spec.out, manifest, mode, shapes.max_perturbations // 2,
                                          spec.device_runtime, None if spec.inference_only else "mezo")
        log(f"[measure_step] step peak {manifest.program.measured_step_peak_bytes / 2**20:.0f} MiB "
            f"(the backend beyond the plan: {plan.workspace / 2**20:.0f} MiB)")
        (spec.out / MANIFEST).write_text(manifest.to_json())
        fixed = spec.device_runtime + len(pte) + 4 * layout.dim * 4
        return manifest, plan.total, plan.activations, fixed

    return fit_memory(spec, build_at, log)
