"""A LLaMA-family causal LM cut into stages that run one after another: the streamed program.

    embed   (input_ids[B,L])                                   -> hidden[B,L,H]
    block k (hidden[P,B,L,H], attention_mask[B,L], adapter[P,d_k]) -> hidden[P,B,L,H]
    head    (hidden[P,B,L,H], labels[B,L])                      -> loss[P,B]

Each stage is exported as its own program (`export.stream`), so a device holds one stage's
weights at a time (`runtime.stream`). A block takes its own slice [start, stop) of the flat
adapter vector (its LoRA tensors are contiguous in the manifest's layout), so the adapter stays
one flat fp32 vector whatever the stages. The maths is Hugging Face's own: each block builds the
causal mask and the rotary embedding as `LlamaModel.forward` does and calls the decoder layer;
the head is the final norm and the chunked loss (`fwdfed.model.loss.ChunkedCausalLoss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from fwdfed.bundle.layout import AdapterLayout, AdapterTensor
from fwdfed.model.loss import ChunkedCausalLoss, positions_per_chunk
from fwdfed.model.program import AdapterBinding

EMBED, HEAD = "embed", "head"


def block_name(index: int) -> str:
    return f"block.{index}"


class SliceBinding(AdapterBinding):
    """An adapter binding that holds one stage's slice [start, stop) of the flat vector: the
    layout's offsets are shifted by `start`."""

    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop

    def tensor(self, t: AdapterTensor) -> torch.Tensor:
        assert self.adapters is not None, "adapter modules called outside a program forward"
        assert self.start <= t.offset and t.end <= self.stop, f"{t.name} is outside this stage's adapter slice"
        return self.adapters[:, t.offset - self.start : t.end - self.start].reshape(-1, *t.shape)


def rebind(module: nn.Module, binding: AdapterBinding) -> None:
    """Point every adapter module inside `module` (those `fwdfed.model.program.batched_model` made)
    at `binding`."""
    for m in module.modules():
        if isinstance(getattr(m, "binding", None), AdapterBinding):
            m.binding = binding


def layer_inputs(rotary_emb: nn.Module, config, x: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """What `LlamaModel.forward` passes each decoder layer beside hidden states x [N, L, H]: the causal mask
    over `attention_mask` [N, L] and the rotary embedding of positions 0..L-1. The same for every layer of
    one forward, so a run of several layers builds them once."""
    position_ids = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    causal = create_causal_mask(config=config, inputs_embeds=x, attention_mask=attention_mask, past_key_values=None,
                                position_ids=position_ids)
    return {"attention_mask": causal, "position_embeddings": rotary_emb(x, position_ids=position_ids),
            "position_ids": position_ids}


def llama_decoder(hf_model: nn.Module) -> nn.Module | None:
    """The decoder (embed_tokens, layers, norm, rotary_emb) of a LLaMA-family causal LM, or None."""
    decoder = getattr(hf_model, "model", None)
    if decoder is None or not all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return None
    return decoder


class EmbedStage(nn.Module):
    def __init__(self, embed_tokens: nn.Module):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)


class BlockStage(nn.Module):
    """One decoder layer on the P adapter copies' hidden states."""

    def __init__(self, layer: nn.Module, rotary_emb: nn.Module, config, binding: SliceBinding):
        super().__init__()
        self.layer, self.rotary_emb, self.config, self.binding = layer, rotary_emb, config, binding

    def forward(self, hidden, attention_mask, adapters):
        p, b, length, width = hidden.shape
        self.binding.adapters = adapters
        x = hidden.reshape(p * b, length, width)
        out = self.layer(x, **layer_inputs(self.rotary_emb, self.config, x, attention_mask.repeat(p, 1)))
        return out.reshape(p, b, length, width)


class HeadStage(nn.Module):
    """The final norm, LM head and per-example loss; the head's chunks sized for `max_perturbations`."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module, max_perturbations: int):
        super().__init__()
        self.norm = norm
        # Named as fwdfed.model.loss.CHUNK_MODULE_PATH says: the exporter finds the chunks by it.
        self.chunked_loss = ChunkedCausalLoss(lm_head)
        self.max_perturbations = max_perturbations

    def forward(self, hidden, labels):
        p, b, length, width = hidden.shape
        x = self.norm(hidden.reshape(p * b, length, width))
        chunk = positions_per_chunk(length - 1, self.max_perturbations)
        return self.chunked_loss(x, labels.repeat(p, 1), chunk).reshape(p, b)


@dataclass
class Stage:
    name: str
    module: nn.Module
    adapter: tuple[int, int]  # the stage's slice [start, stop) of the flat adapter vector


def layer_slice(layout: AdapterLayout, prefix: str) -> tuple[int, int]:
    """[start, stop) of the tensors named `prefix...` in the layout; they must be contiguous."""
    inside = [t for t in layout.tensors if t.name.startswith(prefix)]
    if not inside:
        return (0, 0)
    start, stop = inside[0].offset, inside[-1].end
    if sum(t.numel for t in inside) != stop - start:
        raise NotImplementedError(f"the adapter tensors of {prefix.rstrip('.')} are not contiguous in the layout: "
                                  "a streamed block takes one slice of the adapter vector")
    return start, stop


def split_into_stages(model: nn.Module, layout: AdapterLayout, max_perturbations: int) -> list[Stage]:
    """The stages of a batched peft LLaMA-family model (`fwdfed.model.program.batched_model`): the
    embedding, every decoder layer, the head. Adapter tensors outside the decoder layers (LoRA on
    the LM head or the embedding) are refused: those stages take no adapter."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = llama_decoder(hf)
    if decoder is None:
        raise NotImplementedError(f"streaming takes LLaMA-family decoders (embed_tokens, layers, norm, rotary_emb); "
                                  f"{type(hf).__name__} is not one")
    layer_prefix = layer_prefix_of(layout)
    covered = 0
    stages = [Stage(EMBED, EmbedStage(decoder.embed_tokens), (0, 0))]
    for k, layer in enumerate(decoder.layers):
        start, stop = layer_slice(layout, f"{layer_prefix}{k}.")
        binding = SliceBinding(start, stop)
        rebind(layer, binding)
        stages.append(Stage(block_name(k), BlockStage(layer, decoder.rotary_emb, hf.config, binding), (start, stop)))
        covered += stop - start
    if covered != layout.dim:
        raise NotImplementedError("streaming takes adapters inside the decoder layers only (LoRA on q_proj, v_proj, "
                                  "...); this adapter also trains the embedding or the LM head")
    stages.append(Stage(HEAD, HeadStage(decoder.norm, hf.get_output_embeddings(), max_perturbations), (0, 0)))
    return stages


# peft names a LLaMA's layers `base_model.model.model.layers.K....`
PEFT_LAYER_PREFIX = "base_model.model.model.layers."


def layer_prefix_of(layout: AdapterLayout) -> str:
    return PEFT_LAYER_PREFIX if any(t.name.startswith(PEFT_LAYER_PREFIX) for t in layout.tensors) else "model.layers."
