"""Quantizing the frozen base model's linear layers (torchao), never the adapter's tensors.

Schemes are those that lower to XNNPACK and run correctly in the ExecuTorch runtime here
(verified against the eager quantized model at every export):

    8da4w   int8 dynamic (per-token) activations, int4 weights in groups of `group_size` input
            features (torchao `Int8DynamicActivationIntxWeightConfig(int4, PerGroup(G))`)
    8da8w   int8 dynamic activations, int8 weights, one scale per output channel (PerAxis(0))

Weight-only int4/int8 linears are deliberately absent: XNNPACK lowers them silently wrong.

A linear layer is quantized when it is frozen base weight: an fp32 `nn.Linear` whose weight does
not train (`requires_grad` off, as peft leaves the base) and which is not one of peft's adapter
modules (LoRA A/B, a trained head copy, a prompt encoder). Its bias, trained or not, stays fp32
(BitFit and LoRA's `bias="all"` shift it from outside). With 8da4w a layer whose input width the
group size does not divide is left fp32, and the report says which: it cannot be grouped (and
XNNPACK takes only groups of a multiple of 32, so stories260K's down_proj, 172 wide, stays fp32;
8da8w, per channel, takes every width).

The function takes any module subtree (a whole peft model, or one decoder block), and the
rebuild of a bundle's eager model passes the manifest's list of modules (`only`), so that
export and every later rebuild quantize exactly the same layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from fwdfed.bundle.schema import Quantization
from fwdfed.errors import UserError

SCHEMES = ("8da4w", "8da8w")
DEFAULT_GROUP_SIZE = 32
# The export's default max |loss diff| between the quantized `.pte` and the eager quantized model: XNNPACK
# quantizes the activations itself at run time, where a value on a rounding boundary may land one int8 step
# from torchao's, and such steps add up over the layers: on stories260K (5 layers) the export's batch gave
# 4.8e-3 (mean loss 17.2964 against 17.2969), against 0.40 between the quantized and the fp32 model.
QUANTIZED_TOLERANCE = 1e-2
# peft's adapter modules: what lives under these path parts is the adapter (or its frozen twin, a
# trained head's original), never base weight to quantize.
ADAPTER_PATH_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                      "modules_to_save", "original_module", "prompt_encoder")


# What each scheme's weight scales are stored as (8da4w: bfloat16, as XNNPACK's int4 kernels hold them).
SCALE_DTYPES = {"8da4w": "bfloat16", "8da8w": "float32"}


class QuantizationError(UserError):
    """A quantization that cannot be done as asked; the message says why."""


@dataclass
class QuantizationReport:
    scheme: str
    group_size: int | None  # None: per output channel (8da8w)
    quantized: list[str] = field(default_factory=list)  # module paths whose weight is now quantized
    left_fp32: dict[str, str] = field(default_factory=dict)  # frozen linear path -> why it stayed fp32
    weight_bytes_before: int = 0  # fp32 bytes of the quantized layers' weights
    weight_bytes_after: int = 0  # their quantized bytes (values + scales + zero points)

    def to_manifest(self) -> Quantization:
        return Quantization(scheme=self.scheme, group_size=self.group_size,
                            weight_scale_dtype=SCALE_DTYPES[self.scheme], modules=tuple(self.quantized),
                            left_fp32=dict(self.left_fp32), weight_bytes_fp32=self.weight_bytes_before,
                            weight_bytes_quantized=self.weight_bytes_after)

    def describe(self) -> str:
        kept = ", ".join(f"{p} ({why})" for p, why in self.left_fp32.items())
        kept = f"; left fp32: {kept}" if kept else ""
        group = f", group size {self.group_size}" if self.group_size else ", per channel"
        return (f"{self.scheme}{group}: {len(self.quantized)} linear layers quantized, their weights "
                f"{self.weight_bytes_before / 2**20:.1f} MiB -> {self.weight_bytes_after / 2**20:.1f} MiB{kept}")


def check_options(scheme: str, group_size: int | None) -> int | None:
    """The group size the scheme uses (the default when None), or QuantizationError."""
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization scheme {scheme!r}; supported: {', '.join(SCHEMES)} "
                                "(weight-only int4/int8 linears are wrong on XNNPACK and are not offered)")
    if scheme == "8da8w":
        if group_size is not None:
            raise QuantizationError("8da8w has one scale per output channel: --group-size is for 8da4w only")
        return None
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if group_size < 32 or group_size % 32:
        # XNNPACK's blockwise int4 kernels take groups of a multiple of 32 input features (its lowering asserts it).
        raise QuantizationError(f"--group-size must be a multiple of 32 (XNNPACK's int4 groups), got {group_size}")
    return group_size


def is_adapter_path(path: str) -> bool:
    return any(part in ADAPTER_PATH_PARTS for part in path.split("."))


def is_frozen_base_linear(path: str, module: nn.Module) -> bool:
    return (type(module) is nn.Linear and not module.weight.requires_grad and not is_adapter_path(path)
            and module.weight.dtype == torch.float32)


def _config(scheme: str, group_size: int | None):
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, PerGroup

    if scheme == "8da4w":
        # XNNPACK's blockwise int4 kernels hold each group's scale as bfloat16: scales made bfloat16 here already,
        # the eager model computes what the program does (fp32 scales: the .pte's losses drifted up to 0.09 from
        # the eager model's on stories260K; bfloat16: 3e-7 on an MLP).
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size),
                                                     weight_scale_dtype=torch.bfloat16)
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))


def _quantized_bytes(weight: torch.Tensor) -> int:
    """What the quantized weight costs: int4 values packed two a byte, int8 one, plus its scales and zero
    points (torchao holds int4 unpacked in int8 until lowering packs it)."""
    bits = 4 if getattr(weight, "target_dtype", None) == torch.int4 else 8
    extra = sum(getattr(weight, name).numel() * getattr(weight, name).element_size()
                for name in ("scale", "zero_point") if isinstance(getattr(weight, name, None), torch.Tensor))
    return weight.numel() * bits // 8 + extra


def quantize_base(model: nn.Module, scheme: str = "8da4w", group_size: int | None = None,
                  only: Iterable[str] | None = None) -> QuantizationReport:
    """Quantize `model`'s frozen base linear layers in place; the report lists what was quantized and
    what stayed fp32. `only`: quantize exactly these module paths (relative to `model`), as a manifest
    recorded them; one that is missing, not a frozen base linear, or not groupable is refused."""
    from torchao.quantization import quantize_

    group_size = check_options(scheme, group_size)
    report = QuantizationReport(scheme, group_size)
    modules = dict(model.named_modules())
    if only is not None:
        only = list(only)
        for path in only:
            module = modules.get(path)
            if module is None:
                raise QuantizationError(f"cannot quantize {path!r}: the model has no such module")
            if type(module) is not nn.Linear or is_adapter_path(path) or module.weight.dtype != torch.float32:
                raise QuantizationError(f"cannot quantize {path!r}: it is not a frozen fp32 nn.Linear of the base "
                                        "model (adapter tensors stay fp32 program inputs)")
        chosen = set(only)
    else:
        chosen = {path for path, m in modules.items() if is_frozen_base_linear(path, m)}
    for path in sorted(chosen):
        in_features = modules[path].in_features
        if group_size is not None and in_features % group_size:
            if only is not None:
                raise QuantizationError(f"{path}: group size {group_size} does not divide its {in_features} "
                                        "input features")
            report.left_fp32[path] = f"group size {group_size} does not divide its {in_features} input features"
        else:
            report.quantized.append(path)
    if not report.quantized:
        raise QuantizationError(f"nothing to quantize with {scheme}"
                                + (f", group size {group_size}" if group_size else "") + ": "
                                + ("; ".join(f"{p}: {why}" for p, why in report.left_fp32.items())[:400]
                                   or "the model has no frozen nn.Linear outside the adapter"))
    report.weight_bytes_before = sum(modules[p].weight.numel() * 4 for p in report.quantized)
    selected = set(report.quantized)
    # Tied weights (an LM head sharing the embedding table): the head gets its own quantized weight and the
    # embedding keeps the fp32 table, so nothing else changes.
    quantize_(model, _config(scheme, group_size), filter_fn=lambda module, path: path in selected)
    report.weight_bytes_after = sum(_quantized_bytes(modules[p].weight) for p in report.quantized)
    return report


def check_adapter_fp32(model: nn.Module, adapter_names: Iterable[str]) -> None:
    """Every adapter tensor is still a plain fp32 parameter (so it stays a program input)."""
    params = dict(model.named_parameters())
    for name in adapter_names:
        p = params.get(name)
        if p is None or type(p.data) is not torch.Tensor or p.dtype != torch.float32:
            raise QuantizationError(f"the adapter tensor {name} would not stay an fp32 input after quantization "
                                    "(the adapter cannot be kept out of the quantized layers)")


def quantize_like(model: nn.Module, recorded) -> QuantizationReport | None:
    """Quantize `model` as a manifest's `quantization` records (fwdfed.bundle.schema.Quantization; None: an
    fp32 bundle)."""
    if recorded is None:
        return None
    return quantize_base(model, recorded.scheme, recorded.group_size, only=list(recorded.modules))
