"""Per-example losses of the program, and the causal-LM loss taken over chunks of positions.

A causal LM's loss needs the logits of every position: [P*B, L, V] at P adapter copies. At
llama-110m's shapes (V = 32,000, batch 4 x 128, P = 8) those logits and their log-softmax were
~1 GB of ExecuTorch's planned arena, most of the program's memory. `ChunkedCausalLoss` takes
the final hidden states instead and runs the LM head, log-softmax and target pick on one chunk
of positions at a time, a Python loop unrolled at export. ExecuTorch's memory planner gives
buffers whose lifetimes do not overlap the same memory, so each chunk's logits reuse the
previous chunk's, provided each chunk's head is a delegate call of its own
(`export.chunk_partitioner`). The values are those of the whole-logits loss: the same ops on
the same rows.
"""

from __future__ import annotations

import torch
from torch import nn

from fwdfed.bundle.tasks import IGNORE_INDEX, SEQ_CLS

# Where the exporter's partitioner finds each chunk's nodes: the path of `ChunkNll` in `LossProgram`.
CHUNK_MODULE_PATH = "chunked_loss.chunk_nll"


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) for every position; ignored targets get a harmless index (masked later).

    Written with log_softmax + gather rather than F.cross_entropy(reduction="none"), whose
    decomposition mis-shapes its output under a dynamic batch in torch.export.
    """
    safe = targets.clamp(min=0).unsqueeze(-1)
    return -torch.log_softmax(logits, dim=-1).gather(-1, safe).squeeze(-1)


def mean_over_real_tokens(nll: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's mean of `nll` over its real (not ignored) targets."""
    valid = (targets != IGNORE_INDEX).to(nll.dtype)
    # A row with no real token (batch filler) gets loss 0, not 0/0.
    return (nll * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)


def labels_for(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """The labels of every position the logits cover. Prompt tuning and P-tuning prepend virtual tokens
    to a causal LM's input; peft labels them ignored, so the last virtual token predicts the first real one."""
    if task == SEQ_CLS or logits.shape[1] == labels.shape[1]:
        return labels
    extra = logits.shape[1] - labels.shape[1]
    return torch.cat((torch.full_like(labels[:, :1], IGNORE_INDEX).expand(-1, extra), labels), dim=1)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Mean cross-entropy per example: over its real next tokens (causal LM) or its label."""
    if task == SEQ_CLS:
        return token_nll(logits, labels)
    targets = labels[:, 1:]
    return mean_over_real_tokens(token_nll(logits[:, :-1], targets), targets)


def positions_per_chunk(positions: int, max_perturbations: int) -> int:
    """Chunk length such that, at the program's largest P, a chunk's logits have no more rows than
    one batch's (B x L): the loss then plans the same vocabulary-wide buffers at P = 8 as at P = 1,
    and no more than the predict method's own output, the logits of one batch, already needs."""
    return -(-positions // max_perturbations)


class ChunkNll(nn.Module):
    """-log p(target) at positions [start, end) only: the LM head, log-softmax and gather of one chunk."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return token_nll(self.head(hidden[:, start:end]), targets[:, start:end])


class ChunkedCausalLoss(nn.Module):
    """Per-example causal-LM loss from the final hidden states [N, L, H] and labels [N, L], the LM
    head applied to `chunk` positions at a time."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.chunk_nll = ChunkNll(head)

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        targets = labels[:, 1:]  # position t predicts token t + 1; the last position predicts nothing
        n = targets.shape[1]
        nll = torch.cat([self.chunk_nll(hidden, targets, s, min(s + chunk, n)) for s in range(0, n, chunk)], dim=1)
        return mean_over_real_tokens(nll, targets)
