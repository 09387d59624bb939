"""The passes of an export, each a function from one form to the next (export.pipeline lists them):
the whole export (export.pipeline) and the streamed one (export.stream) run them."""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model

from export.spec import HEAD_MODULES, PROMPT_LEARNING_ADAPTERS, AdapterSpec, ExportSpec, Shapes
from fwdfed.bundle.files import BASE_MODEL_DIR, INITIAL_ADAPTER, MANIFEST, PROGRAM, TOKENIZER_DIR, sha256_file
from fwdfed.bundle.layout import AdapterLayout
from fwdfed.bundle.manifest import Bundle
from fwdfed.bundle.schema import Manifest
from fwdfed.bundle.tasks import IGNORE_INDEX, SEQ_CLS
from fwdfed.errors import UserError
from fwdfed.memory_plan import MemoryPlan, plan_memory
from fwdfed.model.base_model import PRESETS, infer_task, write_preset
from fwdfed.model.emulator import num_layers_of
from fwdfed.model.program import LogitsProgram, LossProgram, PredictProgram, peft_reference_loss, trainable_layout
from fwdfed.model.split import SplitError, SplitPrograms
from fwdfed.model.split_decoder import DecoderTopProgram


class VerificationError(UserError):
    """The `.pte` and eager PyTorch disagree past the tolerance."""


class MemoryFitError(UserError):
    """No program shape fits the memory budget; the message says what would."""


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
        prefix, top, top_features, _ = split
        if isinstance(top, DecoderTopProgram):
            top.max_perturbations = max_perturbations  # a causal LM's top takes its loss in chunks too
        methods["prefix"] = export(prefix, (batch["input_ids"], batch["attention_mask"]), strict=False)
        with torch.no_grad():
            hidden = prefix(batch["input_ids"], batch["attention_mask"])
        methods["top"] = export(
            top, (hidden, batch["attention_mask"], batch["labels"], adapters[:max_perturbations]),
            dynamic_shapes={"hidden": None, "attention_mask": None, "labels": None, "adapters": perturbations},
            strict=False)
        if top_features is not None:
            methods["top_features"] = export(top_features, (hidden, batch["attention_mask"], adapters[:1]),
                                             strict=False)
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
    from runtime.measure import run_fresh

    measured = run_fresh(folder, mode, 0)
    known = measured["runtime_bytes"] + planned_bytes + measured["adapter_copies_bytes"]
    return {"measured_step_peak_bytes": measured["peak_bytes"], "measured_runtime_bytes": measured["runtime_bytes"],
            "workspace_bytes": max(0, measured["peak_bytes"] - known)}


def measure_and_plan(folder: Path, manifest: Manifest, mode: str, directions: int, runtime: int,
                     method: str | None = "mezo") -> tuple[Manifest, MemoryPlan]:
    """`measure_step` on the written bundle, then the device's own plan of one step (`directions`: those of one
    full call, so that export and device agree) with the workspace it measured: the manifest with both, and
    that plan. The planned bytes the measurement attributes are the plan's weights and activations."""
    def plan_of(m: Manifest) -> MemoryPlan:
        return plan_memory(Bundle(folder, m), budget=2**62, num_examples=0, directions=directions, runtime=runtime,
                           method=method)

    first = plan_of(manifest)
    manifest = replace(manifest, program=replace(manifest.program, **measure_step(
        folder, mode, first.weights + first.activations)))
    plan = plan_of(manifest)
    return replace(manifest, program=replace(manifest.program, device_plan_bytes=plan.total)), plan


def verify(pte: bytes, peft_model, layout: AdapterLayout, initial: np.ndarray, batch: dict, task: str,
           max_perturbations: int, tolerance: float, features_program=None, fp32_model=None) -> dict:
    """Run the `.pte` and the eager peft model on the same inputs; fail past `tolerance`. Each method the
    program has is checked: forward's losses, predict's logits, features, and the batched logits. With a
    quantized base, `peft_model` is the eager quantized model the `.pte` must match, and `fp32_model` the model
    before quantization, whose losses on the same inputs say what the quantization itself changed (reported,
    not checked: that is the scheme's cost, not an export error)."""
    from fwdfed.batch import Batch
    from runtime.engine import ProgramEngine

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
