"""Where a streamed export's stages come from (export.stream lowers them).

A model loaded whole (a folder, or a preset small enough to build whole) gets peft's LoRA attached whole
and is then cut into stages (`fwdfed.model.stages.split_into_stages`), so the layout and initial
adapter are those of the unstreamed export. A blockwise preset (`llama-7b`: 27 GB of fp32 never
exists here) is built stage by stage from its config, with seeded random weights and peft's LoRA
injected per layer under the names peft gives them in the whole model. Every stage's frozen base is
quantized here, by one scheme (`quantize_stage`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from export.passes import attach_adapter, resolve_base
from export.spec import ExportSpec
from fwdfed.bundle.layout import AdapterLayout
from fwdfed.bundle.schema import Quantization
from fwdfed.bundle.tasks import CAUSAL_LM
from fwdfed.errors import UserError
from fwdfed.model.base_model import load_model, model_hash, preset_config
from fwdfed.model.program import batched_model
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
