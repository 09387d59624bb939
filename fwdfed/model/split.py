"""The prefix/top split of an encoder classifier: what cannot change is computed once.
(A LLaMA-family causal LM splits the same way, with its own prefix and top: fwdfed.model.split_decoder;
`split_programs` builds whichever the model is.)

With the adapter on the top K blocks only (`python -m export --adapter-blocks top:K`), every
forward-only pass would recompute the embeddings and the frozen blocks below the first adapted
one, whatever the adapter. The program gets two more methods:

    prefix(input_ids[B,L], attention_mask[B,L])                    -> hidden[B,L,H]
    top(hidden[B,L,H], attention_mask[B,L], labels[B], adapters[P,d]) -> loss[P,B]
    top_features(hidden[B,L,H], attention_mask[B,L], adapter[1,d])   -> features[B,F] (the head's input)

A device runs `prefix` once per example and keeps the states; each zeroth-order pass then runs
`top` alone. The classifier reads one position (the first token: BERT's pooler, DistilBERT's
pre-classifier), so the last block computes its queries, attention output and feed-forward for
that row only; its keys and values still come from every position. Both are exact:
`top(prefix(x))` equals the whole model's loss, which export verifies against eager peft.

The blocks are written out here from the layers' own modules (query/key/value, the output
projections, the layer norms, the feed-forward), so that the row-restricted last block and the
full ones below it are the same code read top to bottom; the LoRA layers among them are the
program's batched ones (`fwdfed.model.program`), which take the P adapter copies' rows together.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fwdfed.bundle.layout import AdapterLayout
from fwdfed.bundle.schema import Split
from fwdfed.bundle.tasks import SEQ_CLS
from fwdfed.model.loss import per_example_loss
from fwdfed.model.program import BatchedLoraLinear
from fwdfed.model.split_decoder import DecoderPrefixProgram, DecoderTopProgram
from fwdfed.model.stages import llama_decoder

# The adapter tensors a split may train: in an encoder block, or the classification head.
_BLOCK = re.compile(r"\.layer\.(\d+)\.")
_HEAD = ("classifier", "pre_classifier")  # DistilBERT trains its pre-classifier too (peft)
# A decoder's: in a decoder layer. (The LM head is tied to the embedding the prefix reads.)
_DECODER_BLOCK = re.compile(r"\.layers\.(\d+)\.")


class SplitError(ValueError):
    """The model or adapter cannot be split into a frozen prefix and an adapted top."""


class EncoderClassifier:
    """The parts of a BERT or DistilBERT classifier the split runs itself, with the names each uses."""

    def __init__(self, hf_model: nn.Module):
        if hasattr(hf_model, "bert"):
            self.kind, self.backbone = "bert", hf_model.bert
            self.layers = list(hf_model.bert.encoder.layer)
        elif hasattr(hf_model, "distilbert"):
            self.kind, self.backbone = "distilbert", hf_model.distilbert
            self.layers = list(hf_model.distilbert.transformer.layer)
        else:
            raise SplitError(f"the prefix/top split is written for BERT and DistilBERT classifiers and LLaMA-family "
                             f"causal LMs, not {type(hf_model).__name__}")
        self.model = hf_model
        self.num_heads = hf_model.config.num_attention_heads if self.kind == "bert" else hf_model.config.n_heads

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.embeddings(input_ids=input_ids)

    def modules(self, index: int) -> tuple[nn.Module, ...]:
        """Block `index`'s (query, key, value, output projection, attention norm, feed-forward in, activation,
        feed-forward out, output norm)."""
        layer = self.layers[index]
        if self.kind == "bert":
            attn = layer.attention
            return (attn.self.query, attn.self.key, attn.self.value, attn.output.dense, attn.output.LayerNorm,
                    layer.intermediate.dense, layer.intermediate.intermediate_act_fn, layer.output.dense,
                    layer.output.LayerNorm)
        attn = layer.attention
        return (attn.q_lin, attn.k_lin, attn.v_lin, attn.out_lin, layer.sa_layer_norm, layer.ffn.lin1,
                layer.ffn.activation, layer.ffn.lin2, layer.output_layer_norm)

    def block(self, index: int, h: torch.Tensor, mask_bias: torch.Tensor, rows: int | None = None,
              copies: int | None = None) -> torch.Tensor:
        """Block `index` on hidden states h [N, L, H]; `rows`: compute only the first `rows` positions'
        outputs (their queries against every position's keys and values).

        `copies` P: h [B, L, H] is the same for all P adapter copies (the prefix's states), and the output
        is theirs, [P*B, rows, H]. The frozen projections then run once on the B rows, not P times, and a
        LoRA projection adds each copy's low-rank change to the one frozen product: at the first adapted
        block most of a pass's arithmetic is the keys' and values' projection of every position."""
        q_proj, k_proj, v_proj, out_proj, attn_norm, ff_in, act, ff_out, ff_norm = self.modules(index)
        x = h if rows is None else h[:, :rows]
        p = copies or 1
        b, lq, width = x.shape
        heads, size = self.num_heads, width // self.num_heads

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # [C, B, L, H] -> [C, B, heads, L, size]
            return t.reshape(t.shape[0], b, -1, heads, size).transpose(2, 3)

        def project(module: nn.Module, t: torch.Tensor) -> torch.Tensor:  # [B, L, H] -> [C, B, L, out]
            return shared_projection(module, t, p) if copies else module(t).unsqueeze(0)

        q, k, v = split_heads(project(q_proj, x)), split_heads(project(k_proj, h)), split_heads(project(v_proj, h))
        scores = q @ k.transpose(-1, -2) / math.sqrt(size) + mask_bias[None, :, None, None, :]
        context = (scores.softmax(-1) @ v).transpose(2, 3).reshape(p * b, lq, width)
        residual = x.repeat(p, 1, 1) if copies else x
        a = attn_norm(out_proj(context) + residual)
        return ff_norm(ff_out(act(ff_in(a))) + a)

    def features(self, first: torch.Tensor) -> torch.Tensor:
        """What the classifier reads, from the first position's final hidden state [N, H]."""
        if self.kind == "bert":
            return self.backbone.pooler.activation(self.backbone.pooler.dense(first))
        return F.relu(self.model.pre_classifier(first))

    def logits(self, first: torch.Tensor) -> torch.Tensor:
        return self.model.classifier(self.features(first))


def shared_projection(module: nn.Module, x: torch.Tensor, copies: int) -> torch.Tensor:
    """`module` on an input [B, L, H] that is the same for all P adapter copies: [P, B, L, out] (or
    [1, B, L, out] for a frozen module, broadcast). A LoRA layer's frozen product is taken once and each
    copy's s B_p A_p x added: A_p x for all P copies is one matmul of x with the P A matrices side by side."""
    if isinstance(module, BatchedLoraLinear):
        b, length, width = x.shape
        lora_a = module.binding.tensor(module.a)  # [P, r, in]
        lora_b = module.binding.tensor(module.b)  # [P, out, r]
        rank = lora_a.shape[1]
        xa = x.reshape(b * length, width) @ lora_a.reshape(copies * rank, width).transpose(0, 1)  # [BL, P r]
        xa = xa.reshape(b * length, copies, rank).transpose(0, 1)  # [P, BL, r]
        delta = torch.bmm(xa, lora_b.transpose(1, 2))  # [P, BL, out]
        base = module.base_layer(x).reshape(1, b * length, -1)
        return (base + module.scaling * delta).reshape(copies, b, length, -1)
    if isinstance(module, nn.Linear):
        return module(x).unsqueeze(0)
    return module(x.repeat(copies, 1, 1)).reshape(copies, *x.shape[:2], -1)


def mask_bias(attention_mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """0 where a position is attended to, the most negative float where it is padding, as Hugging Face adds."""
    return (1.0 - attention_mask.to(dtype)) * torch.finfo(dtype).min


def first_adapted_block(layout: AdapterLayout, num_blocks: int, block: re.Pattern = _BLOCK,
                        head: tuple[str, ...] = _HEAD) -> int:
    """The lowest block any adapter tensor is in (`block` finds a tensor's block number in its name); SplitError
    if a tensor is neither in a block nor in one of the `head` modules."""
    blocks = []
    for t in layout.tensors:
        found = block.search(t.name)
        if found:
            blocks.append(int(found.group(1)))
        elif not any(part in t.name.split(".") for part in head):
            raise SplitError(f"adapter tensor {t.name} is outside the model's blocks: the split's top trains the "
                             "top blocks" + (" and the head" if head else ""))
    return min(blocks, default=num_blocks)


class PrefixProgram(nn.Module):
    """prefix(input_ids[B,L], attention_mask[B,L]) -> hidden[B,L,H]: embeddings and the frozen blocks."""

    def __init__(self, parts: EncoderClassifier, frozen: int):
        super().__init__()
        self.parts, self.frozen = parts, frozen
        self.model = parts.model  # registered, so that export finds the weights

    def forward(self, input_ids, attention_mask):
        h, bias = self.parts.embed(input_ids), mask_bias(attention_mask)
        for i in range(self.frozen):
            h = self.parts.block(i, h, bias)
        return h


class TopProgram(nn.Module):
    """top(hidden[B,L,H], attention_mask[B,L], labels[B], adapters[P,d]) -> loss[P,B]: the adapted blocks
    (the last one for the first row only), the head and the cross-entropy, once per adapter vector."""

    def __init__(self, parts: EncoderClassifier, frozen: int, binding):
        super().__init__()
        self.parts, self.frozen, self.binding = parts, frozen, binding
        self.model = parts.model

    def last_states(self, hidden, attention_mask, adapters) -> torch.Tensor:
        """The first position's final hidden state [P*B, H] under each adapter vector."""
        p = adapters.shape[0]
        self.binding.adapters = adapters
        bias = mask_bias(attention_mask)
        last = len(self.parts.layers) - 1
        # The first adapted block reads the prefix's states, the same for every copy; the ones above, their own.
        h = self.parts.block(self.frozen, hidden, bias, rows=1 if self.frozen == last else None, copies=p)
        for i in range(self.frozen + 1, last + 1):
            h = self.parts.block(i, h, bias.repeat(p, 1), rows=1 if i == last else None)
        return h[:, 0]

    def forward(self, hidden, attention_mask, labels, adapters):
        p = adapters.shape[0]
        logits = self.parts.logits(self.last_states(hidden, attention_mask, adapters))
        return per_example_loss(logits, labels.repeat(p), SEQ_CLS).reshape(p, hidden.shape[0])


class TopFeaturesProgram(nn.Module):
    """top_features(hidden[B,L,H], attention_mask[B,L], adapter[1,d]) -> [B, F]: what the head reads, from the
    prefix states, so that the class statistics of `--head-init lda` cost a pass through the top too."""

    def __init__(self, top: TopProgram):
        super().__init__()
        self.top, self.model = top, top.model

    def forward(self, hidden, attention_mask, adapter):
        return self.top.parts.features(self.top.last_states(hidden, attention_mask, adapter))


class SplitPrograms(NamedTuple):
    prefix: PrefixProgram | DecoderPrefixProgram
    top: TopProgram | DecoderTopProgram
    top_features: TopFeaturesProgram | None  # a classifier's; a causal LM has no head statistics
    num_blocks: int

    @property
    def frozen(self) -> int:
        return self.prefix.frozen

    def record(self, hidden_size: int) -> Split:
        """What the manifest says of the split (`program.split`): where it is cut, and the states kept."""
        return Split(frozen_blocks=self.frozen, adapted_blocks=self.num_blocks - self.frozen,
                     hidden_size=hidden_size, states_dtype="float16")


def split_programs(model: nn.Module, layout: AdapterLayout, binding) -> SplitPrograms:
    """The prefix and top programs of the batched model (`fwdfed.model.program.batched_model`), and a
    classifier's top_features."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = llama_decoder(hf)
    if decoder is not None:
        blocks = len(decoder.layers)
        frozen = first_adapted_block(layout, blocks, _DECODER_BLOCK, ())
        return SplitPrograms(DecoderPrefixProgram(hf, decoder, frozen), DecoderTopProgram(hf, decoder, frozen, binding),
                             None, blocks)
    parts = EncoderClassifier(hf)
    frozen = first_adapted_block(layout, len(parts.layers))
    top = TopProgram(parts, frozen, binding)
    return SplitPrograms(PrefixProgram(parts, frozen), top, TopFeaturesProgram(top), len(parts.layers))
