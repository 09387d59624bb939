"""The forward-only program: a Hugging Face model whose adapter is an explicit input.

`LossProgram.forward(input_ids, attention_mask, labels, adapters[P, d]) -> loss[P, B]` runs
the batch once per adapter vector in a single call, so one call evaluates both signs of
several perturbations while the frozen weights are read once. The adapter math is written
as explicit batched matmuls (bmm): XNNPACK rejects a `linear` whose weight is 3-D. A causal
LM's loss is taken over chunks of positions (`fwdfed.model.loss`), so that P adapter copies do
not hold P batches' vocabulary-wide logits at once.
"""

from __future__ import annotations

import copy

import torch
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from fwdfed.bundle.layout import AdapterLayout, AdapterTensor
from fwdfed.bundle.tasks import CAUSAL_LM, SEQ_CLS
from fwdfed.model.loss import ChunkedCausalLoss, labels_for, per_example_loss, positions_per_chunk
from fwdfed.model.virtual_tokens import (PEFT_ADAPTER_NAME, PrefixedModel, PromptedModel, prompt_learning_config,
                                         prompt_learning_model)

PROMPT_LEARNING_MODELS = (PromptedModel, PrefixedModel)


class AdapterBinding:
    """Holds the [P, d] adapter batch for the duration of one forward call.

    Every adapter module reads its tensors from here, so the batch is a single graph input
    rather than one input per tensor.
    """

    def __init__(self) -> None:
        self.adapters: torch.Tensor | None = None

    def tensor(self, t: AdapterTensor) -> torch.Tensor:
        assert self.adapters is not None, "adapter modules called outside a program forward"
        return self.adapters[:, t.offset : t.end].reshape(-1, *t.shape)


class BatchedLoraLinear(nn.Module):
    """`base(x) + scaling * B_p A_p x` for the P adapter copies; x is the batch repeated P times.

    The base layer keeps peft's attribute name, so a trainable `...base_layer.bias` keeps its path.
    """

    def __init__(self, base: nn.Linear, a: AdapterTensor, b: AdapterTensor, scaling: float, binding: AdapterBinding):
        super().__init__()
        self.base_layer, self.a, self.b, self.scaling, self.binding = base, a, b, scaling, binding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        lora_a = self.binding.tensor(self.a)  # [P, r, in]
        lora_b = self.binding.tensor(self.b)  # [P, out, r]
        xs = x.reshape(lora_a.shape[0], -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(xs, lora_a.transpose(1, 2)), lora_b.transpose(1, 2))
        return y + self.scaling * delta.reshape(y.shape)


class BatchedLinear(nn.Module):
    """A fully trained linear layer (peft's `modules_to_save`, e.g. a classifier head)."""

    def __init__(self, weight: AdapterTensor, bias: AdapterTensor | None, binding: AdapterBinding):
        super().__init__()
        self.weight, self.bias, self.binding = weight, bias, binding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.binding.tensor(self.weight)  # [P, out, in]
        xs = x.reshape(w.shape[0], -1, x.shape[-1])
        y = torch.bmm(xs, w.transpose(1, 2))
        if self.bias is not None:
            y = y + self.binding.tensor(self.bias).unsqueeze(1)
        return y.reshape(*x.shape[:-1], w.shape[1])


class BatchedBiasShift(nn.Module):
    """`module(x) + (b_p - b)`: a trained bias (BitFit, peft's LoRA `bias="all"`) of any module whose
    bias is added to its output last (Linear, LayerNorm), without touching the module."""

    def __init__(self, module: nn.Module, bias: AdapterTensor, binding: AdapterBinding):
        super().__init__()
        self.module, self.bias, self.binding = module, bias, binding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x)
        shift = self.binding.tensor(self.bias) - self.module.bias  # [P, out]
        return (y.reshape(shift.shape[0], -1, y.shape[-1]) + shift.unsqueeze(1)).reshape(y.shape)


def trainable_layout(peft_model: nn.Module) -> AdapterLayout:
    return AdapterLayout.from_shapes([(n, tuple(p.shape)) for n, p in peft_model.named_parameters() if p.requires_grad])


def _adapter_param(layout: AdapterLayout, module_path: str, suffix: str) -> AdapterTensor:
    return layout[f"{module_path}.{suffix}"]


def batched_model(peft_model: nn.Module, layout: AdapterLayout, binding: AdapterBinding) -> nn.Module:
    """A copy of the peft model's network whose adapter layers read from `binding`."""
    model = copy.deepcopy(peft_model)
    # A prompt encoder's linear layers (P-tuning's MLP, prefix tuning's projection) are replaced by
    # the loop below like any trained linear layer; its table and the prompt itself are wired after.
    replacements: list[tuple[str, nn.Module]] = []
    covered: set[str] = set()
    for path, module in model.named_modules():
        if any(path.startswith(done + ".") for done, _ in replacements):
            continue  # inside a module already replaced
        if isinstance(module, LoraLayer):
            if not isinstance(module.base_layer, nn.Linear):
                raise NotImplementedError(
                    f"LoRA on {type(module.base_layer).__name__} ({path}) is not supported by the export path; "
                    "target nn.Linear modules only"
                )
            a = _adapter_param(layout, path, f"lora_A.{PEFT_ADAPTER_NAME}.weight")
            b = _adapter_param(layout, path, f"lora_B.{PEFT_ADAPTER_NAME}.weight")
            scaling = float(module.scaling[PEFT_ADAPTER_NAME])
            replacements.append((path, BatchedLoraLinear(module.base_layer, a, b, scaling, binding)))
            covered |= {a.name, b.name}
        elif isinstance(module, ModulesToSaveWrapper):
            head = module.modules_to_save[PEFT_ADAPTER_NAME]
            if not isinstance(head, nn.Linear):
                raise NotImplementedError(f"trainable module {path} is a {type(head).__name__}; only nn.Linear is supported")
            prefix = f"modules_to_save.{PEFT_ADAPTER_NAME}"
            w = _adapter_param(layout, path, f"{prefix}.weight")
            bias = _adapter_param(layout, path, f"{prefix}.bias") if head.bias is not None else None
            replacements.append((path, BatchedLinear(w, bias, binding)))
            covered |= {w.name} | ({bias.name} if bias else set())
        elif isinstance(module, nn.Linear) and f"{path}.weight" in layout.names:
            # A fully trained linear layer outside peft (BitFit's classifier head).
            w = layout[f"{path}.weight"]
            bias = layout[f"{path}.bias"] if module.bias is not None else None
            replacements.append((path, BatchedLinear(w, bias, binding)))
            covered |= {w.name} | ({bias.name} if bias else set())
    for path, replacement in replacements:
        model.set_submodule(path, replacement)
    for t in layout.tensors:
        if t.name not in covered and t.name.endswith(".bias"):
            path = t.name.removesuffix(".bias")
            module = model.get_submodule(path)
            if not isinstance(module, (nn.Linear, nn.LayerNorm)):
                raise NotImplementedError(f"a trained bias of a {type(module).__name__} ({path}) is not supported "
                                          "by the export path; only nn.Linear and nn.LayerNorm biases are")
            model.set_submodule(path, BatchedBiasShift(module, t, binding))
            covered.add(t.name)
    if prompt_learning_config(model) is not None:
        model, table = prompt_learning_model(model, layout, binding)
        covered.add(table)
    uncovered = [t.name for t in layout.tensors if t.name not in covered]
    if uncovered:
        raise NotImplementedError(f"the export path cannot feed these adapter tensors as inputs: {uncovered[:3]}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class LossProgram(nn.Module):
    """forward(input_ids[B,L], attention_mask[B,L], labels, adapters[P,d]) -> loss[P,B].

    A causal LM with a separable head (the decoder's final hidden states, then a linear head)
    takes its loss over chunks of positions (`ChunkedCausalLoss`), so that its planned memory
    does not grow with P by the vocabulary; the chunks are sized for `max_perturbations`, the
    largest P the program is called with, which the exporter sets before tracing.
    """

    def __init__(self, model: nn.Module, binding: AdapterBinding, task: str):
        super().__init__()
        self.model, self.binding, self.task = model, binding, task
        self.max_perturbations = 1
        # A prompt-learning model (virtual_tokens.PromptedModel, PrefixedModel) feeds its decoder
        # embeddings or a cache of its own: it keeps the whole-logits loss.
        separable = task == CAUSAL_LM and not isinstance(model, PROMPT_LEARNING_MODELS)
        backbone, head = decoder_and_head(model) if separable else (None, None)
        self.backbone = backbone
        # Named as fwdfed.model.loss.CHUNK_MODULE_PATH says: the exporter finds the chunks by it.
        self.chunked_loss = ChunkedCausalLoss(head) if head is not None else None

    def forward(self, input_ids, attention_mask, labels, adapters):
        p, b = adapters.shape[0], input_ids.shape[0]
        self.binding.adapters = adapters
        ids, mask = input_ids.repeat(p, 1), attention_mask.repeat(p, 1)
        if self.chunked_loss is not None:
            hidden = self.backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            chunk = positions_per_chunk(labels.shape[1] - 1, self.max_perturbations)
            return self.chunked_loss(hidden, labels.repeat(p, 1), chunk).reshape(p, b)
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        repeated_labels = labels.repeat(p) if self.task == SEQ_CLS else labels.repeat(p, 1)
        return per_example_loss(logits, labels_for(logits, repeated_labels, self.task), self.task).reshape(p, b)


def decoder_and_head(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """A causal LM's decoder (final hidden states) and its LM head, or (None, None) when the model
    is not split that way. The head may carry a LoRA (a BatchedLoraLinear): it is called as is.
    An architecture whose logits are more than head(final hidden state) (a soft cap, a scale) would
    disagree with the unmodified peft model, and export's verification refuses it."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model  # bitfit: no peft wrapper
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    backbone = getattr(hf, "base_model", hf)  # Hugging Face: the model without its head
    if head is None or backbone is hf:
        return None, None
    return backbone, head


class PredictProgram(nn.Module):
    """predict(input_ids[B,L], attention_mask[B,L], adapter[1,d]) -> logits for evaluation."""

    def __init__(self, model: nn.Module, binding: AdapterBinding):
        super().__init__()
        self.model, self.binding = model, binding

    def forward(self, input_ids, attention_mask, adapter):
        self.binding.adapters = adapter
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class LogitsProgram(nn.Module):
    """logits(input_ids[B,L], attention_mask[B,L], adapters[P,d]) -> logits[P,B,C] of a classifier: the
    batch once per adapter vector in one call, as forward does, for a loss the device takes itself
    (fwdfed.methods.fedkd's distillation loss). The same network as the other methods: no second copy
    of the weights in the program."""

    def __init__(self, model: nn.Module, binding: AdapterBinding):
        super().__init__()
        self.model, self.binding = model, binding

    def forward(self, input_ids, attention_mask, adapters):
        p, b = adapters.shape[0], input_ids.shape[0]
        self.binding.adapters = adapters
        logits = self.model(input_ids=input_ids.repeat(p, 1), attention_mask=attention_mask.repeat(p, 1)).logits
        return logits.reshape(p, b, logits.shape[-1])


class FeaturesProgram(nn.Module):
    """features(input_ids[B,L], attention_mask[B,L], adapter[1,d]) -> [B, H]: what the classification
    head reads (the input of the model's `classifier`), so that class statistics (the LDA head of
    `fwdfed.methods.class_stats`) are computed with forward passes only.

    The input is caught by a hook on the same network the other methods run (no second copy of
    the weights in the program); the head's own matmul is left unused and pruned at export."""

    def __init__(self, model: nn.Module, binding: AdapterBinding, head: nn.Module):
        super().__init__()
        self.model, self.binding = model, binding
        self._capturing, self._captured = False, None
        head.register_forward_pre_hook(self._capture)

    def _capture(self, module, args):
        if self._capturing:
            self._captured = args[0]

    def forward(self, input_ids, attention_mask, adapter):
        self.binding.adapters = adapter
        self._capturing = True
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            self._capturing = False
        return self._captured


def classification_head(model: nn.Module) -> nn.Module | None:
    """The model's final classifier (BERT's and DistilBERT's `classifier`), or None."""
    found = [m for path, m in model.named_modules() if path.rsplit(".", 1)[-1] == "classifier"]
    return found[-1] if found else None


def build_programs(peft_model: nn.Module, layout: AdapterLayout, task: str):
    """(LossProgram, PredictProgram, FeaturesProgram or None): one network, the adapter an input."""
    binding = AdapterBinding()
    model = batched_model(peft_model, layout, binding)
    head = classification_head(model) if task == SEQ_CLS else None
    features = FeaturesProgram(model, binding, head) if head is not None else None
    return LossProgram(model, binding, task), PredictProgram(model, binding), features


def peft_reference_loss(peft_model: nn.Module, layout: AdapterLayout, adapter: torch.Tensor, batch: dict, task: str):
    """Per-example loss of the unmodified peft model with `adapter` loaded: the eager reference."""
    params = {t.name: adapter[t.offset : t.end].reshape(t.shape) for t in layout.tensors}
    with torch.no_grad():
        out = torch.func.functional_call(
            peft_model, params, (), {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, strict=False
        )
    return per_example_loss(out.logits, labels_for(out.logits, batch["labels"], task), task)
