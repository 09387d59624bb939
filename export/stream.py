"""python -m export --stream: a LLaMA-family causal LM exported as one program per stage.

The stages (`fwdfed.model.stages`, built by export.stages): the embedding, every decoder block, the
final norm with the LM head and the chunked loss. Each is lowered to its own `.pte` under `stages/`, so that a device
(`runtime.stream.StreamedEngine`) holds one stage's weights at a time; each block takes its
slice of the flat adapter vector. The manifest lists the stages, their files, hashes, sizes,
adapter slices and planned arenas.

Stages are built, run eagerly, lowered and written one at a time, and each is dropped before the
next is built. A model loaded from a folder (or a whole preset) is cut into stages after peft's
LoRA is attached to it whole, so the layout and initial adapter are those of the unstreamed
export. The `llama-7b` preset never exists whole (27 GB of fp32 here): its stages are built from
the config with seeded random weights (N(0, 0.02), as Hugging Face initialises LLaMA) and peft's
LoRA injected per layer, under the names peft gives them in the whole model. Its 32 blocks are
lowered once and written under 32 file names (`program.block_weights` says so): memory and
time do not depend on the weights' values, and distinct files keep the page cache from sharing
them; each block still takes its own adapter slice, with its own initial values.

Verification: the written bundle, run by the streamed engine, against the same stages run eagerly
in PyTorch (and, for a model loaded whole in fp32, against the unmodified peft model too).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.passes import VerificationError, example_inputs, fit_memory, measure_and_plan
from export.spec import ExportSpec, Shapes
from export.stages import StageBuild, StreamError, blockwise_preset_stages, whole_model_stages
from fwdfed.bundle.files import BASE_MODEL_DIR, INITIAL_ADAPTER, MANIFEST, STAGES_DIR, TOKENIZER_DIR
from fwdfed.bundle.manifest import Bundle
from fwdfed.bundle.schema import AdapterRecord, Inputs, Manifest, ModelRecord, Program, Quantization, Stage
from fwdfed.bundle.tasks import CAUSAL_LM
from fwdfed.model.base_model import PRESETS, byte_level_tokenizer, preset_config
from fwdfed.model.program import peft_reference_loss
from fwdfed.model.stages import EMBED, HEAD, HeadStage
from fwdfed.progress import progress

# ---- lowering ------------------------------------------------------------------------------------

def lower_stage(module: nn.Module, args: tuple, names: tuple[str, ...], perturbed: tuple[str, ...],
                max_perturbations: int) -> tuple[bytes, int]:
    """torch.export one stage (its inputs `perturbed` have P as their first dimension, 1..max) and lower
    it to an XNNPACK-delegated program; returns its bytes and planned arena."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from torch.export import Dim, export

    from export.loss_chunks import LossChunkPartitioner, order_depth_first

    p = Dim("perturbations", min=1, max=max_perturbations) if max_perturbations > 1 else None
    dynamic = {n: ({0: p} if n in perturbed and p is not None else None) for n in names}
    with torch.no_grad():
        ep = export(module, args, dynamic_shapes=dynamic, strict=False)
    options = {"force_non_static_weights_for_f32_linear": True}
    edge = to_edge_transform_and_lower(
        {"forward": ep}, partitioner=[LossChunkPartitioner(**options), XnnpackPartitioner(**options)],
    ).transform([order_depth_first])
    et = edge.to_executorch(ExecutorchBackendConfig(memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False)))
    return et.buffer, int(sum(et.executorch_program.execution_plan[0].non_const_buffer_sizes))


STAGE_INPUTS = {EMBED: (("input_ids",), ()),
                "block": (("hidden", "attention_mask", "adapters"), ("hidden", "adapters")),
                HEAD: (("hidden", "labels"), ("hidden",))}


def build_stages(builds, spec: ExportSpec, batch: dict, adapters: np.ndarray, out: Path,
                 log) -> tuple[list, torch.Tensor]:
    """Run, lower and write each stage in turn. `adapters` [2, d]: the verification's vectors, whose
    eager hidden states flow from stage to stage; returns the stage records and the eager losses [2, B]."""
    stage_dir = out / STAGES_DIR
    stage_dir.mkdir(parents=True, exist_ok=True)
    records, hidden, eager_losses = [], None, None
    p = spec.max_perturbations
    # A bar updated by hand, not wrapped around `builds`: a generator's stage would stay referenced by the
    # bar while the next one is built (the blockwise export builds one stage at a time to bound memory).
    bar = progress(total=len(builds) if hasattr(builds, "__len__") else None, desc="stages", unit="stage")
    for build in builds:
        module = build.module
        names, perturbed = STAGE_INPUTS[build.kind]
        with torch.no_grad():
            if build.kind == EMBED:
                embedded = module(batch["input_ids"])
                hidden = embedded.unsqueeze(0).expand(len(adapters), *embedded.shape).contiguous()
                args = (batch["input_ids"],)
            elif build.kind == "block":
                (s0, s1) = build.copies[0][1]
                args = (hidden[:1].expand(p, *hidden.shape[1:]).contiguous(), batch["attention_mask"],
                        torch.from_numpy(np.ascontiguousarray(np.resize(adapters[:, s0:s1], (p, s1 - s0)))))
                for _, (start, stop) in build.copies:  # the eager chain through every copy, with its own slice
                    hidden = module(hidden, batch["attention_mask"], torch.from_numpy(adapters[:, start:stop]))
            else:
                eager_losses = module(hidden, batch["labels"])
                args = (hidden[:1].expand(p, *hidden.shape[1:]).contiguous(), batch["labels"])
        log(f"      lowering {build.copies[0][0]}" + (f" (written as {len(build.copies)} files)"
                                                      if len(build.copies) > 1 else ""))
        pte, planned = lower_stage(module, args, names, perturbed, p)
        digest = hashlib.sha256(pte).hexdigest()
        for name, adapter_slice in build.copies:
            path = stage_dir / f"{name}.pte"
            path.write_bytes(pte)
            records.append(Stage(name=name, file=path.name, sha256=digest, bytes=len(pte),
                                 adapter=tuple(adapter_slice), planned_memory_bytes=planned,
                                 quantized=build.quantized))
        del pte, module, build
        bar.update()
    bar.close()
    if not torch.isfinite(eager_losses).all():
        raise VerificationError("the eager stages give a non-finite loss: the weights or inputs are broken")
    return records, eager_losses


# ---- the whole streamed export -----------------------------------------------------------------------

def export_streamed(spec: ExportSpec, log=print) -> Manifest:
    """Into `spec.out` (a scratch folder `export.run.run_export` moves into place)."""
    if spec.adapter.kind != "lora":
        raise StreamError(f"--stream takes a LoRA adapter (blocks take their slice of it); not {spec.adapter.kind}")
    preset = spec.source.removeprefix("preset:") if spec.source.startswith("preset:") else None
    blockwise = preset is not None and preset in PRESETS and not PRESETS[preset].whole
    log(f"[resolve_base] building {spec.source} stage by stage" if blockwise else f"[resolve_base] loading {spec.source}")
    if blockwise:
        config = preset_config(preset)
        tokenizer = byte_level_tokenizer()
        folder = spec.out / BASE_MODEL_DIR
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    else:
        builds0, layout0, initial0, peft_model, tokenizer, identity0 = whole_model_stages(spec)

    def build_at(shapes: Shapes):
        at = replace(spec, batch_size=shapes.batch_size, seq_len=shapes.seq_len,
                     max_perturbations=shapes.max_perturbations)
        if blockwise:
            builds, layout, initial, config, identity = blockwise_preset_stages(at, preset)
            vocab, pad = config.vocab_size, config.pad_token_id
        else:
            # The head's chunks are sized for P: a new P needs a head built for it.
            builds = [b if b.kind != HEAD else StageBuild(HEAD, HeadStage(b.module.norm, b.module.chunked_loss.chunk_nll
                                                                          .head, at.max_perturbations), b.copies,
                                                     b.quantized)
                      for b in builds0]
            layout, initial, identity = layout0, initial0, identity0
            vocab, pad = identity["vocab_size"], tokenizer.pad_token_id
        log(f"[attach_adapter] adapter dimension {layout.dim:,}; base parameters {identity['base_parameters']:,}")
        log(f"[lower] lowering the stages (batch {at.batch_size}, seq {at.seq_len}, up to {at.max_perturbations} "
            f"adapters per call{', ' + spec.quantize if spec.quantize else ''})")
        batch = example_inputs(at, CAUSAL_LM, vocab, pad)
        g = np.random.default_rng(0)
        adapters = (initial[None, :] + 0.05 * g.standard_normal((2, layout.dim))).astype(np.float32)
        records, eager_losses = build_stages(builds, at, batch, adapters, spec.out, log)
        stage_bytes = [r.bytes for r in records]
        program = Program(
            streamed=True, file=STAGES_DIR, stages=tuple(records), methods=("forward",),
            planned_memory_bytes={"forward": max(r.planned_memory_bytes for r in records)},
            bytes=int(sum(stage_bytes)), largest_stage_bytes=int(max(stage_bytes)),
            hidden_bytes=4 * at.max_perturbations * at.batch_size * at.seq_len * int(
                (config if blockwise else peft_model.config).hidden_size),
            mem_budget_bytes=spec.mem_budget,
            block_weights=("one block's seeded random weights, lowered once and written under each block's file "
                           "name (memory and time do not depend on the values); every block takes its own adapter "
                           "slice") if blockwise else None)
        if blockwise:
            h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
            for r in records:
                h.update(r.sha256.encode())
            identity = {**identity, "folder": BASE_MODEL_DIR, "hash": h.hexdigest()}
        manifest = Manifest(
            task=CAUSAL_LM, model=ModelRecord(**identity),
            adapter=AdapterRecord(kind="lora", dim=layout.dim, initial=INITIAL_ADAPTER, peft_config=json.loads(
                json.dumps(spec.adapter.lora_config(CAUSAL_LM, "llama").to_dict(), default=list))),
            layout=layout, tokenizer=TOKENIZER_DIR,
            inputs=Inputs(at.batch_size, at.seq_len, at.max_perturbations),
            program=program,
            quantization=Quantization(scheme=spec.quantize) if spec.quantize else None,
        )
        (spec.out / INITIAL_ADAPTER).write_bytes(initial.astype("<f4").tobytes())
        tokenizer.save_pretrained(spec.out / TOKENIZER_DIR)
        (spec.out / MANIFEST).write_text(manifest.to_json())
        log("[verify] verifying the streamed programs against the eager stages")
        manifest = replace(manifest, verification=verify_streamed(
            Bundle(spec.out, manifest), batch, adapters, eager_losses, None if blockwise else (peft_model, layout),
            at.tolerance))
        manifest, plan = measure_and_plan(spec.out, manifest, "batched", at.max_perturbations // 2,
                                          spec.device_runtime)
        log(f"      stages {len(records)}, on disk {program.bytes / 1e6:,.1f} MB, largest "
            f"{program.largest_stage_bytes / 1e6:,.1f} MB; measured step peak "
            f"{manifest.program.measured_step_peak_bytes / 2**20:.0f} MiB")
        (spec.out / MANIFEST).write_text(manifest.to_json())
        fixed = spec.device_runtime + program.largest_stage_bytes + 4 * layout.dim * 4
        return manifest, plan.total, plan.activations, fixed

    return fit_memory(spec, build_at, log)


def verify_streamed(bundle: Bundle, batch: dict, adapters: np.ndarray, eager_losses: torch.Tensor, whole,
                    tolerance: float) -> dict:
    """The streamed engine on the written stages against the eager stages (and the whole peft model)."""
    from fwdfed.batch import Batch
    from runtime.stream import StreamedEngine

    engine = StreamedEngine.for_bundle(bundle)
    b = Batch(batch["input_ids"], batch["attention_mask"], batch["labels"],
              np.ones(len(batch["input_ids"]), np.float32))
    streamed = engine.losses(b, adapters)
    result = {"loss_max_abs_diff": float(np.max(np.abs(streamed - eager_losses.numpy()))), "tolerance": tolerance,
              "reference": "the eager stages"}
    if whole is not None and bundle.manifest.quantization is None:
        peft_model, layout = whole
        reference = np.stack([peft_reference_loss(peft_model, layout, torch.from_numpy(a), batch, CAUSAL_LM).numpy()
                              for a in adapters])
        result["peft_loss_max_abs_diff"] = float(np.max(np.abs(streamed - reference)))
        result["reference"] = "the eager stages and the whole peft model"
    worst = max(result["loss_max_abs_diff"], result.get("peft_loss_max_abs_diff", 0.0))
    if not worst <= tolerance:
        raise VerificationError(f"the streamed programs and eager PyTorch disagree: loss max |diff| {worst:.3g} "
                                f"(tolerance {tolerance:g})")
    return result
