"""The eager PyTorch reference engine: the same program as the `.pte`, run by PyTorch.

It answers what the ExecuTorch program cannot: the exact directional derivative of the loss
(forward-mode AD, `torch.func.jvp`) and the exact gradient (autograd). Tests use it as the
ground truth that finite-difference and SPSA estimates from the `.pte` are checked against.
"""

from __future__ import annotations

import numpy as np
import torch

from fwdfed.batch import Batch
from fwdfed.bundle.manifest import Bundle
from fwdfed.errors import UserError
from fwdfed.model.peft_adapter import peft_model_with
from fwdfed.model.program import build_programs


class NoAutogradError(UserError):
    """Derivatives asked of a model autograd cannot pass through."""


class EagerEngine:
    """A quantized bundle's eager model is quantized as its manifest records (what its program was verified
    against), so its losses match the program's; autograd does not pass through torchao's quantized linears
    (their outputs carry no gradient), so derivatives (backprop, jvp) need an fp32 bundle."""

    def __init__(self, bundle: Bundle):
        self.quantization = bundle.manifest.quantization
        peft_model = peft_model_with(bundle, bundle.initial_adapter())
        # The math attention path: sdpa has no forward-mode AD rule, and both give the same values in fp32.
        # A quantized base keeps sdpa, as the program has it: padding rows differ between the two paths, and
        # the quantized layers' run-time activation scales let them reach the real tokens (a padded story's
        # loss moved by up to 0.05 on stories260K); it takes no derivatives anyway.
        base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model  # bitfit: no peft
        if not self.quantization:
            base.config._attn_implementation = "eager"
        self.program, _, _ = build_programs(peft_model, bundle.manifest.layout, bundle.manifest.task)

    def mean_loss(self, batch: Batch, adapter: torch.Tensor) -> torch.Tensor:
        losses = self.program(batch.input_ids, batch.attention_mask, batch.labels, adapter.reshape(1, -1))[0]
        weights = torch.from_numpy(batch.weights)
        return (losses * weights).sum() / weights.sum().clamp(min=1.0)

    def losses(self, batch: Batch, adapters: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            a = torch.from_numpy(np.ascontiguousarray(np.atleast_2d(adapters), dtype=np.float32))
            return self.program(batch.input_ids, batch.attention_mask, batch.labels, a).numpy()

    def _check_differentiable(self) -> None:
        if self.quantization:
            raise NoAutogradError(f"this bundle's base is quantized ({self.quantization.scheme}): autograd does not "
                                  "pass through its quantized linear layers, so backprop and exact derivatives need "
                                  "a bundle exported without --quantize")

    def jvp(self, batch: Batch, adapter: np.ndarray, direction: np.ndarray) -> tuple[float, float]:
        """(mean loss, exact directional derivative along `direction`) by forward-mode AD."""
        self._check_differentiable()
        w = torch.from_numpy(np.asarray(adapter, dtype=np.float32))
        v = torch.from_numpy(np.asarray(direction, dtype=np.float32))
        loss, derivative = torch.func.jvp(lambda a: self.mean_loss(batch, a), (w,), (v,))
        return float(loss), float(derivative)

    def gradient(self, batch: Batch, adapter: np.ndarray) -> np.ndarray:
        """The exact gradient of the mean loss with respect to the adapter, by autograd."""
        self._check_differentiable()
        w = torch.tensor(np.asarray(adapter, dtype=np.float32), requires_grad=True)
        self.mean_loss(batch, w).backward()
        return w.grad.numpy().astype(np.float64)
