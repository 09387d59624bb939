"""python -m export --stream: a LLaMA-family causal LM exported as one program per stage.

The stages (`fwdfed.model.stages`): the embedding, every decoder block, the final norm with the
LM head and the chunked loss. Each is lowered to its own `.pte` under `stages/`, so that a device
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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from export.passes import VerificationError, attach_adapter, example_inputs, fit_memory, measure_step, resolve_base
from export.spec import ExportSpec, Shapes
from fwdfed.bundle.files import BASE_MODEL_DIR, INITIAL_ADAPTER, MANIFEST, STAGES_DIR, TOKENIZER_DIR
from fwdfed.bundle.layout import AdapterLayout
from fwdfed.bundle.manifest import Bundle
from fwdfed.bundle.schema import AdapterRecord, Inputs, Manifest, ModelRecord, Program, Quantization, Stage
from fwdfed.bundle.tasks import CAUSAL_LM
from fwdfed.errors import UserError
from fwdfed.memory_plan import plan_memory
from fwdfed.model.base_model import PRESETS, byte_level_tokenizer, load_model, model_hash, preset_config
from fwdfed.model.program import batched_model, peft_reference_loss
from fwdfed.model.stages import (EMBED, HEAD, PEFT_LAYER_PREFIX, BlockStage, EmbedStage, HeadStage, SliceBinding,
                                 block_name, split_into_stages)
from fwdfed.model.virtual_tokens import PEFT_ADAPTER_NAME


class StreamError(UserError):
    """What the streamed export cannot take; the message says why."""


@dataclass
class StageBuild:
    """A stage's eager module and the files it is written as: (name, adapter slice) per copy; more than
    one copy only for the 7B stand-in's blocks."""

    kind: str  # embed, block, head
    module: nn.Module
    copies: list[tuple[str, tuple[int, int]]]
    quantized: Quantization | None = None  # what `quantize_stage` quantized in it


# ---- quantization: one place, so that every stage goes through the same scheme --------------------

def quantize_stage(module: nn.Module, scheme: str | None, group_size: int | None = None) -> Quantization | None:
    """Quantize the stage's frozen base linears in place (`scheme`; None: keep fp32), the adapter left
    fp32 and an input; returns what was quantized, for the manifest. An embedding stage has no
    linear layer: it stays fp32 (an int8 table would need the quantized kernels the wheel lacks)."""
    if scheme is None or not any(isinstance(m, nn.Linear) for m in module.modules()):
        return None
    from fwdfed.model.quantize import quantize_base

    for p in module.parameters():
        p.requires_grad_(False)  # the base is frozen: what the quantizer takes as base weight
    return quantize_base(module, scheme, group_size).to_manifest()


# ---- stage sources ------------------------------------------------------------------------------

def whole_model_stages(spec: ExportSpec):
    """A model loaded whole: (stages, layout, initial adapter, peft model, tokenizer, base folder, identity)."""
    folder, task, recorded = resolve_base(spec)
    if task != CAUSAL_LM:
        raise StreamError(f"streaming takes causal LMs (LLaMA family); {spec.source} is a {task} model")
    model, tokenizer = load_model(folder, task, spec.num_labels)
    peft_model, layout, initial = attach_adapter(model, task, spec.adapter, folder)
    model = batched_model(peft_model, layout, SliceBinding(0, 0))
    stages = split_into_stages(model, layout, spec.max_perturbations)
    # Quantized once here: a fit to a budget builds the stages again at smaller shapes from these modules.
    kinds = {EMBED: EMBED, HEAD: HEAD}
    builds = [StageBuild(kinds.get(s.name, "block"), s.module, [(s.name, s.adapter)],
                         quantize_stage(s.module, spec.quantize, spec.group_size)) for s in stages]
    identity = {"source": spec.source, "folder": recorded, "hash": model_hash(folder),
                "architecture": type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__,
                "vocab_size": int(peft_model.config.vocab_size),
                "base_parameters": int(sum(p.numel() for p in peft_model.parameters() if not p.requires_grad))}
    return builds, layout, initial, peft_model, tokenizer, identity


def lora_targets(spec: ExportSpec) -> list[str]:
    return spec.adapter.target_modules or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["llama"]


def _init_normal(module: nn.Module, std: float) -> None:
    """Hugging Face's LLaMA init: linear and embedding weights N(0, std), norms at one."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
        elif hasattr(m, "variance_epsilon"):  # LlamaRMSNorm
            nn.init.ones_(m.weight)


def layer_with_lora(config, spec: ExportSpec, seed: int, device: str = "cpu") -> nn.Module:
    """A decoder layer with seeded weights (or unallocated ones, on `meta`) and peft's LoRA injected;
    peft initialises the LoRA tensors (A as nn.Linear's default, B zero)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    torch.manual_seed(seed)
    with torch.device(device):
        layer = LlamaDecoderLayer(config, layer_idx=0)
    if device == "cpu":
        _init_normal(layer, config.initializer_range)
    lora = LoraConfig(r=spec.adapter.rank, lora_alpha=spec.adapter.alpha, target_modules=lora_targets(spec),
                      lora_dropout=0.0, bias=spec.adapter.bias)
    return inject_adapter_in_model(lora, layer).eval()


def per_layer_adapter(layer: nn.Module) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in layer.named_parameters() if "lora_" in n}


def blockwise_preset_stages(spec: ExportSpec, name: str):
    """The `whole=False` preset (llama-7b), built one stage at a time from its config."""
    from peft.tuners.lora import LoraLayer
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

    if spec.adapter.kind != "lora" or spec.adapter.bias != "none":
        raise StreamError(f"the {name} preset takes a LoRA adapter without trained biases")
    config = preset_config(name)
    config._attn_implementation = "sdpa"
    n_layers, h, v = config.num_hidden_layers, config.hidden_size, config.vocab_size
    # The initial adapter of every layer from peft's own LoRA init, seeded per layer; only the LoRA
    # tensors of the unallocated (meta) layer are given memory.
    shell = layer_with_lora(config, spec, 0, device="meta")
    lora_modules = [m for m in shell.modules() if isinstance(m, LoraLayer)]
    for m in lora_modules:
        for sub in (m.lora_A[PEFT_ADAPTER_NAME], m.lora_B[PEFT_ADAPTER_NAME]):
            sub.to_empty(device="cpu")
    named, values = [], {}
    for k in range(n_layers):
        torch.manual_seed(spec.adapter.seed * 100_003 + k)
        for m in lora_modules:
            m.reset_lora_parameters(PEFT_ADAPTER_NAME, True)
        for local, value in per_layer_adapter(shell).items():
            full = f"{PEFT_LAYER_PREFIX}{k}.{local}"
            named.append((full, value.shape))
            values[full] = value
    layout = AdapterLayout.from_shapes(named)
    initial = layout.flatten(values)
    per_layer = layout.dim // n_layers
    slices = [(k * per_layer, (k + 1) * per_layer) for k in range(n_layers)]
    local_layout = AdapterLayout.from_shapes([(n.removeprefix(f"{PEFT_LAYER_PREFIX}0."), s) for n, s in named
                                              if n.startswith(f"{PEFT_LAYER_PREFIX}0.")])
    rotary = LlamaRotaryEmbedding(config)

    def builds():
        torch.manual_seed(spec.adapter.seed)
        embed = nn.Embedding(v, h, padding_idx=config.pad_token_id)
        _init_normal(embed, config.initializer_range)
        yield StageBuild(EMBED, EmbedStage(embed), [(EMBED, (0, 0))])
        del embed
        layer = layer_with_lora(config, spec, spec.adapter.seed + 1)
        binding = SliceBinding(0, per_layer)
        block = BlockStage(batched_model(layer, local_layout, binding), rotary, config, binding)
        del layer
        yield StageBuild("block", block, [(block_name(k), slices[k]) for k in range(n_layers)],
                         quantize_stage(block, spec.quantize, spec.group_size))
        del block
        norm, lm_head = LlamaRMSNorm(h, eps=config.rms_norm_eps), nn.Linear(h, v, bias=False)
        _init_normal(lm_head, config.initializer_range)
        head = HeadStage(norm, lm_head, spec.max_perturbations)
        yield StageBuild(HEAD, head, [(HEAD, (0, 0))], quantize_stage(head, spec.quantize, spec.group_size))

    base_params = v * h * 2 + h + n_layers * (4 * h * h + 3 * h * config.intermediate_size + 2 * h)
    identity = {"source": spec.source, "architecture": "LlamaForCausalLM", "vocab_size": int(v),
                "base_parameters": int(base_params)}
    return builds(), layout, initial, config, identity


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
        plan = plan_memory(Bundle(spec.out, manifest), budget=2**62, num_examples=0,
                           directions=at.max_perturbations // 2, runtime=spec.device_runtime)
        manifest = replace(manifest, program=replace(manifest.program, **measure_step(
            spec.out, "batched", plan.weights + plan.activations)))
        plan = plan_memory(Bundle(spec.out, manifest), budget=2**62, num_examples=0,
                           directions=at.max_perturbations // 2, runtime=spec.device_runtime)
        manifest = replace(manifest, program=replace(manifest.program, device_plan_bytes=plan.total))
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
