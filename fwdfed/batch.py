"""A batch in the program's static input shapes: what every engine and method consumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor  # [B, L] int64
    labels: torch.Tensor  # [B, L] int64 (causal LM, -100 = ignored) or [B] int64 (classification)
    weights: np.ndarray  # [B] float32: 1 for a real example, 0 for filler that pads the batch
    # [B, C] float32: a teacher's logits of these examples (fwdfed.methods.fedkd), when a teacher labelled them
    teacher_logits: np.ndarray | None = None
    # [B, L, H] float16: the frozen prefix's output for these examples (fwdfed.model.split), computed once
    # by the device; a program with a `top` method then runs only the adapted blocks on them
    prefix_states: np.ndarray | None = None

    @property
    def num_examples(self) -> int:
        return int(self.weights.sum())
