"""Prompt learning (peft's prompt tuning, P-tuning, prefix tuning) with the adapter as a program input.

peft's own forward for these adapters reads its prompt encoder's parameters and runs the batch
once; here the encoder's table comes from the [P, d] adapter batch, the encoder runs on the P
copies (its linear layers are `BatchedLinear`s, swapped in by `batched_model`), and each copy's
output is repeated over the batch, which `LossProgram` has already repeated P times. The rest
mirrors peft's `PeftModelForCausalLM.forward` / `PeftModelForSequenceClassification.forward`:

- prompt tuning and P-tuning prepend the encoder's [n, hidden] output to the input embeddings and
  ones to the attention mask; for a causal LM the logits then carry n more positions, whose labels
  peft sets to ignored (`fwdfed.model.loss.labels_for`);
- prefix tuning feeds the encoder's [n, layers x 2 x kv-hidden] output as every layer's past keys
  and values (a `DynamicCache`, as peft builds it) and prepends ones to the mask; the logits keep
  the input's length.
"""

from __future__ import annotations

import torch
from peft import PeftType
from peft.tuners.p_tuning import PromptEncoder, PromptEncoderReparameterizationType
from torch import nn
from transformers import DynamicCache

from fwdfed.bundle.layout import AdapterTensor

PEFT_ADAPTER_NAME = "default"
PROMPT_LEARNING = (PeftType.PROMPT_TUNING, PeftType.P_TUNING, PeftType.PREFIX_TUNING)


class BatchedPromptTable(nn.Module):
    """Stands in for a prompt encoder's `embedding`: the P copies of its [n, width] table, whatever
    the indices (peft always looks up all n virtual tokens, in order)."""

    def __init__(self, table: AdapterTensor, binding):
        super().__init__()
        self.table, self.binding = table, binding

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.binding.tensor(self.table)  # [P, n, width]


def _repeat_per_copy(per_copy: torch.Tensor, rows: int) -> torch.Tensor:
    """[P, ...] -> [rows, ...]: copy p repeated for its block of rows // P examples (the order of
    `input_ids.repeat(P, 1)`)."""
    p = per_copy.shape[0]
    return per_copy.unsqueeze(1).expand(p, rows // p, *per_copy.shape[1:]).reshape(rows, *per_copy.shape[1:])


def _with_virtual_mask(attention_mask: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat((torch.ones_like(attention_mask[:, :1]).expand(-1, n), attention_mask), dim=1)


class PromptedModel(nn.Module):
    """Prompt tuning / P-tuning: the encoder's output prepended to the input embeddings."""

    def __init__(self, base_model: nn.Module, word_embeddings: nn.Module, encoder: nn.Module, num_virtual_tokens: int):
        super().__init__()
        self.base_model, self.word_embeddings, self.encoder = base_model, word_embeddings, encoder
        self.num_virtual_tokens = num_virtual_tokens
        self.register_buffer("indices", torch.arange(num_virtual_tokens), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        embeds = self.word_embeddings(input_ids)
        prompts = _repeat_per_copy(self.encoder(self.indices).to(embeds.dtype), input_ids.shape[0])
        return self.base_model(inputs_embeds=torch.cat((prompts, embeds), dim=1),
                               attention_mask=_with_virtual_mask(attention_mask, self.num_virtual_tokens))


class PrefixedModel(nn.Module):
    """Prefix tuning: the encoder's output as every layer's past keys and values."""

    def __init__(self, base_model: nn.Module, encoder: nn.Module, num_virtual_tokens: int, num_layers: int,
                 num_heads: int, head_dim: int):
        super().__init__()
        self.base_model, self.encoder = base_model, encoder
        self.num_virtual_tokens, self.num_layers, self.num_heads, self.head_dim = (num_virtual_tokens, num_layers,
                                                                                   num_heads, head_dim)
        self.register_buffer("indices", torch.arange(num_virtual_tokens), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        rows, n = input_ids.shape[0], self.num_virtual_tokens
        prefix = _repeat_per_copy(self.encoder(self.indices), rows)  # [rows, n, layers * 2 * heads * head_dim]
        # peft's get_prompt: [rows, n, 2·layers, heads, head_dim] -> per layer [2, rows, heads, n, head_dim]
        per_layer = prefix.view(rows, n, self.num_layers * 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cache = DynamicCache(per_layer.split(2))
        return self.base_model(input_ids=input_ids, attention_mask=_with_virtual_mask(attention_mask, n),
                               past_key_values=cache)


def prompt_learning_config(model: nn.Module):
    """The active peft config if `model` is a prompt-learning peft model, else None."""
    config = getattr(model, "active_peft_config", None)
    return config if config is not None and config.peft_type in PROMPT_LEARNING else None


def prompt_learning_model(peft_model: nn.Module, layout, binding) -> tuple[nn.Module, str]:
    """Wrap a copy of a prompt-learning peft model (whose trained linear layers are already batched)
    so that its prompt encoder reads from `binding`; returns the model and the table's layout name."""
    config = prompt_learning_config(peft_model)
    encoder = peft_model.prompt_encoder[PEFT_ADAPTER_NAME]
    if isinstance(encoder, PromptEncoder) and encoder.encoder_type == PromptEncoderReparameterizationType.LSTM:
        raise NotImplementedError("P-tuning's LSTM prompt encoder is not supported by the export path (its weights "
                                  "would be inputs of a recurrent op, which XNNPACK cannot take): use the MLP encoder")
    table = layout[f"prompt_encoder.{PEFT_ADAPTER_NAME}.embedding.weight"]
    encoder.embedding = BatchedPromptTable(table, binding)
    base = peft_model.base_model
    if config.peft_type == PeftType.PREFIX_TUNING:
        heads = config.num_attention_heads
        return PrefixedModel(base, encoder, config.num_virtual_tokens, config.num_layers, heads,
                             config.token_dim // heads), table.name
    return PromptedModel(base, peft_model.word_embeddings, encoder, config.num_virtual_tokens), table.name
