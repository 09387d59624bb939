"""Write an adapter vector as a peft adapter folder that `PeftModel.from_pretrained` loads."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from peft import PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

from fwdfed.bundle.manifest import Bundle, BundleError
from fwdfed.model.base_model import load_model, model_hash
from fwdfed.model.quantize import QuantizationError, check_adapter_fp32, quantize_like


def peft_config(manifest_config: dict, base: Path) -> PeftConfig:
    """The peft config the manifest records (LoRA, prompt tuning, P-tuning, prefix tuning).

    A prompt initialised from text names the tokenizer it was read with; the export's folder may be
    gone (a preset's scratch folder), so it is pointed at the base model's, which has the same
    tokenizer. The text's embeddings themselves are overwritten by the adapter vector."""
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[manifest_config["peft_type"]]
    known = {f.name for f in dataclasses.fields(config_class) if f.init}
    # The base model's path is peft's to fill in from the model it wraps (the export's may be a scratch folder).
    fields = {k: v for k, v in manifest_config.items() if k in known and k != "base_model_name_or_path"}
    if fields.get("tokenizer_name_or_path"):
        fields["tokenizer_name_or_path"] = str(base)
    return config_class(**fields)


def peft_model_with(bundle: Bundle, vector: np.ndarray, quantized: bool = True):
    """The bundle's base model with its peft adapter set to `vector`. With `quantized` (the default),
    the base's linear layers are quantized as the manifest records (`quantization`), so that the
    eager model is the one the bundle's program was verified against; without, the fp32 base (the
    adapter itself is fp32 either way, and a saved peft adapter loads on the fp32 base)."""
    m = bundle.manifest
    base = bundle.base_model_path
    if model_hash(base) != m.base_model_hash:
        raise BundleError(f"the base model in {base} is not the one this bundle was exported from (hash differs)")
    model, _ = load_model(base, m.task, m.model.num_labels or 2)
    if m.adapter.peft_config is not None:
        peft_model = get_peft_model(model, peft_config(m.adapter.peft_config, base)).eval()
    else:
        peft_model = model  # bitfit: the layout names the model's own parameters
    if quantized and m.quantization is not None:
        # After peft attached the adapter, as at export: peft wraps fp32 layers, then their base is quantized.
        try:
            quantize_like(peft_model, m.quantization)
            check_adapter_fp32(peft_model, m.layout.names)
        except (QuantizationError, KeyError, TypeError) as e:
            raise BundleError(f"the bundle's recorded quantization cannot be applied: {e}") from None
    tensors = m.layout.unflatten(np.asarray(vector, dtype=np.float32))
    params = dict(peft_model.named_parameters())
    missing = [name for name in tensors if name not in params]
    if missing:
        raise BundleError(f"the peft model has no parameter {missing[0]} named in the bundle's layout")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(torch.from_numpy(value))
    return peft_model


def save_peft_adapter(bundle: Bundle, vector: np.ndarray, out: str | Path) -> Path:
    """A peft folder (LoRA, prompt tuning, P-tuning, prefix tuning). peft has no BitFit type: a bitfit
    adapter is written as `bitfit.safetensors` (the trained tensors by parameter name), which
    `model.load_state_dict(safetensors.torch.load_file(path), strict=False)` applies.

    The files are written in a scratch folder beside `out` and moved into place once all are
    written, so a failed write leaves no half-written adapter, and what was at `out` untouched."""
    out, m = Path(out), bundle.manifest
    vector = np.asarray(vector, dtype=np.float32)
    if vector.shape != (m.adapter_dim,):
        raise BundleError(f"the adapter has {vector.size} values; this bundle's layout needs {m.adapter_dim}")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        if m.adapter.peft_config is not None:
            # The fp32 base: the adapter does not depend on how the program held the base.
            peft_model_with(bundle, vector, quantized=False).save_pretrained(scratch)
        else:
            from safetensors.numpy import save_file

            tensors = m.layout.unflatten(vector)
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(scratch / "bitfit.safetensors"))
        if out.is_dir():  # file by file: files of the user's in the folder stay
            for path in scratch.iterdir():
                os.replace(path, out / path.name)
        else:
            os.replace(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out
