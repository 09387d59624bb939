"""The prefix/top split of a LLaMA-family causal LM (`python -m export --adapter-blocks top:K`).

    prefix(input_ids[B,L], attention_mask[B,L])                      -> hidden[B,L,H]
    top(hidden[B,L,H], attention_mask[B,L], labels[B,L], adapters[P,d]) -> loss[P,B]

The prefix is the token embedding and the frozen decoder layers below the first adapted one; the
top is the adapted layers, the final norm and the chunked loss, once per adapter vector. The
layers run as `LlamaModel.forward` runs them, through the streamed export's own helper
(`fwdfed.model.stages.layer_inputs`: the causal mask and the rotary embedding), so the split and
the streamed stages are one reading of the decoder. Every position is computed in the top: the
loss reads every position's next token, so no row can be dropped as a classifier's top drops
them (`fwdfed.model.split`). `top(prefix(x))` equals the whole model's loss; export verifies it
against eager peft.
"""

from __future__ import annotations

from torch import nn

from fwdfed.model.loss import ChunkedCausalLoss, positions_per_chunk
from fwdfed.model.stages import layer_inputs


class DecoderPrefixProgram(nn.Module):
    """prefix(input_ids[B,L], attention_mask[B,L]) -> hidden[B,L,H]: the embedding and the frozen layers."""

    def __init__(self, hf_model: nn.Module, decoder: nn.Module, frozen: int):
        super().__init__()
        self.model, self.decoder, self.frozen = hf_model, decoder, frozen  # registered: export finds the weights

    def forward(self, input_ids, attention_mask):
        x = self.decoder.embed_tokens(input_ids)
        inputs = layer_inputs(self.decoder.rotary_emb, self.model.config, x, attention_mask)
        for layer in self.decoder.layers[: self.frozen]:
            x = layer(x, **inputs)
        return x


class DecoderTopProgram(nn.Module):
    """top(hidden[B,L,H], attention_mask[B,L], labels[B,L], adapters[P,d]) -> loss[P,B]: the adapted layers on
    the P adapter copies of the prefix's states, the final norm and the per-example loss."""

    def __init__(self, hf_model: nn.Module, decoder: nn.Module, frozen: int, binding):
        super().__init__()
        self.model, self.decoder, self.frozen, self.binding = hf_model, decoder, frozen, binding
        # Named as fwdfed.model.loss.CHUNK_MODULE_PATH says: the exporter finds the chunks by it.
        self.chunked_loss = ChunkedCausalLoss(hf_model.get_output_embeddings())
        # The largest P the top is called with, which sizes the loss's chunks; the exporter sets it before
        # tracing, as it does the whole program's (fwdfed.model.program.LossProgram).
        self.max_perturbations = 1

    def forward(self, hidden, attention_mask, labels, adapters):
        p, b, length = adapters.shape[0], hidden.shape[0], hidden.shape[1]
        self.binding.adapters = adapters
        x = hidden.repeat(p, 1, 1)
        inputs = layer_inputs(self.decoder.rotary_emb, self.model.config, x, attention_mask.repeat(p, 1))
        for layer in self.decoder.layers[self.frozen :]:
            x = layer(x, **inputs)
        chunk = positions_per_chunk(length - 1, self.max_perturbations)
        return self.chunked_loss(self.decoder.norm(x), labels.repeat(p, 1), chunk).reshape(p, b)
