"""Export as a pipeline of named passes, each from one form to the next:

    resolve_base    source (folder or preset)   -> base model folder, task
    attach_adapter  HF model + AdapterSpec      -> peft model, adapter layout, initial adapter
    build_programs  peft model                  -> LossProgram, PredictProgram (adapter as input)
    lower           eager programs              -> ExecuTorch program bytes, planned memory
    quantize        peft model                  -> its frozen base linears quantized (--quantize), report
    verify          .pte vs eager peft          -> max abs difference (fails past a tolerance); quantized:
                                                   against the eager quantized model, and its loss vs fp32
    write_bundle    everything above            -> model.pte, manifest.json, adapter, tokenizer
    measure_step    the bundle                  -> a training step's measured peak, in a fresh process

With --mem, lower..measure_step run again at a smaller P, batch, then length until the device's
plan (with what the backend was measured to hold beyond the plan) fits the budget (fit_memory).
Each progress line starts with the pass it reports ([lower], [verify], ...); the streamed export
(export.stream) runs the same passes stage by stage, and export.run moves either into place.
"""

from __future__ import annotations

import copy
import inspect
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

from fwdfed.bundle.files import BASE_MODEL_DIR, INITIAL_ADAPTER, MANIFEST, PROGRAM, TOKENIZER_DIR, sha256_file
from fwdfed.bundle.layout import AdapterLayout
from fwdfed.bundle.manifest import Bundle
from fwdfed.bundle.schema import AdapterRecord, Inputs, Manifest, ModelRecord, Program
from fwdfed.bundle.tasks import CAUSAL_LM, IGNORE_INDEX, SEQ_CLS
from fwdfed.errors import UserError
from fwdfed.memory_plan import plan_memory, planned_arena
from fwdfed.model.base_model import PRESETS, infer_task, load_model, model_hash, write_preset
from fwdfed.model.emulator import DROP_LAYERS, DropLayers, EmulatorRecord, num_layers_of, write_emulator_model
from fwdfed.model.quantize import QUANTIZED_TOLERANCE, check_adapter_fp32, check_options, quantize_base
from fwdfed.model.program import (LogitsProgram, LossProgram, PredictProgram, build_programs, peft_reference_loss,
                                  trainable_layout)
from fwdfed.model.split import SplitError, SplitPrograms, split_programs
from fwdfed.model.virtual_tokens import PEFT_ADAPTER_NAME

PEFT_TASK_TYPES = {CAUSAL_LM: "CAUSAL_LM", SEQ_CLS: "SEQ_CLS"}
# Architectures for which peft ships no default LoRA targets: the attention query and value,
# as peft does for the others.
EXTRA_DEFAULT_TARGETS = {"distilbert": ["q_lin", "v_lin"]}


class VerificationError(UserError):
    """The `.pte` and eager PyTorch disagree past the tolerance."""


# Prompt learning (fwdfed.model.virtual_tokens): the virtual tokens, P-tuning's prompt encoder or the
# prefix keys and values are the adapter vector.
PROMPT_LEARNING_ADAPTERS = ("prompt-tuning", "p-tuning", "prefix-tuning")
ADAPTERS = ("lora", "bitfit", *PROMPT_LEARNING_ADAPTERS)
# What the export path cannot take, and why.
UNSUPPORTED_ADAPTERS = {
    "ia3": "its scaling vectors would need their own batched path (not written yet)",
}
PROMPT_INITS = ("random", "text")
P_TUNING_ENCODERS = ("mlp", "lstm")
HEAD_MODULES = ("classifier", "score")  # trained whole for classification, as peft's modules_to_save


@dataclass
class AdapterSpec:
    kind: str = "lora"  # lora (peft), bitfit (all biases + the classification head), or prompt learning
    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] | None = None  # None: peft's default for the architecture
    bias: str = "none"  # peft LoRA's bias option: none, all, lora_only
    seed: int = 0
    # prompt learning
    num_virtual_tokens: int = 8
    prompt_init: str = "random"  # prompt tuning: random, or the embeddings of prompt_init_text's tokens
    prompt_init_text: str | None = None
    encoder: str = "mlp"  # P-tuning's prompt encoder: mlp (lstm is refused: it does not lower)
    encoder_hidden_size: int | None = None  # P-tuning's MLP width; None: the model's hidden size, as peft
    layers: list[int] | None = None  # LoRA on these blocks only (peft's layers_to_transform); None: every block

    def __post_init__(self):
        if self.kind in UNSUPPORTED_ADAPTERS:
            raise NotImplementedError(f"adapter {self.kind!r} is not supported by the ExecuTorch export path: "
                                      f"{UNSUPPORTED_ADAPTERS[self.kind]}; supported: {', '.join(ADAPTERS)}")
        if self.kind not in ADAPTERS:
            raise ValueError(f"unknown adapter {self.kind!r}; supported: {', '.join(ADAPTERS)}")
        if self.num_virtual_tokens < 1:
            raise ValueError("the number of virtual tokens must be at least 1")
        if self.prompt_init not in PROMPT_INITS:
            raise ValueError(f"unknown prompt init {self.prompt_init!r}; supported: {', '.join(PROMPT_INITS)}")
        if self.prompt_init == "text" and self.kind != "prompt-tuning":
            raise ValueError("a prompt initialised from text is for --adapter prompt-tuning only")
        if (self.prompt_init == "text") != bool(self.prompt_init_text):
            raise ValueError("--prompt-init text needs --prompt-init-text, and --prompt-init-text needs "
                             "--prompt-init text")
        if self.encoder not in P_TUNING_ENCODERS:
            raise ValueError(f"unknown prompt encoder {self.encoder!r}; supported: {', '.join(P_TUNING_ENCODERS)}")
        if self.encoder == "lstm":
            raise NotImplementedError("P-tuning's LSTM prompt encoder is not supported by the export path: its "
                                      "weights are adapter inputs, and no batched LSTM is written for them; use mlp")

    def lora_config(self, task: str, model_type: str) -> LoraConfig:
        targets = self.target_modules or EXTRA_DEFAULT_TARGETS.get(model_type)
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=targets, bias=self.bias,
                          lora_dropout=0.0, task_type=PEFT_TASK_TYPES[task], layers_to_transform=self.layers)

    def prompt_learning_config(self, task: str, model_config, tokenizer_folder: Path) -> PeftConfig:
        # The model's shape is passed explicitly: peft reads it from config.to_dict(), where some
        # architectures (DistilBERT: dim, n_layers, n_heads) have other names.
        shape = dict(num_virtual_tokens=self.num_virtual_tokens, task_type=PEFT_TASK_TYPES[task],
                     token_dim=model_config.hidden_size, num_layers=model_config.num_hidden_layers,
                     num_attention_heads=model_config.num_attention_heads)
        if self.kind == "prompt-tuning":
            text = dict(prompt_tuning_init="TEXT", prompt_tuning_init_text=self.prompt_init_text,
                        tokenizer_name_or_path=str(tokenizer_folder)) if self.prompt_init == "text" else {}
            return PromptTuningConfig(**shape, **text)
        if self.kind == "p-tuning":
            return PromptEncoderConfig(**shape, encoder_reparameterization_type=self.encoder.upper(),
                                       encoder_hidden_size=self.encoder_hidden_size or model_config.hidden_size)
        # peft sizes the prefix of a grouped-query model by its key/value heads.
        return PrefixTuningConfig(**shape)


@dataclass
class ExportSpec:
    source: str  # a local folder, or "preset:NAME"
    out: Path
    task: str | None = None
    num_labels: int = 2
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    batch_size: int = 4
    seq_len: int = 64
    max_perturbations: int = 8
    tolerance: float | None = None  # None: 1e-4 for fp32, QUANTIZED_TOLERANCE for a quantized base
    quantize: str | None = None  # a fwdfed.model.quantize scheme for the frozen base linears (8da4w, 8da8w)
    group_size: int | None = None  # 8da4w's group of input features (default 32)
    mem_budget: int | None = None  # bytes a device may use: shrink P, then batch, then length to fit
    device_runtime: int = 256 * 2**20  # what the device's runtime holds before any model (Python SDK here)
    # A classifier's logits for P adapter vectors in one call (the `logits` method), for a loss the device
    # takes itself: the distillation loss of fwdfed.methods.fedkd.
    distillation: bool = False
    # predict only (a teacher's program: fedkd's devices run it for inference, never train it)
    inference_only: bool = False
    # Offsite tuning: the program is the emulator made from `source` (the full model's folder) by dropping
    # blocks; `full_bundle` is the identity of the full model's bundle, exported first (run_emulator_export).
    emulator: DropLayers | None = None
    full_bundle: dict | None = None
    stream: bool = False  # one program per stage (export.stream), run one at a time on the device
    # The adapter on the top K blocks only, and the program split into a frozen `prefix` the device runs
    # once per example and an adapted `top` every forward-only pass runs (fwdfed.model.split).
    top_blocks: int | None = None

    def __post_init__(self):
        if self.distillation and self.inference_only:
            raise ValueError("--distillation adds a training method; --inference-only exports predict alone")
        if self.inference_only:
            self.max_perturbations = 1  # predict takes one adapter vector
        if self.stream and (self.distillation or self.inference_only or self.emulator is not None):
            # A streamed bundle's stages compute the loss only: no logits, predict or emulator path.
            raise ValueError("--stream computes the loss only: it does not combine with --distillation, "
                             "--inference-only or --emulator")
        if self.top_blocks is not None:
            if self.top_blocks < 1:
                raise ValueError(f"--adapter-blocks top:K needs K >= 1, got {self.top_blocks}")
            if self.stream or self.emulator is not None or self.inference_only:
                raise ValueError("--adapter-blocks top:K splits a whole program: it does not combine with --stream, "
                                 "--emulator or --inference-only")
            if self.adapter.kind != "lora":
                raise ValueError(f"--adapter-blocks top:K puts LoRA on the top blocks; --adapter {self.adapter.kind} "
                                 "trains tensors below them")
        if self.quantize is not None:
            self.group_size = check_options(self.quantize, self.group_size)
        elif self.group_size is not None:
            raise ValueError("--group-size is for --quantize 8da4w")
        if self.tolerance is None:
            self.tolerance = FP32_TOLERANCE if self.quantize is None else QUANTIZED_TOLERANCE


FP32_TOLERANCE = 1e-4


class MemoryFitError(UserError):
    """No program shape fits the memory budget; the message says what would."""


@dataclass(frozen=True)
class Shapes:
    batch_size: int
    seq_len: int
    max_perturbations: int

    def smaller(self, factor: float) -> "Shapes | None":
        """Shapes whose activations are about `factor` times these: P first (down to 2, both signs of
        one direction), then the batch (down to 1), then the sequence length (down to 16)."""
        p, b, length = self.max_perturbations, self.batch_size, self.seq_len
        if p > 2:
            return Shapes(b, length, max(2, min(p - 1, int(p * factor))))
        if b > 1:
            return Shapes(max(1, min(b - 1, int(b * factor))), length, p)
        if length > 16:
            return Shapes(b, max(16, min(length - 1, int(length * factor))), p)
        return None


# ---- passes -----------------------------------------------------------------------------

def resolve_base(spec: ExportSpec) -> tuple[Path, str, str]:
    """The base model folder, the task, and the folder as the manifest records it."""
    if spec.source.startswith("preset:"):
        name = spec.source.removeprefix("preset:")
        folder = spec.out / BASE_MODEL_DIR
        write_preset(name, folder, spec.num_labels)
        task = PRESETS[name].task
        if spec.task and spec.task != task:
            raise ValueError(f"preset {name} is a {task} model, not {spec.task}")
        return folder, task, BASE_MODEL_DIR
    folder = Path(spec.source).resolve()
    task = spec.task or infer_task(folder)
    return folder, task, str(folder)


def mark_bitfit(model, task: str):
    """BitFit: train every bias, and the classification head whole. peft has no BitFit tuner."""
    for name, p in model.named_parameters():
        head = task == SEQ_CLS and any(part in HEAD_MODULES for part in name.split("."))
        p.requires_grad_(name.endswith(".bias") or head)
    if not any(p.requires_grad for p in model.parameters()):
        raise NotImplementedError(f"{type(model).__name__} has no biases to tune: use --adapter lora")
    return model.eval()


def takes_past_key_values(model) -> bool:
    """Whether prefix tuning can feed this model its prefix: peft's test (the model's forward, or its
    backbone's for a classifier, takes past_key_values)."""
    backbone = getattr(model, model.base_model_prefix, model)
    return any("past_key_values" in inspect.signature(m.forward).parameters for m in (model, backbone))


def hidden_size_of(model_config) -> int:
    """The encoder's width (DistilBERT calls it dim)."""
    return int(getattr(model_config, "hidden_size", None) or model_config.dim)


def top_blocks_adapter(spec: ExportSpec, task: str, model_config) -> AdapterSpec:
    """The adapter on the model's top `spec.top_blocks` blocks (peft's layers_to_transform)."""
    if task != SEQ_CLS:
        raise SplitError("--adapter-blocks top:K splits encoder classifiers (BERT, DistilBERT); a causal LM "
                         "splits into stages with --stream")
    blocks = num_layers_of(model_config.to_dict())
    if spec.top_blocks > blocks:
        raise SplitError(f"--adapter-blocks top:{spec.top_blocks}: the model has {blocks} blocks")
    return replace(spec.adapter, layers=list(range(blocks - spec.top_blocks, blocks)))


def attach_adapter(model, task: str, adapter: AdapterSpec, folder: Path | None = None):
    """The peft model, its layout and initial adapter; `folder` holds the tokenizer a prompt
    initialised from text is read with."""
    # peft's LoRA A init and prompt tables are random; the initial adapter is reproducible.
    torch.manual_seed(adapter.seed)
    if adapter.kind == "bitfit":
        peft_model = mark_bitfit(model, task)
    elif adapter.kind in PROMPT_LEARNING_ADAPTERS:
        if adapter.kind == "prefix-tuning" and not takes_past_key_values(model):
            raise NotImplementedError(f"prefix tuning needs a model that takes past keys and values; "
                                      f"{type(model).__name__} does not (peft refuses it too): "
                                      "use prompt-tuning or p-tuning")
        peft_model = get_peft_model(model, adapter.prompt_learning_config(task, model.config, folder)).eval()
    else:
        peft_model = get_peft_model(model, adapter.lora_config(task, model.config.model_type)).eval()
    layout = trainable_layout(peft_model)
    initial = layout.flatten({n: p.detach().numpy() for n, p in peft_model.named_parameters() if p.requires_grad})
    return peft_model, layout, initial


def check_positions(model_config, positions: int) -> None:
    """Virtual tokens (and a prefix) take positions of the model's context."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and positions > limit:
        raise ValueError(f"--seq-len plus --num-virtual-tokens is {positions}, past the model's "
                         f"{limit} positions")


def example_inputs(spec: ExportSpec, task: str, vocab_size: int, pad_id: int, seed: int = 0):
    """A batch with padding in its last row, so verification covers the mask path."""
    g = torch.Generator().manual_seed(seed)
    b, length = spec.batch_size, spec.seq_len
    ids = torch.randint(4, vocab_size, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[-1, length // 2 :] = 0
    ids[mask == 0] = pad_id
    if task == SEQ_CLS:
        labels = torch.randint(0, spec.num_labels, (b,), generator=g)
    else:
        labels = torch.where(mask == 1, ids, torch.full_like(ids, IGNORE_INDEX))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lower(loss_program: LossProgram, predict_program: PredictProgram, batch: dict, adapter_dim: int,
          max_perturbations: int, features_program=None, logits_program: LogitsProgram | None = None,
          inference_only: bool = False, split: SplitPrograms | None = None):
    """torch.export the methods and lower them to one XNNPACK-delegated ExecuTorch program: forward and
    predict, features for a classifier, logits when asked, prefix and top for a split program; predict
    alone when `inference_only`."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from torch.export import Dim, export

    from export.loss_chunks import LossChunkPartitioner, order_depth_first

    loss_program.max_perturbations = max_perturbations  # the loss's chunks are sized for it
    adapters = torch.zeros(2, adapter_dim)
    # P is dynamic, 1..max; torch.export takes no range of one value, so P = 1 is a static shape.
    perturbations = {0: Dim("perturbations", min=1, max=max_perturbations)} if max_perturbations > 1 else None
    ep_predict = export(predict_program, (batch["input_ids"], batch["attention_mask"], adapters[:1]), strict=False)
    methods = {"predict": ep_predict}
    if not inference_only:
        methods["forward"] = export(
            loss_program, (batch["input_ids"], batch["attention_mask"], batch["labels"], adapters[:max_perturbations]),
            dynamic_shapes={"input_ids": None, "attention_mask": None, "labels": None, "adapters": perturbations},
            strict=False,
        )
    if logits_program is not None:  # the P vectors' logits, for a loss taken on the device (distillation)
        methods["logits"] = export(
            logits_program, (batch["input_ids"], batch["attention_mask"], adapters[:max_perturbations]),
            dynamic_shapes={"input_ids": None, "attention_mask": None, "adapters": perturbations}, strict=False)
    # Classifiers: the head's input, for statistics computed forward-only.
    if features_program is not None and not inference_only:
        methods["features"] = export(features_program, (batch["input_ids"], batch["attention_mask"], adapters[:1]),
                                     strict=False)
    if split is not None:  # the frozen bottom once per example, the adapted top once per adapter vector
        prefix, top, top_features = split
        methods["prefix"] = export(prefix, (batch["input_ids"], batch["attention_mask"]), strict=False)
        with torch.no_grad():
            hidden = prefix(batch["input_ids"], batch["attention_mask"])
        methods["top"] = export(
            top, (hidden, batch["attention_mask"], batch["labels"], adapters[:max_perturbations]),
            dynamic_shapes={"hidden": None, "attention_mask": None, "labels": None, "adapters": perturbations},
            strict=False)
        methods["top_features"] = export(top_features, (hidden, batch["attention_mask"], adapters[:1]), strict=False)
    # Dynamic-weight matmuls (the adapter's) are only delegated with force_non_static_weights.
    # The causal-LM loss's chunks go first, each to a delegate of its own, run in turn (export.loss_chunks).
    options = {"force_non_static_weights_for_f32_linear": True}
    edge = to_edge_transform_and_lower(
        methods, partitioner=[LossChunkPartitioner(**options), XnnpackPartitioner(**options)],
    ).transform([order_depth_first])
    # alloc_graph_input=False: the runtime reads inputs in place instead of copying the adapter batch.
    et = edge.to_executorch(ExecutorchBackendConfig(memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False)))
    planned = {plan.name: int(sum(plan.non_const_buffer_sizes)) for plan in et.executorch_program.execution_plan}
    return et.buffer, planned


def fit_memory(spec: ExportSpec, build_at, log):
    """Build at the asked shapes; with a budget, build again at smaller ones until the plan fits.
    `build_at(shapes)` returns (result, device plan bytes, planned arena bytes, bytes that cannot shrink).
    The next try's shapes take the arena to scale with P x batch x length and the rest of what was
    measured (the backend's workspace included) to stay: an estimate too hopeful costs one more try,
    never a program over budget, as every try is measured; taking the workspace to shrink too would
    step P down one at a time, a whole lowering and measurement per step."""
    shapes = Shapes(spec.batch_size, spec.seq_len, spec.max_perturbations)
    for _ in range(6):
        result, total, arena, fixed = build_at(shapes)
        if spec.mem_budget is None:
            return result
        log(f"      device plan at batch {shapes.batch_size}, seq {shapes.seq_len}, P {shapes.max_perturbations}: "
            f"{total / 2**20:.0f} MiB of the {spec.mem_budget / 2**20:.0f} MiB budget")
        if total <= spec.mem_budget:
            return result
        if fixed >= spec.mem_budget:
            raise MemoryFitError(f"the runtime ({spec.device_runtime / 2**20:.0f} MiB), the weights and the adapter "
                                 f"copies alone ({fixed / 2**20:.0f} MiB) pass the {spec.mem_budget / 2**20:.0f} MiB "
                                 "budget: use a smaller model, a smaller adapter"
                                 + ("" if spec.quantize else ", or --quantize 8da4w"))
        smaller = shapes.smaller(0.9 * max(0, spec.mem_budget - (total - arena)) / max(arena, 1))
        if smaller is None:
            break
        log(f"      over budget: building again at batch {smaller.batch_size}, seq {smaller.seq_len}, "
            f"P {smaller.max_perturbations}")
        shapes = smaller
    raise MemoryFitError(f"no program shape fits the {spec.mem_budget / 2**20:.0f} MiB budget (tried down to batch "
                         f"{shapes.batch_size}, seq {shapes.seq_len}, P {shapes.max_perturbations}): use a smaller "
                         "or quantized model")


def measure_step(folder: Path, mode: str, planned_bytes: int) -> dict:
    """Run the program's largest step in a fresh process (`mode`: "batched", MeZO at P = max; "labelling" for an
    inference-only teacher) and attribute its peak: what is left after the runtime, the `planned_bytes` the
    plan accounts for (program and planned buffers, or a streamed program's weights and activations) and the
    adapter copies is what the backend holds beyond the plan: XNNPACK's buffers inside its delegates (which
    ExecuTorch's memory plan does not see), its thread pool and packed weights, and the first run's lazily
    built state. The whole and the streamed exports both measure here."""
    from device_sdk.measure import run_fresh

    measured = run_fresh(folder, mode, 0)
    known = measured["runtime_bytes"] + planned_bytes + measured["adapter_copies_bytes"]
    return {"measured_step_peak_bytes": measured["peak_bytes"], "measured_runtime_bytes": measured["runtime_bytes"],
            "workspace_bytes": max(0, measured["peak_bytes"] - known)}


def verify(pte: bytes, peft_model, layout: AdapterLayout, initial: np.ndarray, batch: dict, task: str,
           max_perturbations: int, tolerance: float, features_program=None, fp32_model=None) -> dict:
    """Run the `.pte` and the eager peft model on the same inputs; fail past `tolerance`. Each method the
    program has is checked: forward's losses, predict's logits, features, and the batched logits. With a
    quantized base, `peft_model` is the eager quantized model the `.pte` must match, and `fp32_model` the model
    before quantization, whose losses on the same inputs say what the quantization itself changed (reported,
    not checked: that is the scheme's cost, not an export error)."""
    from device_sdk.engine import ProgramEngine
    from fwdfed.batch import Batch

    g = np.random.default_rng(0)
    # Perturbed adapters, so that the (zero-initialised) LoRA B path is exercised too.
    adapters = (initial[None, :] + 0.05 * g.standard_normal((2, layout.dim))).astype(np.float32)
    engine = ProgramEngine(pte, max_perturbations)
    b = Batch(batch["input_ids"], batch["attention_mask"], batch["labels"], np.ones(len(batch["input_ids"]), np.float32))
    loss_diff = 0.0
    if engine.has_forward:
        pte_losses = engine.losses(b, adapters)
        eager_losses = np.stack([peft_reference_loss(peft_model, layout, torch.from_numpy(a), batch, task).numpy()
                                 for a in adapters])
        loss_diff = float(np.max(np.abs(pte_losses - eager_losses)))

    def eager_logits(adapter: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            params = layout.unflatten(adapter)
            return torch.func.functional_call(
                peft_model, {k: torch.from_numpy(v) for k, v in params.items()}, (),
                {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, strict=False,
            ).logits.numpy()

    logits_diff = float(np.max(np.abs(engine.logits(b, adapters[0]) - eager_logits(adapters[0]))))
    result = {"loss_max_abs_diff": loss_diff, "logits_max_abs_diff": logits_diff, "tolerance": tolerance}
    if engine.has_batched_logits:
        batched = engine.batched_logits(b, adapters)
        result["batched_logits_max_abs_diff"] = float(max(np.max(np.abs(batched[i] - eager_logits(a)))
                                                          for i, a in enumerate(adapters)))
        logits_diff = max(logits_diff, result["batched_logits_max_abs_diff"])
    if fp32_model is not None and engine.has_forward:
        fp32_losses = np.stack([peft_reference_loss(fp32_model, layout, torch.from_numpy(a), batch, task).numpy()
                                for a in adapters])
        result |= {"reference": "eager quantized peft model",
                   "quantized_vs_fp32_loss_max_abs_diff": float(np.max(np.abs(eager_losses - fp32_losses))),
                   "fp32_mean_loss": float(fp32_losses.mean()), "quantized_mean_loss": float(eager_losses.mean()),
                   "pte_mean_loss": float(pte_losses.mean())}
    if engine.has_split:  # top(prefix(x)) through the runtime against the whole eager peft model
        states = engine.prefix_states(b)
        split_losses = engine.losses(replace(b, prefix_states=states), adapters)
        result["split_loss_max_abs_diff"] = float(np.max(np.abs(split_losses - eager_losses)))
        # What the device trains on: the states kept in float16 (reported; the rounding is the cache's cost)
        kept = engine.losses(replace(b, prefix_states=states.astype(np.float16)), adapters)
        result["split_fp16_states_loss_max_abs_diff"] = float(np.max(np.abs(kept - eager_losses)))
        loss_diff = max(loss_diff, result["split_loss_max_abs_diff"])
        if features_program is not None:  # the head's input through the top, against the whole eager network
            with torch.no_grad():
                whole = features_program(batch["input_ids"], batch["attention_mask"],
                                         torch.from_numpy(adapters[:1])).numpy()
            through_top = engine.features(replace(b, prefix_states=states), adapters[0])
            result["split_features_max_abs_diff"] = float(np.max(np.abs(through_top - whole)))
            logits_diff = max(logits_diff, result["split_features_max_abs_diff"])
    if features_program is not None and engine.has_features:
        with torch.no_grad():
            eager_features = features_program(batch["input_ids"], batch["attention_mask"],
                                              torch.from_numpy(adapters[:1])).numpy()
        result["features_max_abs_diff"] = float(np.max(np.abs(engine.features(b, adapters[0]) - eager_features)))
        logits_diff = max(logits_diff, result["features_max_abs_diff"])
    if not (loss_diff <= tolerance and logits_diff <= tolerance * 10):
        versus = ("; the quantization itself moved the loss by up to "
                  f"{result['quantized_vs_fp32_loss_max_abs_diff']:.3g}" if fp32_model is not None else "")
        raise VerificationError(
            f".pte and eager PyTorch{' (quantized)' if fp32_model is not None else ''} disagree: loss max |diff| "
            f"{loss_diff:.3g}, logits max |diff| {logits_diff:.3g} (tolerance {tolerance:g}){versus}"
        )
    return result


def write_bundle(out: Path, pte: bytes, manifest: Manifest, initial: np.ndarray, tokenizer) -> Manifest:
    """The bundle's files, and the manifest with the program's sha256."""
    (out / PROGRAM).write_bytes(pte)
    (out / INITIAL_ADAPTER).write_bytes(initial.astype("<f4").tobytes())
    tokenizer.save_pretrained(out / TOKENIZER_DIR)
    manifest = replace(manifest, program=replace(manifest.program, sha256=sha256_file(out / PROGRAM)))
    # The manifest goes last: a folder with a manifest is a complete bundle.
    (out / MANIFEST).write_text(manifest.to_json())
    return manifest


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
        log(f"      split: blocks 0-{split.prefix.frozen - 1} frozen (the prefix, once per example), "
            f"{len(split.top.parts.layers) - split.prefix.frozen} adapted (the top, every pass; the last for the "
            "first row only)")
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
        mode = "batched" if manifest.program.has("forward") else "labelling"
        measured = measure_step(spec.out, mode, manifest.program.bytes + planned_arena(manifest.program))
        manifest = replace(manifest, program=replace(manifest.program, **measured))
        # The device's own plan (with the directions of one full call), so export and device agree.
        plan = plan_memory(Bundle(spec.out, manifest), budget=2**62, num_examples=0,
                           directions=shapes.max_perturbations // 2, runtime=spec.device_runtime,
                           method=None if spec.inference_only else "mezo")
        manifest = replace(manifest, program=replace(manifest.program, device_plan_bytes=plan.total))
        log(f"[measure_step] step peak {manifest.program.measured_step_peak_bytes / 2**20:.0f} MiB "
            f"(the backend beyond the plan: {plan.workspace / 2**20:.0f} MiB)")
        (spec.out / MANIFEST).write_text(manifest.to_json())
        fixed = spec.device_runtime + len(pte) + 4 * layout.dim * 4
        return manifest, plan.total, planned_arena(manifest.program), fixed

    return fit_memory(spec, build_at, log)
